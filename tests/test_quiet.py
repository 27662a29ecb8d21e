"""mme5.quiet: a short Lightning run of a manual-optimisation module prints none of the silenced messages,
and does print them without the filters (so each filter still matches what Lightning says)."""

import logging
import warnings

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import slurm
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from mme5 import quiet

MESSAGES = ["The `srun` command is available", "Using ModelCheckpoint with manual optimization",
            "`isinstance(treespec, LeafSpec)` is deprecated", "💡 Tip: For seamless cloud logging"]


class ManualStep(L.LightningModule):
    """One linear layer stepped by hand, as mme5.module steps its optimiser."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.layer(batch[0]).pow(2).mean()
        self.manual_backward(loss)
        optimizer.step()
        self.log("loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def short_run_output(tmp_path, monkeypatch, install: bool) -> str:
    """Warnings and rank-zero log records of a 2-step fit with a checkpoint every step, on a machine where
    srun exists but this process is no SLURM job."""
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(logger, "filters", [])  # quiet's filter leaves with the test
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if install:
                quiet.quiet_framework()
            trainer = L.Trainer(max_steps=2, accelerator="cpu", default_root_dir=tmp_path,
                                logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                                enable_model_summary=False,
                                callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)])
            trainer.fit(ManualStep(), data)
    finally:
        logger.removeHandler(handler)
    return "\n".join([str(w.message) for w in caught] + records)


def test_a_short_run_prints_none_of_the_silenced_messages(tmp_path, monkeypatch):
    loud = short_run_output(tmp_path / "loud", monkeypatch, install=False)
    assert all(message in loud for message in MESSAGES), loud  # what Lightning says today
    quiet_output = short_run_output(tmp_path / "quiet", monkeypatch, install=True)
    assert not [message for message in MESSAGES if message in quiet_output], quiet_output
    assert "GPU available" in quiet_output  # other records of the same logger still show


@pytest.mark.parametrize("job", ["123", None])
def test_the_srun_hint_stays_inside_a_slurm_job(monkeypatch, job):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    if job is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.quiet_framework()
        slurm.SLURMEnvironment._validate_srun_used()
    assert any("srun" in str(w.message) for w in caught) == (job is not None)
