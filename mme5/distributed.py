"""Collectives the training loop needs beyond the strategy's: the gradient-sync policy of a run, gradient
averaging, gathering rank state."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mme5.sharding import gradient_sync_paused, is_sharded, is_sharded_module


@dataclass
class GradientSync:
    """How a step's backward passes become the global-batch gradient on every rank; one per run.

    Replicated (one device or DDP): DDP's reducer stays idle for the whole step (`no_sync`), and every
    gradient is averaged once, after all backward passes (`average_gradients` says why). Sharded (FSDP2):
    FSDP reduce-scatters the sharded parameters' gradients; with adapters, `between_chunks` pauses that
    during all gradient-cache chunks but the last, so it happens once per step; replicated parameters (a
    learnable temperature) are averaged here.

    Use as one block around everything that runs backward in a step:
        with sync.step(module.parameters()): ...
    """

    ddp: DistributedDataParallel | None = None
    between_chunks: Callable[[], AbstractContextManager[Any]] | None = None

    @classmethod
    def for_run(cls, wrapped: nn.Module, encoder: nn.Module, has_adapters: bool) -> GradientSync:
        """The policy for a model as the strategy wrapped it (`wrapped`) around `encoder`."""
        if is_sharded_module(encoder):
            # Adapters' gradients are small: accumulate them unsharded over the chunks and reduce-scatter
            # once per step. Full fine-tuning keeps reduce-scattering every chunk, so that no rank ever
            # holds the whole model's gradient.
            return cls(between_chunks=(lambda: gradient_sync_paused(encoder)) if has_adapters else None)
        return cls(ddp=wrapped if isinstance(wrapped, DistributedDataParallel) else None)

    @contextmanager
    def step(self, parameters: Iterable[nn.Parameter]) -> Iterator[None]:
        """The block of one step's backward passes; on leaving it normally, gradients are global.

        DDP's `no_sync` is entered here, inside the DDP forward that runs `training_step`: Lightning's
        forward redirection disarms the reducer after that forward under manual optimisation, and
        `manual_backward` only arms it when sync is required, which this block turns off.
        """
        with self.ddp.no_sync() if self.ddp is not None else nullcontext():
            yield
        # Under DDP the mean over ranks of each rank's gradient, which with InfoNCE's sync-grad gather is
        # the gradient of the global-batch mean loss (see mme5.losses.InfoNCE); FSDP's reduce-scatter has
        # averaged the sharded ones the same way.
        average_gradients(p for p in parameters if not is_sharded(p))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise sum of `tensor` over all ranks (a collective: all ranks must call it); the tensor
    itself when torch.distributed is not initialised."""
    if rank_and_world()[1] == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def from_all_ranks(obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order (a collective: all ranks must call it); `[obj]` if not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def average_gradients(parameters: Iterable[nn.Parameter], bucket_bytes: int = 256 * 1024**2) -> int:
    """Replace each parameter's gradient by its mean over all ranks; returns the number of all-reduces.

    Why not DDP's reducer: a contrastive step runs several backward passes (one per gradient-cache chunk)
    and a rank's chunk may not touch every parameter (a text-only chunk never reaches the vision tower).
    DDP fires its all-reduce once every parameter's hook has fired, so ranks whose chunks differ in
    modality would all-reduce at different passes and deadlock. Averaging once, after all passes, from a
    flat buffer (missing gradients count as zeros) is the same on every rank whatever the batch held.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    world = dist.get_world_size()
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    calls = 0
    for bucket in _buckets(params, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # (sum of numels,)
        dist.all_reduce(flat)
        calls += 1
        flat /= world
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
    return calls


def _buckets(params: list[nn.Parameter], limit: int) -> list[list[nn.Parameter]]:
    """Consecutive groups of same-dtype, same-device parameters, each at most `limit` bytes (or one)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = buckets[-1] if buckets else None
        if last and last[0].dtype == p.dtype and last[0].device == p.device and size + nbytes <= limit:
            last.append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets
