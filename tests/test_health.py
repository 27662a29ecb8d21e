"""Training health: the metrics against brute force on known embeddings, and the monitor's warnings."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mme5.health import (
    CHANCE_LOSS,
    LOSS_OVER_CHANCE,
    MARGIN,
    QUERY_COS,
    TARGET_COS,
    HealthMonitor,
    batch_health,
    mean_pairwise_cosine,
)
from mme5.losses import InfoNCE

ROOT = Path(__file__).resolve().parents[1]


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def brute_mean_cosine(x):
    n = x.shape[0]
    return sum(float(x[i] @ x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


@pytest.mark.parametrize("rows, expected", [
    (torch.ones(5, 4) / 2, 1.0),  # all identical: collapsed
    (torch.eye(6), 0.0),  # orthogonal
    (torch.cat([torch.eye(3), -torch.eye(3)]), -0.2),  # three antipodal pairs: -1 over 5 others each
])
def test_mean_pairwise_cosine_of_known_embeddings(rows, expected):
    assert mean_pairwise_cosine(rows.sum(0), torch.tensor(float(len(rows)))).item() == pytest.approx(expected,
                                                                                                       abs=1e-6)


def test_mean_pairwise_cosine_matches_brute_force():
    x = unit(7, 5, seed=3)
    got = mean_pairwise_cosine(x.sum(0), torch.tensor(7.0)).item()
    assert got == pytest.approx(brute_mean_cosine(x), abs=1e-6)


def test_batch_health_matches_brute_force_with_masked_candidates():
    """Chance counts what each query really sees: its own positive, the other positives not masked as false
    negatives (same key), its real hard negatives."""
    q, p, n = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(5, 2, 8, seed=4)
    keys = torch.tensor([0, 1, 0, 2, 0])  # three positives share a label text
    mask = torch.tensor([[1, 1], [0, 0], [1, 0], [0, 1], [0, 0]]).bool()
    out = InfoNCE(temperature=0.05, gather=False, mask_false_negatives=True)(q, p, n, mask, keys)
    health = batch_health(out)

    seen, margins = [], []
    for i in range(5):
        scores = [float(q[i] @ p[j]) for j in range(5) if j != i and keys[j] != keys[i]]
        scores += [float(q[i] @ n[i, k]) for k in range(2) if mask[i, k]]
        seen.append(1 + len(scores))
        if scores:
            margins.append(float(q[i] @ p[i]) - max(scores))
    chance = sum(math.log(c) for c in seen) / 5
    assert seen == [5, 5, 4, 6, 3]
    assert health[CHANCE_LOSS].item() == pytest.approx(chance, rel=1e-6)
    assert health[LOSS_OVER_CHANCE].item() == pytest.approx(out.loss.item() / chance, rel=1e-5)
    assert health[MARGIN].item() == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert health[QUERY_COS].item() == pytest.approx(brute_mean_cosine(q), abs=1e-6)
    assert health[TARGET_COS].item() == pytest.approx(brute_mean_cosine(p), abs=1e-6)


def test_identical_embeddings_score_at_chance():
    same = unit(1, 8).expand(6, 8)  # 6 queries, positives and 3 negatives each, all one embedding
    health = batch_health(InfoNCE(temperature=0.05, gather=False)(same, same, same[:, None].expand(6, 3, 8)))
    assert health[LOSS_OVER_CHANCE].item() == pytest.approx(1.0, rel=1e-6)
    assert health[CHANCE_LOSS].item() == pytest.approx(math.log(9), rel=1e-6)
    assert health[QUERY_COS].item() == pytest.approx(1.0, abs=1e-6)
    assert health[MARGIN].item() == pytest.approx(0.0, abs=1e-6)


AT_CHANCE = {LOSS_OVER_CHANCE: 0.98, QUERY_COS: 0.5, TARGET_COS: 0.3}
LEARNING = {LOSS_OVER_CHANCE: 0.6, QUERY_COS: 0.5, TARGET_COS: 0.3}


def test_monitor_waits_for_warmup_and_patience_then_rate_limits():
    monitor = HealthMonitor(warmup_steps=5, patience=3, repeat_every=4)
    warned = {step: monitor.observe(step, AT_CHANCE) for step in range(1, 13)}
    assert [step for step, messages in warned.items() if messages] == [8, 12]  # steps 6-8, then every 4
    assert "not dropped below 95% of its chance value for 3 steps (steps 6-8)" in warned[8][0]
    assert "learning rate" in warned[8][0] and "temperature" in warned[8][0]  # names the likely causes

    assert monitor.observe(13, LEARNING) == []  # the stretch ends
    assert monitor.observe(14, AT_CHANCE) == [] and monitor.observe(15, AT_CHANCE) == []
    assert "(steps 14-16)" in monitor.observe(16, AT_CHANCE)[0]  # a new stretch, patience again
    summary = monitor.summary()
    assert "2 problem(s)" in summary and "(steps 6-12)" in summary and "(steps 14-16)" in summary


def test_monitor_state_survives_a_resume(tmp_path):
    """Saved in the checkpoint (plain types: it loads with weights_only): a stretch that began before the
    resume goes on after it, and the summary covers the whole run."""
    monitor = HealthMonitor(warmup_steps=0, patience=3, repeat_every=100)
    for step in range(1, 5):
        monitor.observe(step, AT_CHANCE)
    torch.save(monitor.state_dict(), tmp_path / "state.pt")
    resumed = HealthMonitor(warmup_steps=0, patience=3, repeat_every=100)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.observe(5, AT_CHANCE) == []  # warned at step 3 already: rate-limited
    assert "1 problem(s)" in resumed.summary() and "(steps 1-5)" in resumed.summary()


def test_monitor_reports_collapse_of_either_side():
    monitor = HealthMonitor(warmup_steps=0, patience=2, collapse_cosine=0.99)
    collapsed = LEARNING | {TARGET_COS: 0.995}
    assert monitor.observe(1, collapsed) == []
    (message,) = monitor.observe(2, collapsed)
    assert "targets' embeddings have collapsed" in message and "0.9950 > 0.99" in message


def test_monitor_summary_of_a_healthy_run_gives_the_last_metrics():
    monitor = HealthMonitor(warmup_steps=0, patience=1)
    assert monitor.observe(1, LEARNING) == []
    assert monitor.summary() == ("training health: no warning; at the last step loss_over_chance 0.600, "
                                 "query_mean_cos 0.500, target_mean_cos 0.300")


# ---------------------------------------------------------------- through train.py

def classification_shards(folder, distinct_images: bool):
    """48 image → label-word pairs, each label its own: every query one image (nothing to learn from it,
    the loss cannot go below chance), or each its own colour (learnable)."""
    from helpers import image_bytes

    from mme5.data.schema import Modality, Sample, Side, Task
    from mme5.data.shards import ShardWriter

    with ShardWriter(folder, max_count=16) as writer:
        for i in range(48):
            color = (i * 53 % 256, i * 97 % 256, i * 31 % 256) if distinct_images else (120, 120, 120)
            query = Side(instruction="Name the colour.", image=image_bytes(color))
            writer.write(Sample(id=f"c{i}", task=Task.CLASSIFICATION, modality=Modality.I2T, language="en",
                                source="unit", query=query, positive=Side(text=f"colour number {i}")))
    return folder


def train_briefly(root, backbone, shards, steps=30):
    """`train.py fit --config configs/own_data.yaml` for `steps` steps of 8 on `shards`; (stderr, result)."""
    command = [sys.executable, "train.py", "fit", "--config", "configs/own_data.yaml",
               "--trainer.default_root_dir", str(root), "--model.backbone", str(backbone),
               "--data.sources", f"[{{path: {shards}}}]", "--trainer.max_steps", str(steps),
               "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
               "--data.batch_size", "8", "--model.chunk_size", "8", "--data.num_workers", "0",
               "--model.input_format.max_length", "32", "--model.warmup", "5",
               "--model.lr", "1e-3",  # "test" model: learns colours in 30 steps (own_data.yaml: 3e-4)
               "--health.warmup_steps", "10", "--health.patience", "15"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr + result.stdout


def test_a_run_that_cannot_learn_is_warned_about(tmp_path, tiny_mllama):
    """One image for every query, a different label for each: the loss cannot go below chance."""
    log = train_briefly(tmp_path / "run", tiny_mllama, classification_shards(tmp_path / "shards", False))
    assert ("training health at step 25: the loss has not dropped below 95% of its chance value for 15 "
            "steps (steps 11-25): loss / chance = 1.0") in log
    assert "the queries' embeddings have collapsed for 15 steps" in log
    assert "training health: 2 problem(s) during this run" in log  # the summary at the end of training
    assert log.count("Likely causes: a learning rate") == 3


def test_a_run_that_learns_is_not_warned_about(tmp_path, tiny_mllama):
    """Each query its own colour: the loss falls below chance (from 2.6 times it at step 0, the untrained
    model's sharp scores), and the query images (cosine 0.996 untrained) spread within the warm-up."""
    log = train_briefly(tmp_path / "run", tiny_mllama, classification_shards(tmp_path / "shards", True))
    assert "training health: no warning; at the last step loss_over_chance 0." in log
    assert "training health at step" not in log
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for tag in (LOSS_OVER_CHANCE, CHANCE_LOSS, QUERY_COS, TARGET_COS, MARGIN):
        assert len(events.Scalars(tag)) == 30, tag
    assert events.Scalars(CHANCE_LOSS)[-1].value == pytest.approx(math.log(8))  # 8 labels, no negatives
