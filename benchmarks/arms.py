"""Paired training arms on the demo world, shared by the gain benchmarks (mining_gain.py, techniques.py).

An arm is a run folder under the benchmark's output that links the demo's world and backbone where
`configs/demo.yaml` looks for them, trained by `train.py fit --config configs/demo.yaml` with overrides and
scored by `python -m mme5.eval`. Arms of one seed share the data order and the initial weights (the seed
sets `seed_everything` and the stream's seed), so their difference is the switch's, not the draw's. Every
step is skipped when its output exists, and an interrupted training resumes from its newest checkpoint:
a benchmark killed at any point continues where it stopped when run again.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mme5.eval.compare import COLUMNS, V2_COLUMNS, figures, load_scores
from mme5.eval.report import table

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str) -> None:
    """A Python command of the project, from the repository root, echoed; a failure stops the benchmark."""
    print("+", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)


def arm_folder(out: Path, name: str, demo: Path) -> Path:
    """A run folder that sees the demo's world and backbone where configs/demo.yaml looks for them."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("world", "backbone"):
        link = folder / part
        if not link.exists():
            link.symlink_to((demo / part).resolve())
    return folder


def train(folder: Path, seed: int, steps: int, *overrides: str) -> Path:
    """The arm's last checkpoint: `configs/demo.yaml` + overrides, `steps` steps at `seed`, resumed from the
    folder's newest checkpoint when a previous call was interrupted, skipped when it finished."""
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not (folder / "trained").exists():
        run("train.py", "fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(folder),
            "--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.max_steps", str(steps),
            *overrides, "--ckpt_path", "newest")
        (folder / "trained").write_text(json.dumps({"seed": seed, "steps": steps, "overrides": overrides}))
    return checkpoint


def evaluate(checkpoint: Path, demo: Path, out: Path, *options: str) -> Path:
    """`python -m mme5.eval` of the checkpoint on the demo world into `out` (skipped when scored)."""
    if not (out / "scores.json").exists():
        run("-m", "mme5.eval", "--model", str(checkpoint), "--data", str(demo / "world"), "--out", str(out),
            *options)
    return out


def paired_gain(pairs: dict[str, tuple[Sequence[Path], Path]], arm: str, base: str) -> str:
    """`arm` minus `base` per pair (named by seed): the mean, the standard deviation and the pairs where the
    arm is ahead, for every score both have (MMEB-V2's too). A pair's base may be several runs: their mean
    (a merged model against the two it merges)."""
    differences: dict[str, list[float]] = {}
    for bases, scored in pairs.values():
        before = [figures(load_scores(path), v2=True) for path in bases]
        after = figures(load_scores(scored), v2=True)
        for column in (*COLUMNS, *(label for _, label in V2_COLUMNS)):
            values = [b[column] for b in before]
            if after[column] is not None and None not in values:
                differences.setdefault(column, []).append(after[column] - statistics.mean(values))
    rows = [[column, f"{statistics.mean(d):+.1f}", f"{statistics.stdev(d):.1f}" if len(d) > 1 else "–",
             f"{sum(x > 0 for x in d)}/{len(d)}"] for column, d in differences.items()]
    return "\n".join(["", f"{arm} − {base} over seeds {list(pairs)}:",
                      *table(["Score", "mean", "sd", f"seeds where {arm} > {base}"], rows)])
