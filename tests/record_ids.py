"""A callback for tests that run train.py in other processes (SLURM jobs): what each rank trained on."""

import json
from pathlib import Path

import lightning as L


class RecordIds(L.Callback):
    """Appends every step's sample ids to `<default_root_dir>/ids-<global rank>.jsonl`."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int):
        path = Path(trainer.default_root_dir) / f"ids-{trainer.global_rank}.jsonl"
        with path.open("a") as file:
            file.write(json.dumps({"step": trainer.global_step, "ids": batch.ids}) + "\n")
