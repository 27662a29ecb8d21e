"""Collectives the training loop needs beyond the strategy's: gradient averaging, gathering rank state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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
