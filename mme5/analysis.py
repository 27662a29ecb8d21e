"""Read runs' TensorBoard scalars and evaluation scores, and plot them (used by notebooks/analyze_runs.ipynb).

Everything is read from what a run wrote, never from hand-copied numbers:

* scalars from the TensorBoard event files under `<run>/tensorboard` (or `<run>` itself);
* scores from `<run>/eval/<name>/scores.json`, written by `python -m mme5.eval`;
* the synthetic data size from the run's saved `config.yaml`: the `num_samples` of each `data.sources`
  shard manifest (capped by the source's `max_samples`). Every training source counts as synthetic, so
  runs that mix in real data should pass their sizes explicitly instead.

Needs the `dev` extra (matplotlib). Plots return `matplotlib.figure.Figure` objects built without
pyplot, so they work under any backend and leave no global figure state behind.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mme5.data.shards import read_manifest
from mme5.eval.report import HEADLINE

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_TAGS = (
    ("train/loss", "training loss"),
    ("train/accuracy", "in-batch accuracy"),
    ("train/lr", "learning rate"),
    ("train/samples_per_sec", "throughput (samples/s)"),
    ("train/data_wait_sec", "data wait (s/step)"),
    ("train/step_sec", "step time (s)"),
)
XTD_MEANS = {"mean": "mean (paper langs)", "mean_all": "mean (all langs)"}
DIRECTIONS = {"t2i": "text→image", "i2t": "image→text"}
SIZE_METRICS = ("Overall", "IND", "OOD", "XTD R@10 mean (paper langs)")
Series = list[tuple[int, float]]


class Lookup(dict):
    """A dict whose missing keys raise a KeyError naming the file they were expected in and what it has."""

    def __init__(self, source: str | Path, what: str, items: Mapping[str, Any] = ()):
        super().__init__(items)
        self.source, self.what = str(source), what

    def __missing__(self, key: str) -> Any:
        names = sorted(self)
        shown = ", ".join(names[:15]) + (f", … ({len(names)} in all)" if len(names) > 15 else "")
        raise KeyError(f"{self.source}: no {self.what} {key!r} (has: {shown or 'none'})")


# ----------------------------------------------------------------------------- loading


def event_dir(run_dir: str | Path) -> Path:
    """The folder holding the run's event files: `<run>/tensorboard` as `make demo` writes, else `<run>`."""
    run_dir = Path(run_dir)
    for folder in (run_dir / "tensorboard", run_dir):
        if any(folder.glob("events.out.tfevents.*")):
            return folder
    raise FileNotFoundError(f"{run_dir}: no TensorBoard event files in tensorboard/ or the run folder")


def load_scalars(run_dir: str | Path) -> Lookup:
    """All scalar tags of a run as {tag: [(step, value), ...]}, every event kept (no downsampling)."""
    folder = event_dir(run_dir)
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    return Lookup(folder, "scalar tag", {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags
    })


def load_scores(run_dir: str | Path) -> Lookup:
    """Every evaluation of a run as {name: scores}, one per `<run>/eval/<name>/scores.json`."""
    eval_dir = Path(run_dir) / "eval"
    paths = sorted(eval_dir.glob("*/scores.json"))
    if not paths:
        raise FileNotFoundError(f"{eval_dir}: no <name>/scores.json (run `python -m mme5.eval` first)")
    return Lookup(eval_dir, "evaluation", {path.parent.name: _read_json(path) for path in paths})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config LightningCLI saved next to the run's logs (`<run>/tensorboard/config.yaml` or `<run>/`)."""
    run_dir = Path(run_dir)
    for path in (run_dir / "tensorboard" / "config.yaml", run_dir / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"{run_dir}: no config.yaml in {run_dir / 'tensorboard'} or {run_dir}")


def synthetic_data_size(run_dir: str | Path, root: str | Path = REPO_ROOT) -> int:
    """Training samples available to a run: its sources' manifest counts, each capped by `max_samples`.

    Relative source paths are resolved against `root`, the folder training ran from (the repo root).
    """
    sources = (run_config(run_dir).get("data") or {}).get("sources") or []
    if not sources:
        raise ValueError(f"{run_dir}: config.yaml lists no data.sources")
    total = 0
    for source in sources:
        try:
            count = read_manifest(Path(root) / source["path"])["num_samples"]
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{run_dir}: data.sources: {error}") from None
        total += count if source.get("max_samples") is None else min(count, source["max_samples"])
    return total


def headline(scores: Mapping[str, Any]) -> dict[str, float]:
    """The leaderboard numbers of one scores.json: MMEB meta-tasks, IND/OOD/Overall, XTD t2i R@10 means."""
    row = {key: scores["mmeb"][key] for key in HEADLINE if key in scores.get("mmeb", {})}
    for group, label in XTD_MEANS.items():
        if group in scores.get("xtd", {}):
            row[f"XTD R@10 {label}"] = scores["xtd"][group]["t2i"]["recall@10"]
    return row


# ----------------------------------------------------------------------------- plotting


def _grid(panels: int, width: float = 4.0, height: float = 3.0) -> tuple[Figure, list[Any]]:
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _curves(runs: Mapping[str, Mapping[str, Series]], panels: Sequence[tuple[str, str]], title: str,
            ylabel: str = "") -> Figure:
    """One panel per (tag, title), one line per run; a run without the tag is left out of that panel."""
    figure, axes = _grid(len(panels))
    for axis, (tag, name) in zip(axes, panels, strict=True):
        for label, scalars in runs.items():
            if tag in scalars:
                steps, values = zip(*scalars[tag], strict=True)
                axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        if not axis.lines:
            axis.text(0.5, 0.5, f"no {tag}", ha="center", va="center", transform=axis.transAxes)
        axis.set(title=name, xlabel="step", ylabel=ylabel)
        axis.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    figure.suptitle(title)
    return figure


def plot_training(runs: Mapping[str, Mapping[str, Series]]) -> Figure:
    """Loss, in-batch accuracy, learning rate and throughput against step, for {label: scalars}."""
    return _curves(runs, TRAIN_TAGS, "Training")


def plot_mmeb(runs: Mapping[str, Mapping[str, Series]]) -> Figure:
    """MMEB precision@1 per meta-task, split and Overall, as logged by the in-training eval callback."""
    return _curves(runs, [(f"eval/mmeb/{key}", key) for key in HEADLINE], "MMEB during training",
                   "precision@1 (%)")


def xtd_languages(tags: Iterable[str], k: int = 10) -> list[str]:
    """Languages with an `eval/xtd/<lang>_r<k>` tag, the means excluded."""
    pattern = re.compile(rf"^eval/xtd/(.+?)(_i2t)?_r{k}$")
    found = {match[1] for tag in tags if (match := pattern.match(tag))}
    return sorted(found - set(XTD_MEANS))


def plot_xtd(runs: Mapping[str, Mapping[str, Series]], direction: str = "t2i", k: int = 10) -> Figure:
    """XTD Recall@k per language (and the means) against step, in one direction (t2i or i2t)."""
    languages = sorted({lang for scalars in runs.values() for lang in xtd_languages(scalars, k)})
    suffix = "_i2t" if direction == "i2t" else ""
    panels = [(f"eval/xtd/{name}{suffix}_r{k}", label) for name, label in XTD_MEANS.items()]
    panels += [(f"eval/xtd/{lang}{suffix}_r{k}", lang) for lang in languages]
    return _curves(runs, panels, f"XTD {DIRECTIONS[direction]} Recall@{k} during training", f"R@{k} (%)")


def plot_xtd_final(scores: Mapping[str, Mapping[str, Any]], direction: str = "t2i",
                   metric: str = "recall@10") -> Figure:
    """Grouped bars of one XTD metric per language, one bar per evaluation in {label: scores}."""
    languages = sorted({lang for s in scores.values() for lang in s.get("xtd", {}).get("languages", {})})
    figure = Figure(figsize=(max(6.0, 0.6 * len(languages) * max(len(scores), 1)), 3.5), layout="constrained")
    axis = figure.subplots()
    width = 0.8 / max(len(scores), 1)
    for i, (label, run) in enumerate(scores.items()):
        per_language = run.get("xtd", {}).get("languages", {})
        values = [per_language.get(lang, {}).get(direction, {}).get(metric, math.nan) for lang in languages]
        axis.bar([x + i * width for x in range(len(languages))], values, width, label=label)
    axis.set_xticks([x + width * (len(scores) - 1) / 2 for x in range(len(languages))], languages)
    axis.set(title=f"XTD {DIRECTIONS[direction]} {metric} per language", ylabel=f"{metric} (%)")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize="small")
    return figure


def plot_score_vs_size(points: Mapping[str, tuple[float, Mapping[str, Any]]],
                       metrics: Sequence[str] = SIZE_METRICS) -> Figure:
    """Final scores against synthetic data size (log x), from {label: (size, scores.json contents)}."""
    figure, axes = _grid(len(metrics))
    ordered = sorted(points.items(), key=lambda item: item[1][0])
    rows = [(label, size, headline(scores)) for label, (size, scores) in ordered]
    for axis, metric in zip(axes, metrics, strict=True):
        xy = [(size, row[metric]) for _, size, row in rows if metric in row]
        if xy:
            axis.plot(*zip(*xy, strict=True), marker="o")
            for label, size, row in rows:
                if metric in row:
                    axis.annotate(label, (size, row[metric]), fontsize="x-small", xytext=(3, 3),
                                  textcoords="offset points")
        axis.set_xscale("log")
        axis.set(title=metric, xlabel="synthetic samples", ylabel="score (%)")
        axis.grid(alpha=0.3, which="both")
    figure.suptitle("Score vs synthetic data size")
    return figure
