"""MMEB-V2 aggregates and the leaderboard submission JSON (VLM2Vec `experiments/report_score_v2.py`).

Every mean is over DATA SETS, never over the means of groups: a meta-task's mean is over its sets, a
modality's over its sets (what report_score_v2.py prints), and Overall over all 78 (VLM2Vec-V2: 36 image
at 64.9, 18 video at 34.6, 24 visdoc at 69.2 give All 59.2, the mean over sets, not 56.2 over modalities).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from statistics import fmean
from typing import Any

from mme5.eval.mmeb_v2.registry import MMEB_V2, MODALITIES, V2Set
from mme5.eval.registry import OVERALL, PARTIAL_MEAN

# report_score_v2.py renames the page sets it reads from the fixed annotations ("temp fix").
LEADERBOARD_NAMES = {"MMLongBench-page": "MMLongBench-page-fixed", "ViDoSeek-page": "ViDoSeek-page-fixed"}
MISSING_SET = "FILE_N/A"  # the reference's marker: this set's `_score.json` is absent
MISSING_MODALITY = "DIR_N/A"  # ... and: no result of this modality at all


def main_score(scores: Mapping[str, float], data_set: V2Set) -> float:
    """The reported metric of a set from its full score dict (hit@1, or ndcg_linear@5 for visdoc)."""
    try:
        return scores[data_set.metric]
    except KeyError:
        raise KeyError(f"data set {data_set.name}: no {data_set.metric!r} in its scores {sorted(scores)}") \
            from None


def aggregate(scores: Mapping[str, float], sets: Sequence[V2Set] = MMEB_V2) -> dict[str, float | None]:
    """Means of per-set main scores: each meta-task, each modality, and Overall.

    `scores`: set name -> main score (any unit; the means keep it). Only sets present count (a group
    with none is None); the mean over all sets is `Overall` only when every set of `sets` is present,
    else `PARTIAL_MEAN`, which no leaderboard compares.
    """
    present = [s for s in sets if s.name in scores]

    def mean(group: list[V2Set]) -> float | None:
        return fmean(scores[s.name] for s in group) if group else None

    out: dict[str, float | None] = {}
    for modality in MODALITIES:
        tasks = dict.fromkeys(s.meta_task for s in sets if s.modality == modality)
        out |= {task: mean([s for s in present if s.meta_task == task]) for task in tasks}
        out[modality] = mean([s for s in present if s.modality == modality])
    out[OVERALL if len(present) == len(sets) else PARTIAL_MEAN] = mean(present)
    return out


def leaderboard_json(metadata: Mapping[str, Any], set_scores: Mapping[str, Mapping[str, float]],
                     sets: Sequence[V2Set] = MMEB_V2, generated: datetime | None = None) -> dict[str, Any]:
    """The submission file report_score_v2.py writes: {"metadata": metadata + report_generated_date,
    "metrics": {modality: {set name: its full score dict, or a missing marker}}}.

    `set_scores`: set name -> every metric of that set as `_score.json` holds it (fractions, num_pred...).
    metadata: the reference's fields (model_name, model_backbone, model_size, embedding_dimension,
    max_length_tokens, model_release_date, data_source, url), passed through.
    """
    metrics: dict[str, dict[str, Any]] = {}
    for modality in MODALITIES:
        group = [s for s in sets if s.modality == modality]
        absent = MISSING_SET if any(s.name in set_scores for s in group) else MISSING_MODALITY
        metrics[modality] = {LEADERBOARD_NAMES.get(s.name, s.name): dict(set_scores.get(s.name) or {})
                             or absent for s in group}
    stamp = (generated or datetime.now()).isoformat()
    return {"metadata": {**metadata, "report_generated_date": stamp}, "metrics": metrics}
