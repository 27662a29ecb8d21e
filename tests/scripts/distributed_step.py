"""One training step under Lightning DDP (2 CPU processes, gloo), recording what a test needs to check it.

    python tests/scripts/ddp_step.py BACKBONE SHARDS OUT [--no-cache]

A checkpoint lands in OUT/ckpt/last.ckpt. Rank 0 writes OUT/result.pt: the initial trainable weights,
each rank's batch ids, the gradients after the step's backward(s) (before the optimiser step), and how
many all-reduces DDP's own reducer ran (its comm hook) and the module's explicit averaging ran.
Lightning's DDP launcher re-runs this script for rank 1, so it must stay an importable script.
"""

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import mme5.module
from mme5.data.datamodule import ShardDataModule
from mme5.encoder import LoraSettings
from mme5.module import EmbeddingModule

ALLREDUCES = {"ddp": 0, "explicit": 0}


def counting_allreduce(state, bucket):
    ALLREDUCES["ddp"] += 1
    return allreduce_hook(state, bucket)


def counting_average(parameters):
    calls = average_gradients(parameters)
    ALLREDUCES["explicit"] += calls
    return calls


average_gradients = mme5.module.average_gradients
mme5.module.average_gradients = counting_average


class Recorder(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.record: dict = {}

    def on_train_start(self, trainer, module):
        # Lightning registers `ddp_comm_hook` on CUDA only; register the counting hook ourselves.
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.record["initial"] = {n: p.detach().clone() for n, p in trainable}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        ALLREDUCES.update(ddp=0, explicit=0)
        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, batch.ids)
        self.record["ids"] = gathered

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.record["grads"] = {n: p.grad.detach().clone() for n, p in module.named_parameters()
                                if p.requires_grad and p.grad is not None}
        self.record["allreduces"] = dict(ALLREDUCES)
        if trainer.global_rank == 0:
            torch.save(self.record, self.out / "result.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backbone")
    parser.add_argument("shards")
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    L.seed_everything(0)
    module = EmbeddingModule(args.backbone, lora=LoraSettings(dropout=0.0), gradient_checkpointing=False,
                             gradient_cache=not args.no_cache, chunk_size=3, temperature=0.05, lr=1e-3,
                             warmup=1, grad_clip=0.0)
    data = ShardDataModule([{"path": args.shards}], args.backbone, batch_size=8, num_negatives=2,
                           chunk_size=3, num_workers=0, shuffle_buffer=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(),
                        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Recorder(args.out),
                                   ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True)])
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
