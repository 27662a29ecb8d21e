"""Framework messages a run prints that tell our users nothing, silenced one by one.

Why each, for users: docs/training.md, "Framework messages we silence".

Each filter names the exact message (a regular expression from its start) and the category or logger it comes
from, so a new or changed message of the same framework still shows. Only cases the project already handles
are listed; each says how.
"""

import logging
import os
import re
import warnings

# (message, category, why it says nothing to our users)
WARNINGS: list[tuple[str, type[Warning], str]] = [
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning,
     "the module steps its optimiser itself (gradient cache) and a checkpoint of step N is meant to hold the "
     "weights after step N: that is what resume restores"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "a deprecation inside Lightning's own pytree helper (torch 2.13): nothing a user's code calls"),
]

# Outside a SLURM job only: inside one, running without srun may be the user's mistake and the hint stays.
SRUN_HINT = (r"The `srun` command is available on your system but is not used", UserWarning,
             "slurm/*.sbatch launch through srun; a run outside a SLURM job is meant to run without it")

# (logger, message, why): informational records of Lightning's rank-zero logger.
LOG_RECORDS: list[tuple[str, str, str]] = [
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging",
     "an advertisement for a cloud logger; runs log to TensorBoard under trainer.default_root_dir"),
]


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `patterns`."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def quiet_framework() -> None:
    """Install the filters above (idempotent: a filter already installed is not added twice)."""
    chosen = WARNINGS + ([] if "SLURM_JOB_ID" in os.environ else [SRUN_HINT])
    for message, category, _why in chosen:
        warnings.filterwarnings("ignore", message=message, category=category)
    by_logger: dict[str, list[str]] = {}
    for name, message, _why in LOG_RECORDS:
        by_logger.setdefault(name, []).append(message)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
