"""Train an mmE5-style embedding model.

    python train.py fit --config configs/demo.yaml                 # the embedded default, on CPU
    python train.py fit --config configs/demo.yaml --ckpt_path last   # resume the latest run
    python train.py fit --config ... --ckpt_path newest   # resume from this run's newest checkpoint, if any
    python train.py fit --config configs/demo.yaml --overwrite   # a new run in a folder that holds one
    python train.py fit --config configs/mme5_llama32v_11b.yaml    # the paper's recipe (GPUs)

The run folder (`trainer.default_root_dir`) belongs to one recipe and one process at a time (mme5.resume): a
fresh run where checkpoints exist, or a resume with another recipe, is refused naming what differs; settings
that may change on resume (learning rate, steps, ...) are applied and listed. The last step is always
checkpointed; SIGTERM/SIGINT checkpoint at a step boundary and exit with 128 + the signal's number.

Global contrastive batch = data.batch_size × trainer.devices × trainer.num_nodes; every query is scored
against all of those positives plus its own `data.num_negatives` hard negatives. The gradient cache
(model.gradient_cache) keeps memory at one chunk of `model.chunk_size` items whatever the batch size.
"""

import signal
import sys
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ActionYesNo, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mme5.checkpoint import checkpoint_problem, run_checkpoint_dir
from mme5.data.datamodule import ShardDataModule
from mme5.data.stream import SourceRefused
from mme5.files import OutputFolder, OutputFolderError, claim_folder, describe_changes
from mme5.health import HealthMonitor
from mme5.module import EmbeddingModule
from mme5.preemption import FinalCheckpoint, SlurmRequeue, StopOnSignal
from mme5.quiet import quiet_framework
from mme5.resume import (
    COMMAND,
    ResumeRefused,
    check_recipe,
    read_recipe,
    resume_changes,
    run_identity,
    run_outputs,
)


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
        # Always on, configured under `health:` (`--health.patience 100`): warns when the run learns nothing.
        parser.add_lightning_class_args(HealthMonitor, "health")
        parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                            help="start a new run in a run folder that holds one (without --ckpt_path): its "
                                 "checkpoints, TensorBoard logs and saved config are removed first")

    def _parse_ckpt_path(self) -> None:
        """Keep the settings given. LightningCLI replaces the whole `model.*` config by the checkpoint's
        hyper-parameters here, silently undoing `--model.lr` on resume and turning a checkpoint of another
        recipe into this run's recipe; `before_fit` checks and reports instead (`mme5.resume`). Lightning has
        no public switch for this, hence the override of its private step."""

    def before_fit(self) -> None:
        # Under SLURM the warning signal checkpoints at a step boundary and requeues (inert elsewhere);
        # SIGTERM/SIGINT checkpoint and stop; the final step is always checkpointed.
        self.stop = StopOnSignal()
        self.trainer.callbacks += [SlurmRequeue(), self.stop, FinalCheckpoint()]
        config = self.config_init[self.subcommand]
        overwrite, requested = config.get("overwrite"), config.get("ckpt_path")
        self.config[self.subcommand].overwrite = False  # never saved into the run's config.yaml as true
        if overwrite and requested:
            raise ResumeRefused(f"--overwrite starts a new run and --ckpt_path {requested} resumes one")
        if requested in ("newest", "last"):
            config["ckpt_path"] = newest_checkpoint(self.trainer, prefer_last=requested == "last")
            if config["ckpt_path"] is None:
                rank_zero_info(f"--ckpt_path {requested}: no checkpoint in this run folder; starting afresh")
                overwrite = True  # what is there (logs of a run stopped before its first checkpoint) goes
        self.datamodule.check_sources(self.trainer.world_size)  # before anything is written
        try:
            self.model.check_input_format()
        except ValueError as error:
            raise ResumeRefused(f"model.input_format: {error}") from None
        self.model.resuming = config["ckpt_path"] is not None
        if not self.model.resuming:
            try:
                self.model.check_init_from()
            except ValueError as error:
                raise ResumeRefused(str(error)) from None
            if overwrite:
                self._check_start_survives()
        # A checkpoint that cannot be resumed (missing, torn, foreign, over other data) is refused before the
        # claim, which would mark the run folder's record unfinished and name this command in it.
        recorded = None if config["ckpt_path"] is None else self._read_checkpoint(config["ckpt_path"])
        self.run_folder = self._claim_run_folder(config["ckpt_path"], overwrite)
        try:
            if self.trainer.max_steps == -1:  # first: a resume's "nothing left to train" compares with it
                epochs = self.config[self.subcommand].trainer.max_epochs or 1
                steps = steps_for_epochs(self.trainer, self.datamodule, epochs)
                self.trainer.fit_loop.epoch_loop.max_steps = steps
            if recorded is not None:
                self._check_resume(config["ckpt_path"], recorded)
        except BaseException:
            self._release_run_folder()
            raise

    def _check_start_survives(self) -> None:
        """Refuse a new run here whose `model.init_from` is one of the run folder's outputs: the claim removes
        them before the model loads its start."""
        start = self.model.hparams.init_from
        root = Path(self.trainer.default_root_dir)
        removed = [p.resolve() for pattern in run_outputs(self.trainer) for p in root.glob(pattern)]
        if start and any(p == Path(start).resolve() or p in Path(start).resolve().parents for p in removed):
            raise ResumeRefused(f"model.init_from {start} is an output of the run in {root}, which a new run "
                                "there removes first; copy it out of the run folder, or choose another "
                                "--trainer.default_root_dir")

    def _claim_run_folder(self, ckpt_path: str | None, overwrite: bool) -> OutputFolder | None:
        """Global rank 0 locks the run folder and checks its recipe (`mme5.resume`); None on other ranks."""
        if self.trainer.global_rank != 0:
            return None
        root = Path(self.trainer.default_root_dir)
        identity = run_identity(dict(self.model.hparams), self.model.backbone_identity(),
                                self.model.detected_preset(), self.model.backbone_family())
        ways_out = ("resume it with --ckpt_path last, start a new run here with --overwrite (removes its "
                    "checkpoints, TensorBoard logs and saved config), or choose another "
                    "--trainer.default_root_dir") if ckpt_path is None else (
                    "resume with the settings it was trained with, or start a new run in another "
                    "--trainer.default_root_dir")
        # A run folder from before owner records is adopted when resumed: the checkpoint's recipe is checked.
        folder = claim_folder(root, COMMAND, identity, overwrite=overwrite, resume=ckpt_path is not None,
                              ways_out=ways_out, outputs=run_outputs(self.trainer),
                              adopt=lambda _: ckpt_path is not None)
        # Released when fit ends or raises (a killed run's lock is freed by the OS, and taken over).
        self.trainer.callbacks.append(ReleaseOnException(folder))
        return folder

    def _release_run_folder(self) -> None:
        if self.run_folder is not None:
            self.run_folder.release()

    def _read_checkpoint(self, ckpt_path: str) -> dict:
        """The checkpoint's recipe (`mme5.resume.read_recipe`), refused when it cannot be read or when the
        sources no longer hold what its stream positions point into."""
        recorded = read_recipe(ckpt_path)
        if recorded["datamodule_state"] is not None:
            self.datamodule.load_state_dict(recorded["datamodule_state"])
            self.datamodule.check_sources(self.trainer.world_size)
        return recorded

    def _check_resume(self, ckpt_path: str, recorded: dict) -> None:
        """Refuse a checkpoint of another recipe; list the settings that change on resume."""
        hparams = dict(self.model.hparams)
        check_recipe(ckpt_path, recorded, hparams, self.model.backbone_identity(),
                     self.model.detected_preset(), self.model.backbone_family())
        changes = resume_changes(recorded, hparams, dict(self.datamodule.hparams))
        said = describe_changes(changes) if changes else "none"
        step = recorded["global_step"]
        rank_zero_info(f"resuming {ckpt_path} at global step {step}; settings changed since it was written "
                       f"(applied): {said}")
        later = later_checkpoints(self.trainer, Path(ckpt_path))
        if later:
            names = ", ".join(p.name for p in later[:5])
            rank_zero_warn(f"resuming {ckpt_path}, which is older than {names} of this run: that "
                           "continuation is abandoned; its checkpoints are replaced as this run reaches "
                           "their steps, and TensorBoard shows both continuations where they overlap")
        if 0 < self.trainer.max_steps <= step:
            by_epochs = self.config[self.subcommand].trainer.max_steps == -1  # max_steps from max_epochs
            setting = "trainer.max_epochs" if by_epochs else "trainer.max_steps"
            rank_zero_warn(f"trainer.max_steps is {self.trainer.max_steps} and {ckpt_path} is at step "
                           f"{step}: nothing is left to train; raise --{setting} to train further")

    def after_fit(self) -> None:
        if self.run_folder is not None and self.stop.exit_status == 0:
            self.run_folder.complete(global_step=self.trainer.global_step)
        self._release_run_folder()


class ReleaseOnException(L.Callback):
    """Frees the run folder's lock when training raises (the CLI's `after_fit` frees it otherwise)."""

    def __init__(self, folder: OutputFolder):
        self.folder = folder

    def on_exception(self, trainer: L.Trainer, *args: object) -> None:
        self.folder.release()


def later_checkpoints(trainer: L.Trainer, resumed: Path) -> list[Path]:
    """This run's checkpoints written after `resumed` (by a continuation that resuming it abandons)."""
    folder = run_checkpoint_dir(trainer)
    if not folder.is_dir() or not resumed.is_file():
        return []
    written = resumed.stat().st_mtime_ns
    return sorted((p for p in folder.glob("*.ckpt") if p.stat().st_mtime_ns > written and
                   not p.samefile(resumed)), key=lambda p: p.stat().st_mtime_ns)


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


def main(args: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (128 + the signal's number when a signal stopped training, 2
    when the run folder or the checkpoint refused the run)."""
    quiet_framework()
    try:
        cli = TrainCLI(args)
    except (OutputFolderError, SourceRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SIGTERMException:  # Lightning's handler: SIGTERM before training started (its exit status is 0)
        print("error: stopped by SIGTERM before training started", file=sys.stderr)
        return 128 + signal.SIGTERM
    # Tear the process group down while the interpreter is whole: left to destructors at exit, gloo's threads
    # can die with "terminate called without an active exception" (SIGABRT), failing a finished SLURM job.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    stop = getattr(cli, "stop", None)
    return stop.exit_status if stop is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
