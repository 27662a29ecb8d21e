"""The MMEB data sets (36 image tasks) with meta-task, IND/OOD membership and instruction, and the
leaderboard's aggregation: meta-task, IND and OOD means, and Overall = the mean over ALL data sets (not
the mean of the four meta-task means; a run of fewer sets has a "mean over N of M sets", never an Overall).

Instructions are informational: MMEB-eval's `qry_text` already carries its instruction, and the evaluator
encodes the text as published.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
SPLITS = ("IND", "OOD")


@dataclass(frozen=True)
class EvalSet:
    name: str  # the subset folder of MMEB-eval
    meta_task: str  # one of META_TASKS
    split: str  # "IND" (its training set is in MMEB-train) or "OOD"
    instruction: str = ""

    def __post_init__(self) -> None:
        if self.meta_task not in META_TASKS:
            raise ValueError(f"data set {self.name}: meta-task {self.meta_task!r} is not one of {META_TASKS}")
        if self.split not in SPLITS:
            raise ValueError(f"data set {self.name}: split {self.split!r} is not one of {SPLITS}")


def _sets(meta_task: str, split: str, entries: list[tuple[str, str]]) -> list[EvalSet]:
    return [EvalSet(name, meta_task, split, instruction) for name, instruction in entries]


_CLASSIFY = "Represent the given image for classification"
_QUESTION = "Represent the given image with the following question:"
_GROUND = "Select the portion of the image that follows the language expressions."

MMEB: tuple[EvalSet, ...] = tuple(
    _sets("Classification", "IND", [
        ("ImageNet-1K", _CLASSIFY),
        ("N24News", "Represent the given news image with the following caption for domain classification:"),
        ("HatefulMemes", "Represent the given image for binary classification to determine whether it "
                         "constitutes hateful speech or not"),
        ("VOC2007", "Identify the object shown in the image"),
        ("SUN397", "Identify the scene shown in the image"),
    ])
    + _sets("Classification", "OOD", [
        ("Place365", "Identify the scene shown in the image"),
        ("ImageNet-A", _CLASSIFY),
        ("ImageNet-R", _CLASSIFY),
        ("ObjectNet", "Identify the object shown in the image"),
        ("Country211", "Identify the country depicted in the image"),
    ])
    + _sets("VQA", "IND", [(name, _QUESTION) for name in
                           ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"]])
    + _sets("VQA", "OOD", [(name, _QUESTION) for name in ["ScienceQA", "VizWiz", "GQA", "TextVQA"]])
    + _sets("Retrieval", "IND", [
        ("VisDial", "Represent the given dialogue about an image, which is used for image retrieval:"),
        ("CIRR", "Given an image, find a similar everyday image with the described changes:"),
        ("VisualNews_t2i", "Retrieve an image of this news caption."),
        ("VisualNews_i2t", "Find a caption for the news in the given photo."),
        ("MSCOCO_t2i", "Find me an everyday image that matches the given caption:"),
        ("MSCOCO_i2t", "Find an image caption describing the given everyday image."),
        ("NIGHTS", "Find a day-to-day image that looks similar to the provided image."),
        ("WebQA", "Find a Wikipedia image that answers this question:"),
    ])
    + _sets("Retrieval", "OOD", [
        ("FashionIQ", "Find an image to match the fashion image and style note:"),
        ("Wiki-SS-NQ", "Find the document screenshot that can answer the given query:"),
        ("OVEN", "Retrieve a Wikipedia image-description pair that provides evidence for the question of "
                 "this image:"),
        ("EDIS", "Find a news image that matches the provided caption:"),
    ])
    + _sets("Grounding", "IND", [
        ("MSCOCO", "Select the portion of the image that isolates the object labeled as"),
    ])
    + _sets("Grounding", "OOD", [
        ("RefCOCO", _GROUND),
        ("RefCOCO-Matching", _GROUND),
        ("Visual7W-Pointing", "Select the portion of the image that answers the question"),
    ])
)


def load_registry(path: str | Path) -> tuple[EvalSet, ...]:
    """A custom registry from JSON: {"<name>": {"meta_task": ..., "split": ..., "instruction": ...}}."""
    path = Path(path)
    entries = read_json_object(path, "the data-set registry")
    sets = []
    for name, entry in entries.items():
        try:
            sets.append(EvalSet(name, entry["meta_task"], entry["split"], entry.get("instruction", "")))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: data set {name!r}: missing field {error}") from None
    return tuple(sets)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`: UTF-8, a leading byte-order mark allowed (Windows editors write one);
    anything else is a ValueError naming the file and the fault (the first byte that is not UTF-8)."""
    try:
        entries = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: cannot read {what}: not UTF-8 (byte {error.start}, "
                         f"0x{error.object[error.start]:02x}); save it as UTF-8") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read {what}: {error}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: {what} must be a JSON object {{name: entry}}, not a "
                         f"{type(entries).__name__}")
    return entries


def save_registry(sets: tuple[EvalSet, ...] | list[EvalSet], path: str | Path) -> None:
    payload = {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in sets}
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def once_each(names: Sequence[str] | None, what: str) -> list[str] | None:
    """`names` with repeats dropped (first order kept), saying so: a set listed twice must count once in
    every mean."""
    if names is None:
        return None
    distinct = list(dict.fromkeys(names))
    if len(distinct) < len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        warnings.warn(f"{what} {repeated} listed more than once: each is evaluated once", stacklevel=3)
    return distinct


def unknown_names(names: Sequence[str], known: Sequence[str]) -> list[str]:
    """Each of `names` not in `known`, quoted, with the known name it most likely misspells (case aside),
    e.g. `'MSR-VT' (did you mean 'MSR-VTT'?)`: a typo in a list of 78 names is found at a glance."""
    folded = {name.casefold(): name for name in known}
    described = []
    for name in names:
        if name in known:
            continue
        near = difflib.get_close_matches(name.casefold(), list(folded), 1, 0.6)
        described.append(repr(name) + (f" (did you mean {folded[near[0]]!r}?)" if near else ""))
    return described


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


OVERALL = "Overall"  # the mean over every data set of the benchmark
PARTIAL_MEAN = "mean_over_sets"  # a partial run's mean over the sets it evaluated: not the Overall


def aggregate(scores: dict[str, float], sets: tuple[EvalSet, ...] | list[EvalSet]) -> dict[str, float | None]:
    """Leaderboard aggregates of per-data-set scores: each meta-task, IND, OOD and Overall.

    `sets`: the benchmark's full registry. Only data sets present in `scores` count (a partial run aggregates
    what it has; an aggregate with no data set is None), and the mean over them is called Overall only when
    every set of the registry is present; a partial run's is `PARTIAL_MEAN`, which no leaderboard compares.
    """
    present = [s for s in sets if s.name in scores]
    out: dict[str, float | None] = {}
    for task in META_TASKS:
        out[task] = _mean([scores[s.name] for s in present if s.meta_task == task])
    for split in SPLITS:
        out[split] = _mean([scores[s.name] for s in present if s.split == split])
    out[OVERALL if len(present) == len(sets) else PARTIAL_MEAN] = _mean([scores[s.name] for s in present])
    return out


def mean_over_sets(scores: dict[str, Any]) -> tuple[str, float | None]:
    """The label and value of MMEB scores' mean over data sets: ("Overall", x) when every set of the
    benchmark was evaluated, else ("mean over N of M sets", x); either says when only each set's first
    queries were."""
    sets = scores.get("sets") or {}
    # A run on each set's first N queries (`--max-queries`, the training callbacks) says so in its label.
    sampled = f" (first {sets['max_queries']} queries of each set)" if sets.get("max_queries") else ""
    if OVERALL in scores:
        return OVERALL + sampled, scores[OVERALL]
    return f"mean over {sets.get('evaluated', '?')} of {sets.get('in_benchmark', '?')} sets{sampled}", \
        scores.get(PARTIAL_MEAN)
