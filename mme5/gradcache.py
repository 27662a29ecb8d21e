"""Gradient cache: a contrastive loss over a large batch with the activation memory of one chunk.

The method (Gao et al., 2021): the loss couples every sample of the batch, but its gradient w.r.t. the
parameters factorises through the embeddings, dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta). So we
(1) encode the batch chunk by chunk without autograd, (2) compute the loss on the detached embeddings and
cache dL/de_i, (3) re-encode each chunk with autograd and back-propagate the dot product of its embeddings
with their cached gradient. The parameter gradient is that of the full-batch loss, for about one extra
forward per step.

Everything model-specific goes through three hooks, so the same code serves a plain module, DDP, or a
wrapped/sharded model: `encode` (chunk -> embeddings), `backward` (e.g. Lightning's `manual_backward`,
which applies loss scaling or a strategy's backward), and `no_sync` (e.g. `DistributedDataParallel.no_sync`).
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor


class HasLoss(Protocol):
    """A loss output carrying its scalar in `.loss` (e.g. `mme5.losses.ContrastiveOutput`)."""

    loss: Tensor


Output = TypeVar("Output", bound=Tensor | HasLoss)
# A group of inputs: a tensor or a dict of per-sample fields (split by `split_batch`), or a list of chunks.
Group = Tensor | Mapping[str, Any] | Sequence[Any]


def split_batch(batch: Tensor | Mapping[str, Any], chunk_size: int) -> list[Any]:
    """Split a tensor, or a dict of per-sample tensors/lists (None fields kept as is), along dim 0.

    The last chunk is smaller when `chunk_size` does not divide the batch. Fields that are not batch-first
    (e.g. Qwen2-VL's flattened `pixel_values`) cannot be split here: hand the cache pre-made chunks instead.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(batch, Tensor):
        return [batch[i : i + chunk_size] for i in range(0, batch.shape[0], chunk_size)]
    lengths = {key: len(value) for key, value in batch.items() if value is not None}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"cannot split a batch whose fields differ in length (or are all None): {lengths}")
    size = next(iter(lengths.values()))
    return [
        {key: None if value is None else value[i : i + chunk_size] for key, value in batch.items()}
        for i in range(0, size, chunk_size)
    ]


@dataclass(frozen=True)
class RngState:
    """The global CPU and CUDA generator states, so a chunk's second forward draws the same dropout masks."""

    cpu: Tensor
    cuda: list[Tensor]

    @classmethod
    def capture(cls) -> "RngState":
        """Snapshot the CPU generator and every CUDA device's (any device may hold part of the model)."""
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators are restored afterwards, as if it never drew."""
        with torch.random.fork_rng(devices=range(len(self.cuda))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class GradCache:
    """Chunked two-pass backward: the full-batch contrastive gradient with one chunk's activations.

    `backward(surrogate)` is called once per chunk and must accumulate parameter gradients (the default,
    `Tensor.backward`, does). `no_sync()`, if given, is entered around the forward AND backward of every
    chunk but the last, so that gradients are reduced once per step, by the last chunk's backward:
    - FSDP2: `mme5.sharding.gradient_sync_paused` (it acts at backward time); the training module uses
      this, through `mme5.distributed.GradientSync`, for one reduce-scatter per step.
    - Plain DDP used directly: `DistributedDataParallel.no_sync`, with `encode` calling the wrapped module
      (its reducer decides at the end of a forward whether the coming backward all-reduces, hence the
      forward inside `no_sync` too). The training module does not take this path: it keeps DDP's reducer
      idle for the whole step and averages once, since ranks' chunks may reach different parameters.
    """

    def __init__(
        self,
        chunk_size: int,
        backward: Callable[[Tensor], Any] = Tensor.backward,
        no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.backward = backward
        self.no_sync = no_sync

    def step(
        self,
        encode: Callable[[Any], Tensor],
        inputs: Mapping[str, Group],
        loss_fn: Callable[[dict[str, Tensor]], Output],
        loss_parameters: Sequence[Tensor] = (),
    ) -> tuple[Tensor, Output]:
        """Accumulate into the parameters' `.grad` the gradient of `loss_fn` on the whole batch.

        `inputs` maps a group name ("query", "positive", "negatives", ...) to a tensor or dict (split into
        chunks of `chunk_size`) or to a list of ready chunks. `encode(chunk)` returns (n, D) embeddings;
        `loss_fn` receives {name: (N, D) float32 embeddings of the whole group}; empty groups are left out.
        `loss_parameters` are parameters used by `loss_fn` itself (a learnable temperature): their gradient
        joins the last chunk's backward, so that `backward` scales it and DDP averages it like the rest.
        Returns the detached loss and what `loss_fn` returned.
        """
        chunks = {name: self._chunks(group) for name, group in inputs.items()}
        chunks = {name: group for name, group in chunks.items() if group}
        if not chunks:
            raise ValueError(f"nothing to encode: every group of {list(inputs)} is empty")

        # (1) Encode every chunk without autograd, keeping the random state each one started from.
        states: dict[str, list[RngState]] = {name: [] for name in chunks}
        first_pass: dict[str, list[Tensor]] = {name: [] for name in chunks}
        with torch.no_grad():
            for name, group in chunks.items():
                for chunk in group:
                    states[name].append(RngState.capture())
                    first_pass[name].append(encode(chunk))  # (n, D)

        # (2) Loss on the detached full-batch embeddings (float32, autocast off); cache dL/d(embedding).
        sizes = {name: [emb.shape[0] for emb in embs] for name, embs in first_pass.items()}
        # {name: (N, D)}
        leaves = {name: torch.cat(embs).float().requires_grad_() for name, embs in first_pass.items()}
        del first_pass
        with torch.autocast(next(iter(leaves.values())).device.type, enabled=False):
            output = loss_fn(leaves)
        loss = output if isinstance(output, Tensor) else output.loss
        # Plain autograd, not `self.backward`: loss scaling is applied once, to the step (3) surrogates.
        grads = torch.autograd.grad(loss, [*leaves.values(), *loss_parameters], materialize_grads=True)
        embedding_grads, parameter_grads = grads[: len(leaves)], grads[len(leaves) :]
        cached = {name: grad.split(sizes[name]) for name, grad in zip(leaves, embedding_grads, strict=True)}

        # (3) Re-encode each chunk with autograd under its saved random state; back-propagate emb . grad.
        jobs = [(name, i) for name in chunks for i in range(len(chunks[name]))]
        for name, i in jobs:
            last = (name, i) == jobs[-1]
            with nullcontext() if last or self.no_sync is None else self.no_sync():
                with states[name][i].replay():
                    emb = encode(chunks[name][i])  # (n, D), maybe bf16 under autocast
                surrogate = (emb * cached[name][i].to(emb.dtype)).sum()  # d/d(emb) = cached gradient
                if last:  # the loss's own parameters join the one backward that DDP all-reduces
                    for p, g in zip(loss_parameters, parameter_grads, strict=True):
                        surrogate = surrogate + (p * g.to(p.dtype)).sum()
                self.backward(surrogate)
        return loss.detach(), output

    def _chunks(self, group: Group) -> list[Any]:
        """A list or tuple is taken as ready chunks; a tensor or dict is split into `chunk_size` pieces."""
        if isinstance(group, list | tuple):
            return list(group)
        return split_batch(group, self.chunk_size)
