import pytest
import torch
from helpers import recipe_lora_targets
from PIL import Image

from mme5.backbones import ADAPTERS, Item, load_backbone
from mme5.backbones.tiny import build_tiny
from mme5.data.collate import ContrastiveCollator
from mme5.data.shards import read_samples, shard_urls
from mme5.data.stream import StreamBatch
from mme5.encoder import PAPER_TARGET_MODULES, Encoder, LoraSettings, last_token_pool
from mme5.gradcache import GradCache
from mme5.losses import InfoNCE, scatter_negatives


def test_last_token_pool_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(last_token_pool(hidden, left), hidden[[0, 1], [3, 3]])
    assert torch.equal(last_token_pool(hidden, right), hidden[[0, 1], [1, 3]])


def items(n=6):
    colours = [(230, 20, 20), (20, 200, 40), (30, 30, 220)]
    out = []
    for i in range(n):
        image = Image.new("RGB", (24, 24), colours[i % 3]) if i % 2 == 0 else None
        out.append(Item("Represent the given image", f"caption number {i} " + "word " * (i % 4), image))
    return out


def test_right_padding_gives_the_same_embedding(tiny_mllama):
    adapter = load_backbone(tiny_mllama)
    encoder = Encoder(adapter).eval()
    batch = dict(adapter.collate([Item("", "a long text-only item of many words"), Item("", "short")]))
    left = encoder(batch)
    mask = batch["attention_mask"]
    order = torch.argsort(1 - mask, dim=1, stable=True)  # real tokens first → right padding
    right_batch = {**batch, "input_ids": batch["input_ids"].gather(1, order),
                   "attention_mask": mask.gather(1, order)}
    if "cross_attention_mask" in batch:
        right_batch["cross_attention_mask"] = batch["cross_attention_mask"][torch.arange(2)[:, None], order]
    torch.testing.assert_close(encoder(right_batch), left, atol=1e-5, rtol=1e-5)


def test_lora_targets_the_papers_modules_and_only_adapters_train(tiny_mllama):
    encoder = Encoder(load_backbone(tiny_mllama), LoraSettings(), gradient_checkpointing=True)
    adapted = {n.rsplit(".", 2)[-2] for n, _ in encoder.model.named_modules() if n.endswith(".lora_A")}
    assert adapted == set(PAPER_TARGET_MODULES)
    names = [n for n, _ in encoder.model.named_modules() if n.endswith(".lora_A")]
    assert any("vision_model" in n for n in names) and any("cross_attn" in n for n in names)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # DoRA magnitudes live under lora_ too
    regex = Encoder(load_backbone(tiny_mllama), LoraSettings(target_modules=r".*language_model.*\.v_proj"))
    assert all("language_model" in n and "v_proj" in n
               for n, _ in regex.model.named_modules() if n.endswith(".lora_A"))


def gradients(params):
    """Each parameter's gradient; zeros where the loss does not reach (LLaVA's unused last vision layer)."""
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def relative_error(actual, expected):
    """Over all parameters at once (LoRA A matrices get zero gradient at init, where B is zero)."""
    a, e = torch.cat([x.flatten() for x in actual]), torch.cat([x.flatten() for x in expected])
    return ((a - e).norm() / e.norm()).item()


@pytest.mark.parametrize("family", sorted(ADAPTERS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_cache_equals_full_batch_with_lora_dropout(tiny_mllama, tmp_path, family, checkpointing):
    """Every family, with its recipe's LoRA targets (vision and language adapters in the gradient path)."""
    path = tiny_mllama if family == "mllama" else build_tiny(family, tmp_path / family)
    adapter = load_backbone(path)
    encoder = Encoder(adapter, LoraSettings(dropout=0.1, target_modules=recipe_lora_targets(family)),
                      gradient_checkpointing=checkpointing).train()
    loss = InfoNCE(temperature=0.05)
    chunk = 4
    data = items(10)
    collate = lambda xs: adapter.chunks(xs, chunk)  # noqa: E731
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True], [True, False]] * 2)
    groups = {"query": collate(data), "positive": collate(data[::-1]),
              "negatives": collate([data[(3 * i) % 10] for i in range(int(mask.sum()))])}

    def loss_fn(emb):
        return loss(emb["query"], emb["positive"], scatter_negatives(emb["negatives"], mask), mask)

    params = [p for p in encoder.parameters() if p.requires_grad]
    torch.manual_seed(7)
    plain = loss_fn({name: encoder.encode_chunks(c) for name, c in groups.items()}).loss
    plain.backward()
    expected = gradients(params)
    encoder.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    cached, _ = GradCache(chunk).step(encoder.encode_chunk, groups, loss_fn)
    assert cached.item() == pytest.approx(plain.item(), rel=1e-6)
    assert relative_error(gradients(params), expected) < 1e-5

    torch.manual_seed(8)  # other dropout masks: a different gradient (so the test can tell)
    encoder.zero_grad(set_to_none=True)
    GradCache(chunk).step(encoder.encode_chunk, groups, loss_fn)
    assert relative_error(gradients(params), expected) > 1e-3


def test_lockstep_chunks_embed_exactly_like_plain_chunks(tiny_mllama, tiny_shards):
    """Placeholder rows (for FSDP) change neither the real rows' embeddings nor which rows come back."""
    adapter = load_backbone(tiny_mllama)
    encoder = Encoder(adapter).eval()
    samples = list(read_samples(shard_urls(tiny_shards)))[:7]  # every modality; 0, 1 or 2 negatives
    batch = StreamBatch(samples, 0, {})
    plain = ContrastiveCollator(adapter.collate, num_negatives=2, chunk_size=2)(batch)
    lockstep = ContrastiveCollator(adapter.collate, num_negatives=2, chunk_size=2, lockstep=True)(batch)
    # Chunk counts depend on the batch size only (ranks agree), and the vision tower runs in every chunk.
    assert [len(lockstep.query), len(lockstep.negatives)] == [4, 7]
    assert all("pixel_values" in c.inputs for group in (lockstep.query, lockstep.negatives) for c in group)
    with torch.no_grad():
        for group in ("query", "positive", "negatives"):
            expected = encoder.encode_chunks(getattr(plain, group))
            torch.testing.assert_close(encoder.encode_chunks(getattr(lockstep, group)), expected,
                                       atol=1e-5, rtol=1e-5)
