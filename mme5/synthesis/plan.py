"""A seeded plan of what to synthesise: one (task, modality combination, language) per sample.

The plan is written to disk before any MLLM call, so that every sample has a stable id from the start:
a crashed or sharded run (one SLURM array task per shard) synthesises exactly the planned ids and can
skip those already done. Same seed and settings give the same plan file, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mme5.data.schema import Modality, Task
from mme5.files import atomic_write
from mme5.synthesis.languages import LANGUAGES, default_language_weights

# The paper's task × modality combinations (mmE5 §3.1): classification and VQA have a text target;
# retrieval covers all seven query→target combinations.
COMBINATIONS: tuple[tuple[Task, Modality], ...] = (
    (Task.CLASSIFICATION, Modality.I2T),
    (Task.CLASSIFICATION, Modality.IT2T),
    (Task.VQA, Modality.IT2T),
    (Task.RETRIEVAL, Modality.I2T),
    (Task.RETRIEVAL, Modality.IT2T),
    (Task.RETRIEVAL, Modality.T2IT),
    (Task.RETRIEVAL, Modality.T2I),
    (Task.RETRIEVAL, Modality.I2I),
    (Task.RETRIEVAL, Modality.IT2I),
    (Task.RETRIEVAL, Modality.IT2IT),
)


@dataclass(frozen=True)
class PlannedSample:
    """One sample to synthesise; `id` is stable across runs and becomes the synthesised sample's id."""

    id: str
    task: Task
    modality: Modality
    language: str  # ISO 639-1 code, a key of mme5.synthesis.languages.LANGUAGES

    @property
    def needs_images(self) -> bool:
        """Whether the query or the target has an image (the request shows the MLLM neighbour images)."""
        return "I" in self.modality.query or "I" in self.modality.target

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "task": str(self.task), "modality": str(self.modality),
             "language": self.language},
            sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, line: str) -> PlannedSample:
        row = json.loads(line)
        return cls(id=row["id"], task=Task(row["task"]), modality=Modality(row["modality"]),
                   language=row["language"])


def make_plan(
    num_samples: int,
    seed: int,
    combination_weights: Mapping[tuple[Task, Modality], float] | None = None,
    language_weights: Mapping[str, float] | None = None,
) -> list[PlannedSample]:
    """Sample `num_samples` (task, modality, language) triples with ids `syn-<seed>-<index>`.

    `combination_weights` defaults to equal weights over `COMBINATIONS` (a combination left out of a given
    mapping is never sampled); `language_weights` defaults to `default_language_weights()`. Weights are
    relative and need not sum to 1.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, found {num_samples}")
    combination_weights = combination_weights or dict.fromkeys(COMBINATIONS, 1.0)
    combos = _validated({(Task(t), Modality(m)): w for (t, m), w in combination_weights.items()},
                        set(COMBINATIONS), "combination_weights")
    language_weights = language_weights or default_language_weights()
    languages = _validated(dict(language_weights), set(LANGUAGES), "language_weights")
    rng = random.Random(seed)
    combo_keys, combo_w = list(combos), list(combos.values())
    lang_keys, lang_w = list(languages), list(languages.values())
    plan = []
    for index in range(num_samples):
        task, modality = rng.choices(combo_keys, combo_w)[0]
        language = rng.choices(lang_keys, lang_w)[0]
        plan.append(PlannedSample(f"syn-{seed}-{index}", task, modality, language))
    return plan


def _validated(weights: dict, allowed: set, name: str) -> dict:
    """Weights with unknown keys and negative or all-zero values rejected, in a stable key order."""
    unknown = [k for k in weights if k not in allowed]
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}")
    negative = {k: w for k, w in weights.items() if w < 0}
    if negative:
        raise ValueError(f"{name}: weights must be >= 0, found {negative}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{name}: weights sum to 0, nothing to sample")
    return {k: weights[k] for k in sorted(weights, key=str)}


def write_plan(plan: Iterable[PlannedSample], path: str | os.PathLike) -> Path:
    """Write the plan as JSONL atomically: readers see the old file or the complete new one."""
    with atomic_write(path) as f:
        for sample in plan:
            f.write(sample.to_json() + "\n")
    return Path(path)


def read_plan(path: str | os.PathLike) -> list[PlannedSample]:
    """Read a plan written by `write_plan`; a bad line is reported with its file and line number."""
    plan = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                plan.append(PlannedSample.from_json(line))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}:{number}: not a planned sample ({e!r})") from None
    return plan


def split(plan: list[PlannedSample], num_shards: int, shard_index: int) -> list[PlannedSample]:
    """The samples of shard `shard_index` of `num_shards` (round-robin, so shards differ by at most one)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need num_shards >= 1 and 0 <= shard_index < num_shards, found "
                         f"num_shards={num_shards}, shard_index={shard_index}")
    return plan[shard_index::num_shards]


def summary(plan: Iterable[PlannedSample]) -> dict[str, dict[str, int]]:
    """Counts per task, per modality, per task/modality combination and per language (most common first)."""
    plan = list(plan)
    counts = {
        "task": Counter(str(s.task) for s in plan),
        "modality": Counter(str(s.modality) for s in plan),
        "combination": Counter(f"{s.task}/{s.modality}" for s in plan),
        "language": Counter(s.language for s in plan),
    }
    return {name: dict(counter.most_common()) for name, counter in counts.items()}
