"""Matryoshka dimensions (issue 26 item 5): the summed prefix loss against a float64 brute force, through the
gradient cache and 2-process DDP, and truncated embeddings in `Embedder`, sentence-transformers and the
evaluation."""

import json
import os
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_eval_cli import tiny_world  # noqa: F401 (a fixture)
from test_gradcache import (
    CHUNK,
    LOCAL_B,
    SEED,
    WORLD,
    Encoder,
    assert_rel_close,
    grads,
    local_batch,
    make_batch,
)
from test_train import assert_same_gradients, full_batch_step, make_run, run_distributed, scalars
from torch.nn.parallel import DistributedDataParallel

from mme5.checkpoint import EXPORT_CONFIG, load_encoder
from mme5.contrastive import contrastive_step
from mme5.embedder import Embedder
from mme5.encoder import LoraSettings
from mme5.eval.__main__ import main as evaluate_command
from mme5.eval.mmeb import MMEB
from mme5.eval.run import evaluate
from mme5.export import export
from mme5.gradcache import GradCache, split_batch
from mme5.losses import InfoNCE, scatter_negatives
from mme5.matryoshka import Matryoshka, truncate

DIMS, WEIGHTS = (8, 4, 2), (1.0, 0.5, 2.0)  # the test encoder's embeddings have 8 dimensions


def brute_force(query, positive, negatives, mask, dims, weights, temperature):
    """sum_d w_d * InfoNCE(prefix_d), in float64, one query at a time: candidates are every positive and the
    query's own real negatives."""
    total = torch.zeros((), dtype=torch.float64)
    for dim, weight in zip(dims, weights, strict=True):
        q, p, n = (F.normalize(x.double()[..., :dim], dim=-1) for x in (query, positive, negatives))
        for i in range(q.shape[0]):
            candidates = torch.cat([p, n[i][mask[i]]])  # (B + real negatives of i, dim)
            logits = candidates @ q[i] / temperature
            total = total + weight * (torch.logsumexp(logits, 0) - logits[i]) / q.shape[0]
    return total


def test_loss_and_gradient_match_a_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    query, positive = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    negatives, mask = torch.randn(5, 2, 8, generator=g), torch.rand(5, 2, generator=g) > 0.3
    loss_fn = InfoNCE(temperature=0.05, gather=False)
    inputs = [x.clone().requires_grad_() for x in (query, positive, negatives)]
    output = Matryoshka(DIMS, WEIGHTS)(lambda q, p, n: loss_fn(q, p, n, mask), *inputs)
    output.loss.backward()
    leaves = [x.double().requires_grad_() for x in (query, positive, negatives)]
    expected = brute_force(*leaves, mask, DIMS, WEIGHTS, 0.05)
    expected.backward()

    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for actual, reference in zip(inputs, leaves, strict=True):
        torch.testing.assert_close(actual.grad.double(), reference.grad, atol=1e-6, rtol=1e-5)
    assert set(output.dim_losses) == set(DIMS)
    assert output.logits.shape == (5, 5 + 2)  # the largest dimension's, for logging


def test_equal_weights_by_default_and_bad_settings_are_refused():
    q, p = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    loss_fn = InfoNCE(gather=False)
    output = Matryoshka((8, 2))(lambda *x: loss_fn(*x), q, p, None)
    assert output.loss.item() == pytest.approx(sum(output.dim_losses.values()).item(), rel=1e-6)
    with pytest.raises(ValueError, match="only 8 dimensions"):
        Matryoshka((16, 8))(lambda *x: loss_fn(*x), q, p, None)
    for dims, weights, message in [((8, 8), None, "twice"), ((8, 0), None, "positive integers"),
                                   ((8, 4), (1.0,), "one positive weight"),
                                   ((8, 4), (1.0, -1.0), "one positive weight")]:
        with pytest.raises(ValueError, match=message):
            Matryoshka(dims, weights)
    with pytest.raises(ValueError, match="needs model.matryoshka_dims"):
        Matryoshka.of(None, [1.0])
    assert Matryoshka.of(None) is None


def test_truncate_renormalises_the_prefix():
    x = torch.randn(3, 8)
    torch.testing.assert_close(truncate(x, 4), x[:, :4] / x[:, :4].norm(dim=-1, keepdim=True))
    assert truncate(x, None) is x and torch.equal(truncate(x, 4, normalize=False), x[:, :4])
    with pytest.raises(ValueError, match="8-dimensional embeddings to 9"):
        truncate(x, 9)


def real(batch):
    """The batch with only its real negatives (N, D_IN), row-major in mask order, as training embeds them."""
    return batch | {"negatives": batch["negatives"][batch["mask"].flatten()]}


def step(model, batch, loss_fn, cache: GradCache | None, chunk: int):
    """One contrastive step of the Matryoshka loss over `batch`, its chunks of `chunk` rows."""
    chunks = {name: split_batch(real(batch)[name], chunk) for name in ("query", "positive", "negatives")}
    return contrastive_step(model, chunks["query"], chunks["positive"], chunks["negatives"], batch["mask"],
                            loss_fn, cache, matryoshka=Matryoshka(DIMS, WEIGHTS))


def test_gradient_cache_gives_the_full_batch_gradient():
    torch.manual_seed(0)
    model, batch = Encoder(), make_batch(6)
    loss_fn = InfoNCE(temperature=0.05, learnable_temperature=True, gather=False)
    torch.manual_seed(1)
    plain, _ = step(model, batch, loss_fn, None, 2)
    expected = grads(model, loss_fn)
    torch.manual_seed(1)
    cached, output = step(model, batch, loss_fn, GradCache(2), 2)
    assert cached.item() == pytest.approx(plain.item(), rel=1e-6)
    assert_rel_close(grads(model, loss_fn), expected, 1e-5)
    assert len(output.dim_losses) == 3


def _ddp_worker(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'store'}", rank=rank,
                           world_size=WORLD, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    ddp = DistributedDataParallel(Encoder())
    batch = local_batch(make_batch(WORLD * LOCAL_B), rank)
    torch.manual_seed(SEED + rank)
    step(ddp, batch, InfoNCE(temperature=0.05), GradCache(CHUNK, no_sync=ddp.no_sync), CHUNK)
    torch.save(grads(ddp), Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # as test_gradcache's workers: no teardown in destructors


def test_ddp_with_the_gradient_cache_gives_the_global_batch_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=WORLD)
    torch.manual_seed(0)
    model, full = Encoder(), make_batch(WORLD * LOCAL_B)
    emb = {name: [] for name in ("query", "positive", "negatives")}
    for rank in range(WORLD):  # each rank's chunks encoded under that rank's dropout draws
        torch.manual_seed(SEED + rank)
        local = real(local_batch(full, rank))
        for name in emb:
            emb[name] += [model(chunk) for chunk in split_batch(local[name], CHUNK)]
    q, p, n = (torch.cat(emb[name]) for name in ("query", "positive", "negatives"))
    brute_force(q, p, scatter_negatives(n, full["mask"]), full["mask"], DIMS, WEIGHTS, 0.05).backward()
    expected = grads(model)
    for rank in range(WORLD):
        assert_rel_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "hsdp"])
def test_lightning_fsdp_gives_the_single_process_loss_and_gradient(tmp_path, tiny_mllama, tiny_shards,
                                                                    strategy):
    """The module's path (gradient cache, FSDP2 on 2 processes: shards over both, or over one each as
    replicas): the summed prefix loss and its gradient equal one process's on the global batch."""
    record = run_distributed(tmp_path, tiny_mllama, tiny_shards, strategy, "--matryoshka", "32", "8")
    gradients, health = full_batch_step(tiny_mllama, tiny_shards, record, matryoshka_dims=[32, 8])
    assert_same_gradients(record, gradients)
    # The loss over the global batch (in loss_over_chance) with every health metric, not rank 0's half.
    assert record["health"] == pytest.approx({key: float(value) for key, value in health.items()}, abs=1e-5)


# ----- a tiny model trained with Matryoshka dimensions, exported and loaded -----

TRAINED_DIMS = [32, 8]  # the tiny Mllama's hidden size is 32
TEXTS = ["a red square", "two blue circles", "un triangle vert"]


@pytest.fixture(scope="module")
def matryoshka_run(tmp_path_factory, tiny_mllama, tiny_shards):
    """Two training steps with `model.matryoshka_dims`, the checkpoint and its merged export."""
    root = tmp_path_factory.mktemp("matryoshka")
    L.seed_everything(0)
    lora = LoraSettings(r=2, alpha=4, dropout=0.0)
    trainer, module, data = make_run(root, tiny_mllama, tiny_shards, max_steps=2, lora=lora,
                                     matryoshka_dims=TRAINED_DIMS)
    trainer.fit(module, datamodule=data)
    ckpt = root / "ckpt" / "last.ckpt"
    return root, ckpt, export(ckpt, root / "exported", query_instruction="Find:")


def test_training_logs_each_dimension_and_records_the_dims(matryoshka_run):
    root, ckpt, exported = matryoshka_run
    total = scalars(root / "tb", "train/loss")
    per_dim = [scalars(root / "tb", f"train/loss_dim{dim}") for dim in TRAINED_DIMS]
    assert len(total) == 2
    for step, (_, value) in enumerate(total):  # weights 1 each: the loss is the sum
        assert value == pytest.approx(sum(losses[step][1] for losses in per_dim), rel=1e-5)
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["matryoshka_dims"] == TRAINED_DIMS
    assert json.loads((exported / EXPORT_CONFIG).read_text())["matryoshka_dims"] == TRAINED_DIMS
    card = (exported / "README.md").read_text()
    assert "- \"matryoshka\"" in card and "truncate_dim=8" in card


def test_embedder_truncate_dim_is_the_normalised_prefix(matryoshka_run):
    _, ckpt, exported = matryoshka_run
    full = Embedder.from_pretrained(exported).encode_query(TEXTS)
    small = Embedder.from_pretrained(exported, truncate_dim=8)
    assert small.dim == 8 and small.matryoshka_dims == TRAINED_DIMS
    torch.testing.assert_close(small.encode_query(TEXTS), F.normalize(full[:, :8], dim=-1), atol=1e-6, rtol=0)
    raw = Embedder.from_pretrained(ckpt, truncate_dim=8).encode(TEXTS, normalize_embeddings=False)
    assert raw.shape == (3, 8) and not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="truncate_dim 64: the model's embeddings have 32"):
        Embedder.from_pretrained(exported, truncate_dim=64)


def test_sentence_transformers_truncate_dim_equals_the_embedder(matryoshka_run, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    _, _, exported = matryoshka_run
    model = st.SentenceTransformer(str(exported), trust_remote_code=True, device="cpu", truncate_dim=8)
    assert model.get_embedding_dimension() == 8
    # sentence-transformers truncates after the module (which normalised the whole vector): ask it to
    # normalise again, as the Embedder does; cosine similarities need no flag.
    ours = Embedder.from_pretrained(exported, truncate_dim=8).encode_query(TEXTS)
    theirs = model.encode_query(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.similarity(theirs, theirs), ours @ ours.T, atol=1e-5, rtol=0)
    model.save(str(tmp_path / "resaved"))  # the module's own save keeps the trained dims
    assert json.loads((tmp_path / "resaved" / EXPORT_CONFIG).read_text())["matryoshka_dims"] == TRAINED_DIMS


def test_evaluation_at_a_dimension_ranks_the_normalised_prefixes(matryoshka_run, tiny_world, tmp_path,  # noqa: F811
                                                                  capsys):
    _, _, exported = matryoshka_run
    common = ["--model", str(exported), "--data", str(tiny_world), "--max-queries", "2",
              "--cache", str(tmp_path / "cache")]
    evaluate_command([*common, "--out", str(tmp_path / "dim8"), "--dim", "8"])
    scores = json.loads((tmp_path / "dim8" / "scores.json").read_text())
    assert scores["model"]["dim"] == 8 and scores["model"]["matryoshka_dims"] == TRAINED_DIMS
    encoder = load_encoder(exported).encoder
    by_hand, _ = evaluate(MMEB(tiny_world / "mmeb", max_queries=2),
                          lambda items: F.normalize(encoder.embed(items)[:, :8], dim=-1))
    assert {f"mmeb/{k}": v for k, v in by_hand.scalars.items()} == pytest.approx(
        {k: v for k, v in scores["scalars"].items() if k.startswith("mmeb/")})
    evaluate_command([*common, "--out", str(tmp_path / "full")])  # the same cache serves every size
    assert json.loads((tmp_path / "full" / "scores.json").read_text())["model"]["dim"] == 32
    with pytest.raises(SystemExit):
        evaluate_command([*common, "--out", str(tmp_path / "too-big"), "--dim", "33"])
    assert "--dim 33" in capsys.readouterr().err
