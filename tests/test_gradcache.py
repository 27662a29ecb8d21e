"""GradCache gives the plain full-batch gradient, with dropout, hard negatives, autocast and under DDP."""

import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from mme5.gradcache import GradCache, split_batch
from mme5.losses import InfoNCE, gather_with_grad

D_IN, K = 16, 2
GROUPS = ("query", "positive", "negatives")


class Encoder(nn.Module):
    """Tiny MLP encoder; its dropout stands in for LoRA dropout, so pass 2 must replay pass 1's masks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def make_batch(batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of queries, positives and K hard negatives each (flattened), and which negatives exist."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch_size, K, generator=g) > 0.3  # (B, K) some samples miss negatives
    return {
        "query": torch.randn(batch_size, D_IN, generator=g),
        "positive": torch.randn(batch_size, D_IN, generator=g),
        "negatives": torch.randn(batch_size * K, D_IN, generator=g),  # (B * K, D_IN)
        "mask": mask,
        "keys": torch.arange(batch_size) % 3,  # (B,) positives' content keys: duplicates, across ranks too
    }


def contrastive(loss: InfoNCE, mask: torch.Tensor, keys: torch.Tensor | None = None):
    """The loss on {group: embeddings}, negatives reshaped to (B, K, D); `keys`: the positives' content
    keys (for a loss that masks false negatives)."""

    def loss_fn(emb: dict[str, torch.Tensor]):
        negatives = emb["negatives"].view(mask.shape[0], K, -1)
        return loss(emb["query"], emb["positive"], negatives, mask, keys)

    return loss_fn


def plain_step(encode, batch, loss_fn, chunk_size: int) -> torch.Tensor:
    """Full-batch loss with one backward; chunks encoded in GradCache's order so dropout draws match."""
    emb = {name: torch.cat([encode(c) for c in split_batch(batch[name], chunk_size)]) for name in GROUPS}
    loss = loss_fn(emb).loss
    loss.backward()
    return loss.detach()


def cache_step(encode, batch, loss_fn, chunk_size: int, loss_parameters=(), **hooks) -> torch.Tensor:
    inputs = {name: batch[name] for name in GROUPS}
    loss, _ = GradCache(chunk_size, **hooks).step(encode, inputs, loss_fn, loss_parameters)
    return loss


def grads(*modules: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for m in modules for p in m.parameters()]
    for m in modules:
        m.zero_grad(set_to_none=True)
    return out


def assert_rel_close(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float) -> None:
    for a, e in zip(actual, expected, strict=True):
        rel = ((a - e).norm() / e.norm()).item()
        assert rel < tol, f"relative error {rel:.2e} >= {tol:.0e}"


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
def test_matches_plain_full_batch_with_dropout(chunk_size, device):
    torch.manual_seed(0)
    model = Encoder().to(device)
    loss = InfoNCE(temperature=0.05, learnable_temperature=True, gather=False).to(device)
    batch = {name: value.to(device) for name, value in make_batch(6).items()}
    loss_fn = contrastive(loss, batch["mask"])

    torch.manual_seed(123)  # seeds the CUDA generators too
    expected_loss = plain_step(model, batch, loss_fn, chunk_size)
    expected = grads(model, loss)
    torch.manual_seed(123)
    actual_loss = cache_step(model, batch, loss_fn, chunk_size, loss_parameters=[loss.logit_scale])
    actual = grads(model, loss)

    assert not actual_loss.requires_grad
    assert actual_loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert_rel_close(actual, expected, 1e-5)


def test_dropout_draws_change_the_gradient():
    """Guards the test above: replaying the wrong masks would be caught, since masks move gradients."""
    torch.manual_seed(0)
    model, batch = Encoder(), make_batch(6)
    loss_fn = contrastive(InfoNCE(temperature=0.05, gather=False), batch["mask"])
    torch.manual_seed(123)
    plain_step(model, batch, loss_fn, 3)
    first = grads(model)
    torch.manual_seed(124)
    plain_step(model, batch, loss_fn, 3)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(grads(model), first, 1e-3)


def test_bf16_autocast():
    """Embeddings arrive in bf16; the cache matches the plain step to bf16 rounding (eps 7.8e-3)."""
    torch.manual_seed(0)
    model, batch = Encoder(), make_batch(6)
    loss_fn = contrastive(InfoNCE(temperature=0.05, gather=False), batch["mask"])
    seen: list[torch.dtype] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        emb = model(x)
        seen.append(emb.dtype)
        return emb

    torch.manual_seed(123)
    plain_step(encode, batch, loss_fn, 4)
    fp32 = grads(model)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(123)
        plain_step(encode, batch, loss_fn, 4)
        expected = grads(model)
        torch.manual_seed(123)
        cache_step(encode, batch, loss_fn, 4)
        actual = grads(model)
    assert set(seen) == {torch.bfloat16}
    # The two paths round in different places (one bf16 backward vs per-chunk backwards summed in fp32).
    assert_rel_close(actual, expected, 1e-2)
    assert_rel_close(actual, fp32, 2e-2)


def test_no_sync_wraps_forward_and_backward_of_all_but_the_last_chunk():
    torch.manual_seed(0)
    model, batch = Encoder(), make_batch(5)
    loss_fn = contrastive(InfoNCE(gather=False), batch["mask"])
    syncing = {"off": False}
    forwards: list[bool] = []
    backwards: list[bool] = []

    @contextmanager
    def no_sync():
        syncing["off"] = True
        yield
        syncing["off"] = False

    def encode(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            forwards.append(syncing["off"])
        return model(x)

    def backward(surrogate: torch.Tensor) -> None:
        backwards.append(syncing["off"])
        surrogate.backward()

    cache_step(encode, batch, loss_fn, 2, backward=backward, no_sync=no_sync)
    chunks = 3 + 3 + 5  # query 2+2+1, positive 2+2+1, negatives 10 = 5 x 2
    assert forwards == backwards == [True] * (chunks - 1) + [False]


def test_ready_chunks_and_empty_groups():
    torch.manual_seed(0)
    model, batch = Encoder().eval(), make_batch(4)
    received: list[set[str]] = []

    def loss_fn(emb: dict[str, torch.Tensor]):
        received.append(set(emb))
        return InfoNCE(gather=False)(emb["query"], emb["positive"])

    inputs = {
        "query": [batch["query"][:1], batch["query"][1:]],  # ready chunks of uneven size
        "positive": batch["positive"],
        "negatives": batch["negatives"][:0],  # no hard negatives in this batch
    }
    loss, output = GradCache(3).step(model, inputs, loss_fn)
    assert received == [{"query", "positive"}]
    assert loss.item() == pytest.approx(output.loss.item())


def test_split_batch():
    batch = {"input_ids": torch.arange(10).view(5, 2), "texts": list("abcde"), "pixel_values": None}
    chunks = split_batch(batch, 2)
    assert [c["texts"] for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert torch.equal(chunks[2]["input_ids"], torch.tensor([[8, 9]]))
    assert all(c["pixel_values"] is None for c in chunks)
    with pytest.raises(ValueError, match="differ in length"):
        split_batch({"a": torch.zeros(3), "b": [1, 2]}, 2)


# ----- DDP, 2 processes, gloo -----

WORLD, LOCAL_B, CHUNK, SEED = 2, 4, 3, 100


def local_batch(full: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s rows of the global batch; the flattened negatives have K rows per sample."""
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    negative_rows = slice(rank * LOCAL_B * K, (rank + 1) * LOCAL_B * K)
    return {
        "query": full["query"][rows],
        "positive": full["positive"][rows],
        "negatives": full["negatives"][negative_rows],
        "mask": full["mask"][rows],
        "keys": full["keys"][rows],
    }


def _ddp_worker(rank: int, out_dir: str) -> None:
    # A file store, not MASTER_PORT: no race for a free port with other test runs on the machine. The
    # timeout turns a stuck collective into an error instead of a hung test run.
    store, timeout = f"file://{Path(out_dir) / 'store'}", timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timeout)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(Encoder())
    calls = {"allreduce": 0}

    def counting_allreduce(state: None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls["allreduce"] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    batch = local_batch(make_batch(WORLD * LOCAL_B), rank)
    loss_fn = contrastive(InfoNCE(temperature=0.05), batch["mask"])
    results = {}

    torch.manual_seed(SEED + rank)
    plain_step(ddp, batch, loss_fn, LOCAL_B * K)  # one DDP forward per group, one backward
    results["plain"], results["plain_calls"] = grads(ddp), calls["allreduce"]

    calls["allreduce"] = 0
    torch.manual_seed(SEED + rank)
    cache_step(ddp, batch, loss_fn, CHUNK, no_sync=ddp.no_sync)
    results["cache"] = grads(ddp)
    cache_step(ddp, batch, loss_fn, CHUNK, no_sync=ddp.no_sync)  # a second step: reducer state is sound
    results["cache_calls"] = calls["allreduce"]

    calls["allreduce"] = 0
    cache_step(ddp, batch, loss_fn, CHUNK)
    results["calls_without_no_sync"] = calls["allreduce"]
    grads(ddp)

    masking = contrastive(InfoNCE(temperature=0.05, mask_false_negatives=True), batch["mask"], batch["keys"])
    torch.manual_seed(SEED + rank)
    cache_step(ddp, batch, masking, CHUNK, no_sync=ddp.no_sync)
    results["masked"] = grads(ddp)

    try:
        gather_with_grad(torch.zeros(2 + rank, 3))
    except ValueError as error:
        results["unequal_batch_error"] = str(error)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # both ranks are done with every collective
    # Leave at once: tearing down the DDP reducer and the gloo group in destructors once hung a worker at
    # exit (seen in CI), long after its results were saved.
    os._exit(0)


def _single_process_reference(chunk_size: int, mask_false_negatives: bool = False) -> list[torch.Tensor]:
    """Gradient of the mean loss over the concatenated global batch, each rank's slice encoded as it was."""
    torch.manual_seed(0)
    model, full = Encoder(), make_batch(WORLD * LOCAL_B)
    emb: dict[str, list[torch.Tensor]] = {name: [] for name in GROUPS}
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        local = local_batch(full, rank)
        for name in GROUPS:
            emb[name] += [model(c) for c in split_batch(local[name], chunk_size)]
    loss_fn = contrastive(InfoNCE(temperature=0.05, gather=False, mask_false_negatives=mask_false_negatives),
                          full["mask"], full["keys"])
    loss_fn({name: torch.cat(chunks) for name, chunks in emb.items()}).loss.backward()
    return grads(model)


def test_ddp_gathered_loss_equals_single_process_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    plain_reference = _single_process_reference(LOCAL_B * K)
    cache_reference = _single_process_reference(CHUNK)
    masked_reference = _single_process_reference(CHUNK, mask_false_negatives=True)
    assert any((m - c).norm() > 1e-4 for m, c in zip(masked_reference, cache_reference, strict=True))
    for r in results:
        assert_rel_close(r["masked"], masked_reference, 1e-5)  # (d) false negatives masked across ranks
        assert_rel_close(r["plain"], plain_reference, 1e-5)  # (a) sync-grad gather + DDP average
        assert_rel_close(r["cache"], cache_reference, 1e-5)  # (b) the same through the gradient cache
        # (c) one all-reduce per step (per bucket) with no_sync, versus one per chunk without it
        assert r["plain_calls"] >= 1
        assert r["cache_calls"] == 2 * r["plain_calls"]
        chunks = 2 + 2 + 3  # query 3+1, positive 3+1, negatives 8 = 3+3+2
        assert r["calls_without_no_sync"] == chunks * r["plain_calls"]
        assert "equal local batch sizes" in r["unequal_batch_error"]
