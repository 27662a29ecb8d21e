"""The real entry point, end to end: `python train.py fit --config configs/demo.yaml` with tiny overrides."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mme5.checkpoint import load_encoder
from mme5.demo.world import WorldConfig, build_world
from mme5.quiet import LOG_RECORDS, SRUN_HINT, WARNINGS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_py_fit_runs_the_demo_recipe_end_to_end(tmp_path, tiny):
    root = tmp_path / "run"  # trainer.default_root_dir: every path of the recipe derives from it
    build_world(root / "world", WorldConfig(train_samples=48, eval_queries=3, eval_candidates=4, xtd_images=5,
                                            v2_queries=2, languages=("en", "es", "zh")), progress=False)
    shutil.copytree(tiny("qwen2_vl"), root / "backbone")  # the demo's family: it reads the world's clips
    command = [sys.executable, "train.py", "fit", "--config", "configs/demo.yaml",
               "--trainer.default_root_dir", str(root), "--trainer.log_every_n_steps", "1",
               "--trainer.enable_progress_bar", "false", "--data.batch_size", "16", "--model.chunk_size", "4",
               "--data.num_workers", "0", "--model.input_format.max_length", "64",
               # max_steps from the manifests: one pass over the 48 samples at 16 a step
               "--trainer.max_steps", "-1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    # mme5.quiet reached train.py: none of the framework messages it silences
    silenced = [w[0] for w in [*WARNINGS, SRUN_HINT]] + [record[1] for record in LOG_RECORDS]
    assert not [p for p in silenced if re.search(p, result.stderr)], result.stderr

    saved = yaml.safe_load((root / "tensorboard" / "config.yaml").read_text())
    assert saved["model"]["backbone"] == str(root / "backbone")  # the override reached the interpolations
    assert saved["trainer"]["plugins"] == [{"class_path": "mme5.checkpoint.AtomicCheckpointIO"}]

    events = EventAccumulator(str(root / "tensorboard"))
    events.Reload()
    logged = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert logged["train/loss"] == [0, 1, 2]
    assert "max_steps = 3: 1 epoch(s) of 48 samples at 16 x 1 a step" in result.stderr + result.stdout
    assert logged["eval/mmeb/Overall"] == [0] and logged["eval/xtd/mean_r10"] == [0]  # the step-0 baseline
    assert logged["eval/mmeb-v2/Overall"] == [0] and logged["eval/mmeb-v2/video"] == [0]

    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)  # plain types only
    assert checkpoint["datamodule_hyper_parameters"]["sources"][0]["path"] == str(root / "world" / "train")
    loaded = load_encoder(root / "checkpoints" / "last.ckpt")
    assert loaded.recipe["global_step"] == 3
    data = loaded.recipe["datamodule_hyper_parameters"]
    assert data["batch_size"] == 16 and data["chunk_size"] == 4  # linked from model.chunk_size
    # one input format for training collation, in-training evaluation and the loaded checkpoint
    assert data["input_format"] == checkpoint["hyper_parameters"]["input_format"]
    assert data["input_format"]["max_length"] == loaded.encoder.adapter.max_length == 64
    assert loaded.encoder.embed([]).shape == (0, loaded.encoder.dim)
