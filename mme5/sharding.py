"""FSDP2 (`fully_shard`) of the encoder, as Lightning's `ModelParallelStrategy` expects of `configure_model`.

Each transformer block (the classes a Hugging Face model lists in `_no_split_modules`) becomes one FSDP unit,
and the encoder the root unit, so every chunk's forward is one root forward. Parameters, gradients and
optimiser state are sharded (over all ranks, or within each node: `sharding_mesh`); each block is
all-gathered just before it runs.

Every rank must run the same units the same number of times in each step, since their all-gathers and
reduce-scatters are collectives: lockstep chunks (`mme5.backbones.base.collate_chunks`) ensure it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def shards_parameters(strategy: Any) -> bool:
    """Whether a Lightning strategy shards the model (then `configure_model` applies `shard_encoder`)."""
    from lightning.pytorch.strategies import ModelParallelStrategy  # here: evaluation imports this module

    return isinstance(strategy, ModelParallelStrategy)


def is_sharded_module(module: nn.Module) -> bool:
    """Whether `module` is an FSDP unit (its forward, backward and state dict are collectives)."""
    return isinstance(module, FSDPModule)


def sharding_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh to shard over, from Lightning's (data_parallel, tensor_parallel) mesh.

    There is no tensor parallelism here: a 2-D mesh means HSDP, replicating across its first dimension and
    sharding within its second. Lightning's default sizes (data_parallel = nodes, tensor_parallel = GPUs per
    node) thus shard within each node and only all-reduce gradients across nodes; `data_parallel_size: 1`
    with `tensor_parallel_size` = world size is plain FSDP over every rank.
    """
    if mesh.ndim == 2 and mesh.size(0) == 1:
        return mesh[mesh.mesh_dim_names[1]]
    return mesh


def transformer_blocks(model: nn.Module, block_classes: set[str]) -> list[nn.Module]:
    """The modules of `model` whose class is a block, innermost first (so nested blocks shard first)."""
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in block_classes]


def shard_encoder(encoder: nn.Module, backbone: nn.Module, mesh: DeviceMesh, *,
                  param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> int:
    """`fully_shard` every block of `backbone` (inside `encoder`), then `encoder`; returns the block count.

    `param_dtype`: the dtype blocks are all-gathered and computed in (e.g. bfloat16 while LoRA weights are
    kept in float32); gradients are reduced in float32. `reshard_after_forward=False` keeps each block
    gathered from its forward to its backward: less communication, the memory of an unsharded model.
    """
    block_classes = set(getattr(backbone, "_no_split_modules", None) or ())
    blocks = transformer_blocks(encoder, block_classes)
    if not blocks:
        raise ValueError(f"{type(backbone).__name__} names no transformer blocks in `_no_split_modules` "
                         "(found none to shard)")
    mesh = sharding_mesh(mesh)
    reduce_dtype = torch.float32 if param_dtype is not None else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(encoder, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return len(blocks)


def load_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor], mesh: DeviceMesh) -> None:
    """Fill a sharded module from rank 0's full state dict; the other ranks built it on the meta device.

    So only rank 0 reads the checkpoint and holds the whole model in CPU memory; the others receive their
    shards. Buffers are broadcast as well: non-persistent ones (e.g. rotary frequencies) are in no state
    dict, and were never computed on the meta device.
    """
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    if dist.get_rank() != 0:
        module.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full_state if dist.get_rank() == 0 else {}, options=options)
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def is_sharded(parameter: torch.Tensor) -> bool:
    """A parameter FSDP shards (its gradient is reduced by FSDP, not by `average_gradients`)."""
    return isinstance(parameter, DTensor)


@contextmanager
def gradient_sync_paused(module: nn.Module) -> Iterator[None]:
    """FSDP's counterpart of DDP's `no_sync`: backward passes accumulate unsharded gradients locally, and the
    first backward after the block reduce-scatters all of them (once per step with the gradient cache)."""
    if not is_sharded_module(module):
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
