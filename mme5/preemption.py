"""How a run stops: always with its last step checkpointed, and with an exit status that says whether it
finished.

- The end (`max_steps`): `FinalCheckpoint` saves `last.ckpt` at the final step unless a checkpoint was
  written at that step already (a run of 5 steps saved every 2 would otherwise end with step 4).
- SIGTERM or SIGINT (`kill`, Ctrl-C, `scancel`): `StopOnSignal` checkpoints at the next step boundary and
  stops; `train.py` then exits with 128 + the signal's number, so `train && export` and `sbatch
  --dependency=afterok` do not go on with a partial model. A second Ctrl-C interrupts at once. A signal
  that comes during the final step cuts nothing: the run finishes as complete (exit 0).
- SLURM's warning signal: `SlurmRequeue` (below).

Preemption under SLURM: the warning signal saves a checkpoint at a step boundary, then requeues the job.

Lightning's own handler saves `hpc_ckpt_<n>.ckpt` from inside the signal handler, wherever each rank happens
to be: in the middle of a step (a state no uninterrupted run ever has) and, under DDP/FSDP, possibly while
another rank waits in a collective. Here the handler only notes the signal; at the end of the current step
every rank agrees (one boolean all-reduce a step), the checkpoint is written where periodic checkpoints are
(so a resume continues exactly as an uninterrupted run), rank 0 requeues the job and training stops. The
requeued job resumes through `train.py --ckpt_path newest`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mme5.checkpoint import run_checkpoint_dir

LAST = "last.ckpt"


class FinalCheckpoint(L.Callback):
    """Saves `last.ckpt` (in the run's checkpoint folder) at the run's final step when no checkpoint was
    written at that step: `ModelCheckpoint(every_n_train_steps=n)` saves only at multiples of n."""

    def __init__(self) -> None:
        self._saved_at: int | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.global_step == 0 or self._saved_at == trainer.global_step
        if done or not trainer.checkpoint_callbacks:  # no ModelCheckpoint: checkpointing is off
            return
        path = run_checkpoint_dir(trainer) / LAST
        trainer.save_checkpoint(path)
        rank_zero_info(f"saved the final step ({trainer.global_step}) in {path}")


class StopOnSignal(L.Callback):
    """SIGTERM and SIGINT stop training at the next step boundary with `last.ckpt` saved (see the module).

    Replaces Lightning's SIGTERM handling, which ends the run at once with exit status 0 and no checkpoint.
    Every rank agrees at each step end (one boolean all-reduce), so a signal to rank 0 alone stops them all.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None  # the signal that stopped the run
        self._previous: dict[signal.Signals, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # SIGINT from the start (Lightning leaves it alone): a Ctrl-C while the run restores its checkpoint
        # or runs the step-0 evaluation stops it after the first step, with a checkpoint, as in training.
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._note)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # SIGTERM only now: Lightning installs its own handler after `on_fit_start`.
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note)
        if trainer.received_sigterm:  # noted by Lightning's handler while the run was being set up
            self.received = signal.SIGTERM
            # Handled here (checkpoint at the first step's end, exit 143): left set, Lightning would raise
            # SIGTERMException after that step too, and the run would say it stopped before training.
            trainer._signal_connector.received_sigterm = False

    def _note(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.received = signal.Signals(signum)
        print(f"received {self.received.name}: saving a checkpoint at the end of this step, then stopping",
              flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.received = self.received or signal.SIGTERM  # another rank's signal
        if 0 < trainer.max_steps <= trainer.global_step:  # it came during the final step: nothing was cut
            rank_zero_info(f"{self.received.name} during the final step ({trainer.global_step}): the run is "
                           "complete")
            self.received = None
            return
        path = run_checkpoint_dir(trainer) / LAST
        trainer.save_checkpoint(path)
        rank_zero_warn(f"{self.received.name}: stopped at global step {trainer.global_step} of "
                       f"{trainer.max_steps}; saved {path} (resume with --ckpt_path last)")
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def exit_status(self) -> int:
        """0 when no signal stopped the run, else 128 + its number (the shell's convention)."""
        return 0 if self.received is None else 128 + int(self.received)


class SlurmRequeue(L.Callback):
    """Checkpoint-and-requeue on SLURM's warning signal (`#SBATCH --signal=SIGUSR1@120`, `scancel -s USR1`).

    Inert outside SLURM and when Lightning's auto-requeue is off. Signal: the environment's `requeue_signal`
    (SIGUSR1 by default).
    """

    def __init__(self) -> None:
        self._signalled = False
        self._environment: SLURMEnvironment | None = None
        self._previous: Any = None  # the handler this one replaced, restored at teardown

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        environment.auto_requeue = False  # Lightning registers its own handler only when this is on
        self._environment = environment

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._environment is not None:
            self._previous = signal.signal(self._environment.requeue_signal, self._note)
            name = self._environment.requeue_signal.name
            rank_zero_info(f"SLURM: {name} checkpoints at the next step boundary and requeues")

    def _note(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._environment is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        for logger in trainer.loggers:  # the requeue kills the job: metrics still buffered would be lost
            logger.finalize("finished")
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"SLURM warning signal: saved {path} at global step {trainer.global_step}; requeueing")
        if trainer.is_global_zero:
            requeue()
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._environment is not None:
            if self._previous is not None:
                signal.signal(self._environment.requeue_signal, self._previous)
            self._environment.auto_requeue = True
            self._environment = None


def requeue() -> None:
    """`scontrol requeue` this job (this array task)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}; "
                       "resubmit the job to resume from the checkpoint")
