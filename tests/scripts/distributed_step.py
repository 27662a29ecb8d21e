"""Training steps under Lightning DDP or FSDP2 (2 CPU processes, gloo), recording what a test needs to check.

    python tests/scripts/distributed_step.py BACKBONE SHARDS OUT [--strategy ddp|fsdp|hsdp] [--no-cache]
        [--paper-settings] [--bf16] [--steps N] [--stop-at N] [--resume CKPT] [--mmeb ROOT]
        [--learnable-temperature] [--grad-clip NORM] [--gradient-scale global|per_rank] [--techniques]
        [--matryoshka DIM ...] [--per-source SHARDS] [--init-from CKPT]

Checkpoints land in OUT/ckpt/ (last.ckpt). Rank 0 writes OUT/result.pt about the last step: the initial
trainable weights, each rank's batch ids, the full gradients after the step's backward(s) (before the
optimiser step), how many all-reduces DDP's own reducer ran (its comm hook) and the module's explicit
averaging ran, how many reduce-scatters FSDP ran, the trainable weights after the step and its `health/*`
metrics, and each rank's batch ids of every step this process ran (`ids_per_step`).
Lightning's launcher re-runs this script for rank 1, so it must stay an importable script.
"""

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import mme5.distributed
from mme5.data.datamodule import ShardDataModule
from mme5.encoder import LoraSettings
from mme5.eval.callbacks import MMEBEval
from mme5.module import EmbeddingModule

ALLREDUCES = {"ddp": 0, "explicit": 0, "reduce_scatter": 0}
TECHNIQUES = {"hardness_mode": "all_negatives", "hardness_strength": 5.0, "false_negative_threshold": 0.995,
              "false_negative_margin": 0.005, "task_temperatures": True}  # tests/test_loss_techniques.py's


def counting_allreduce(state, bucket):
    ALLREDUCES["ddp"] += 1
    return allreduce_hook(state, bucket)


def counting_average(parameters):
    calls = average_gradients(parameters)
    ALLREDUCES["explicit"] += calls
    return calls


def counting_reduce_scatter(*args, **kwargs):
    ALLREDUCES["reduce_scatter"] += 1
    return reduce_scatter(*args, **kwargs)


average_gradients = mme5.distributed.average_gradients
mme5.distributed.average_gradients = counting_average
# FSDP2's collective (one call per FSDP unit whose gradients it reduces); its name varies with torch versions.
REDUCE_SCATTER = next(n for n in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n))
reduce_scatter = getattr(dist, REDUCE_SCATTER)
setattr(dist, REDUCE_SCATTER, counting_reduce_scatter)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter or gradient gathered whole (a collective: every rank calls it)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def trainable(module):
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class Recorder(L.Callback):
    def __init__(self, out: Path, stop_at: int | None = None, evaluation: MMEBEval | None = None):
        self.out = out
        self.stop_at = stop_at
        self.evaluation = evaluation
        self.record: dict = {}

    def on_train_start(self, trainer, module):
        if isinstance(trainer.strategy, DDPStrategy):
            # Lightning registers `ddp_comm_hook` on CUDA only; register the counting hook ourselves.
            trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.evaluation is not None and trainer.global_step == 0:  # it ran at train start
            self.record["eval"] = self.evaluation.latest
        self.record["initial"] = {n: full(p) for n, p in trainable(module)}
        ALLREDUCES.update(ddp=0, explicit=0, reduce_scatter=0)
        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, batch.ids)
        self.record["ids"] = gathered
        self.record.setdefault("ids_per_step", []).append(gathered)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.record["grads"] = {n: full(p.grad) for n, p in trainable(module) if p.grad is not None}
        self.record["allreduces"] = dict(ALLREDUCES)
        stepped = {id(q) for group in optimizer.param_groups for q in group["params"]}
        self.record["optimizer_holds_weights"] = all(id(p) in stepped for _, p in trainable(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.record["after"] = {n: full(p) for n, p in trainable(module)}
        self.record["health"] = {key: float(value) for key, value in trainer.callback_metrics.items()
                                 if key.startswith("health/")}
        self.record["global_step"] = trainer.global_step
        if trainer.global_rank == 0:
            torch.save(self.record, self.out / "result.pt")
        if trainer.global_step == self.stop_at:  # an interruption, as by preemption
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backbone")
    parser.add_argument("shards")
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "hsdp"], default="ddp",
                        help="hsdp: a 2 x 1 mesh (replicate across 2, shard within 1); fsdp: 1 x 2")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--paper-settings", action="store_true",
                        help="LoRA dropout 0.1 and gradient checkpointing (else neither)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and bf16-mixed precision")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--stop-at", type=int, default=None, help="interrupt the run after this step")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--mmeb", help="an MMEB folder to evaluate at train start (first 4 queries a set)")
    parser.add_argument("--learnable-temperature", action="store_true")
    parser.add_argument("--grad-clip", type=float, default=0.0)
    parser.add_argument("--techniques", action="store_true",
                        help="hardness on all negatives, both false-negative rules, task temperatures")
    parser.add_argument("--matryoshka", type=int, nargs="+", help="model.matryoshka_dims")
    parser.add_argument("--per-source", help="a second shard folder, and data.batch_composition: per_source")
    parser.add_argument("--gradient-scale", choices=["global", "per_rank"], default="global")
    parser.add_argument("--init-from", help="model.init_from: a LoRA checkpoint of this script's settings")
    args = parser.parse_args()
    L.seed_everything(0)
    module = EmbeddingModule(args.backbone, lora=LoraSettings(dropout=0.1 if args.paper_settings else 0.0),
                             gradient_checkpointing=args.paper_settings,
                             dtype="bfloat16" if args.bf16 else None,
                             gradient_cache=not args.no_cache, chunk_size=3, temperature=0.05, lr=1e-3,
                             learnable_temperature=args.learnable_temperature, warmup=1,
                             grad_clip=args.grad_clip, gradient_scale=args.gradient_scale,
                             matryoshka_dims=args.matryoshka, init_from=args.init_from,
                             **(TECHNIQUES if args.techniques else {}))
    sources = [{"path": path} for path in (args.shards, args.per_source) if path]
    data = ShardDataModule(sources, args.backbone, batch_size=8, num_negatives=2, chunk_size=3, num_workers=0,
                           shuffle_buffer=1, batch_composition="per_source" if args.per_source else "mixed")
    evaluation = [MMEBEval(args.mmeb, max_queries=4, batch_size=3, at_train_start=True)] if args.mmeb else []
    mesh = {"fsdp": (1, 2), "hsdp": (2, 1)}.get(args.strategy)
    strategy = (DDPStrategy() if mesh is None
                else ModelParallelStrategy(*mesh, save_distributed_checkpoint=False))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                        precision="bf16-mixed" if args.bf16 else "32-true",
                        max_steps=args.steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[*evaluation, Recorder(args.out, args.stop_at, *evaluation),
                                   ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True,
                                                   every_n_train_steps=1)])
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    # As train.py: left to destructors at exit, gloo's threads can abort the finished process ("terminate
    # called without an active exception").
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written: leave without the interpreter's teardown, where gloo's threads still abort a
    # finished process now and then on a loaded machine (seen in CI: exit -6 after a passing step).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
