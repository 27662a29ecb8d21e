"""Train an mmE5-style embedding model.

    python train.py fit --config configs/demo.yaml                 # the embedded default, on CPU
    python train.py fit --config configs/demo.yaml --ckpt_path last   # resume the latest run
    python train.py fit --config ... --ckpt_path newest   # resume from this run's newest checkpoint, if any
    python train.py fit --config configs/mme5_llama32v_11b.yaml    # the paper's recipe (GPUs)

Global contrastive batch = data.batch_size × trainer.devices × trainer.num_nodes; every query is scored
against all of those positives plus its own `data.num_negatives` hard negatives. The gradient cache
(model.gradient_cache) keeps memory at one chunk of `model.chunk_size` items whatever the batch size.
"""

from pathlib import Path

import lightning as L
import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mme5.checkpoint import checkpoint_problem
from mme5.data.datamodule import ShardDataModule
from mme5.module import EmbeddingModule
from mme5.preemption import SlurmRequeue


class TrainCLI(LightningCLI):
    """The project's CLI: EmbeddingModule + ShardDataModule, OmegaConf interpolation in the recipes."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        # "omegaconf+": interpolations resolve after the command line is merged, so an override such as
        # `--trainer.default_root_dir runs/b` reaches every `${trainer.default_root_dir}/...` path of a
        # recipe (plain "omegaconf" resolves each file as it loads, and would keep the YAML's folder).
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)  # the recipes write ${trainer.x}
        super().__init__(
            EmbeddingModule,
            ShardDataModule,
            parser_kwargs={"parser_mode": "omegaconf+"},
            # Checkpoints written beside their target and renamed: never a torn last.ckpt (see the class).
            trainer_defaults={"plugins": [{"class_path": "mme5.checkpoint.AtomicCheckpointIO"}]},
            auto_configure_optimizers=False,  # AdamW + warmup/decay come from the model's own settings
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        # One backbone, input format and chunk size for both: the data module collates with the model's
        # processor and input format, in chunks of the size the gradient cache encodes.
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.input_format", "data.input_format")
        parser.link_arguments("model.chunk_size", "data.chunk_size")

    def before_fit(self) -> None:
        # Under SLURM the warning signal checkpoints at a step boundary and requeues (inert elsewhere).
        self.trainer.callbacks.append(SlurmRequeue())
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") in ("newest", "last"):
            config["ckpt_path"] = newest_checkpoint(self.trainer, prefer_last=config["ckpt_path"] == "last")
        if self.trainer.max_steps == -1:
            epochs = self.config[self.subcommand].trainer.max_epochs or 1
            steps = steps_for_epochs(self.trainer, self.datamodule, epochs)
            self.trainer.fit_loop.epoch_loop.max_steps = steps


def steps_for_epochs(trainer: L.Trainer, datamodule: ShardDataModule, epochs: int) -> int:
    """`trainer.max_steps: -1`: as many steps as `epochs` passes over the sources take at the global batch
    (the manifests' sample counts, each source capped at its max_samples), as the reference trains."""
    world = trainer.world_size
    steps = epochs * datamodule.steps_per_epoch(world)
    rank_zero_info(f"max_steps = {steps}: {epochs} epoch(s) of {datamodule.samples_per_epoch()} samples at "
                   f"{datamodule.batch_size} x {world} a step")
    return steps


def newest_checkpoint(trainer: L.Trainer, prefer_last: bool = False) -> str | None:
    """The most recently written loadable checkpoint of this run, or None to start afresh.

    Candidates: the `hpc_ckpt_<n>.ckpt` that Lightning writes on SLURM's warning signal and everything the
    ModelCheckpoint callbacks wrote. Lightning's own choice looks at one kind only (`hpc` when present,
    or `last`), so a job requeued after a node failure, with no fresh `hpc_ckpt`, would restart from an
    older checkpoint or from step 0. `prefer_last` (`--ckpt_path last`): `last*.ckpt` files first. A
    candidate that is not a loadable checkpoint (torn, empty) is passed over with a warning naming it.
    """
    folders = {(Path(trainer.default_root_dir), "hpc_ckpt_*.ckpt")}
    folders |= {(Path(cb.dirpath), "*.ckpt") for cb in trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and cb.dirpath}
    found = [path for folder, pattern in folders for path in folder.glob(pattern) if path.is_file()]
    found.sort(key=lambda path: (prefer_last and path.name.startswith("last"), path.stat().st_mtime),
               reverse=True)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        rank_zero_warn(f"{path} is not a loadable checkpoint ({problem}); trying the next newest")
    return None


def main(args: list[str] | None = None) -> None:
    TrainCLI(args)
    # Tear the process group down while the interpreter is whole: left to destructors at exit, gloo's threads
    # can die with "terminate called without an active exception" (SIGABRT), failing a finished SLURM job.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
