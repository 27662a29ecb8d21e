"""What an evaluation run leaves on disk, with Markdown tables laid out like the MMEB leaderboard (and an
XTD table by language):
    <out>/scores.json                      {"model": ..., "<benchmark>": scores, "scalars": {...},
                                            "truncated_items": items whose text this run cut to max_length}
    <out>/results.md                       leaderboard-style Markdown tables
    <out>/leaderboard.json                 with MMEB-V2's 78 sets (not a root's own sets.json): the submission
                                           file of VLM2Vec's report_score_v2.py
    <out>/predictions/<benchmark>/<ranking>.jsonl
                                           one line a query: query index, gold rank, top-k candidate
                                           indices (positions in the query's candidate list) and scores
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mme5.eval.mmeb_v2.aggregate import leaderboard_json
from mme5.eval.mmeb_v2.registry import META_TASKS as V2_META_TASKS
from mme5.eval.mmeb_v2.registry import MODALITIES
from mme5.eval.registry import META_TASKS, OVERALL, SPLITS, mean_over_sets
from mme5.eval.retrieval import Ranked
from mme5.eval.run import Summary
from mme5.eval.xtd import paper_mean_label
from mme5.files import atomic_write, write_json

HEADLINE = (*META_TASKS, *SPLITS, OVERALL)
XTD_ROWS = (("t2i", "text→image"), ("i2t", "image→text"))
TIE_NOTES = {"pessimistic": "Ties: a candidate scoring exactly as the gold ranks above it (pessimistic).",
             "reference": "Ties: as the reference code (`--ties reference`): on MMEB the first maximum in "
                          "list order wins (its argmax), on XTD numpy's sort order decides (its "
                          "`np.argsort(scores)[-k:]`), on MMEB-V2 too (its `np.argsort(-scores)`)."}
V2_MODALITY_NAMES = {"image": "Image", "video": "Video", "visdoc": "VisDoc"}
V2_HEADLINE = tuple((key, label) for modality in MODALITIES for key, label in
                    [*((task, task) for task in V2_META_TASKS[modality]),
                     (modality, V2_MODALITY_NAMES[modality])])  # (scores key, column), as papers print
LEADERBOARD_FILE = "leaderboard.json"


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def mmeb_tables(model: str, scores: dict[str, Any]) -> list[str]:
    """The leaderboard line (meta-tasks, IND, OOD, Overall or a partial run's labelled mean), then every
    data set by meta-task."""
    label, mean = mean_over_sets(scores)
    if label == OVERALL:
        means = "Overall is the mean over all data sets."
    elif label.startswith(OVERALL):  # every set, each on its first queries
        means = f"{label}: a mean over all data sets on a sample of each, not comparable with a leaderboard."
    else:
        means = (f"Not every data set was evaluated: no Overall; the {label} and the meta-task, IND and OOD "
                 "means are over the sets evaluated.")
    lines = ["## MMEB", "", f"Score: {scores['metric']} (%). {means} "
             f"{TIE_NOTES[scores.get('ties', 'pessimistic')]}", ""]
    columns = HEADLINE[:-1]
    lines += table(["Model", *columns, label], [[model, *(cell(scores.get(k)) for k in columns), cell(mean)]])
    rows = []
    for task in META_TASKS:
        entries = [(name, e) for name, e in scores["datasets"].items() if e["meta_task"] == task]
        rows += [[task, name, e["split"], cell(e[scores["metric"]]), str(e["queries"])]
                 for name, e in entries]
        if entries:
            rows.append([f"**{task}**", "**mean**", "", f"**{cell(scores.get(task))}**", ""])
    return [*lines, "", *table(["Meta-task", "Data set", "Split", "Score", "Queries"], rows)]


def mmeb_v2_tables(model: str, scores: dict[str, Any]) -> list[str]:
    """The papers' MMEB-V2 line (four meta-tasks and the mean of each modality, then All or a partial
    run's labelled mean), then every data set evaluated with its main score and NDCG@5, Recall@5."""
    label, mean = mean_over_sets(scores)
    all_label = "All" if label == OVERALL else label
    intro = ("Score (%): hit@1 for image and video sets, ndcg_linear@5 for visual documents; every mean is "
             "over data sets (a modality's over its sets, All over every set of the registry: the 78). "
             f"{TIE_NOTES[scores.get('ties', 'pessimistic')]}")
    frames = scores.get("num_frames")
    intro += f" Frames per video: {'all' if frames is None else frames}."
    header = [label for _, label in V2_HEADLINE]
    lines = ["## MMEB-V2", "", intro, "",
             *table(["Model", *header, all_label], [[model, *(cell(scores.get(k)) for k, _ in V2_HEADLINE),
                                                     cell(mean)]])]
    rows = [[e["meta_task"], name, e["metric"], cell(e["score"]), cell(e["ndcg_linear@5"]),
             cell(e["recall@5"]), str(e["queries"])] for name, e in scores["datasets"].items()]
    header = ["Meta-task", "Data set", "Metric", "Score", "NDCG@5", "R@5", "Queries"]
    return [*lines, "", *table(header, rows)]


def xtd_tables(scores: dict[str, Any]) -> list[str]:
    """Recall@1/5/10 per language and direction, with the means over the paper's and all languages."""
    languages = list(scores["languages"])
    groups = [("mean", paper_mean_label(scores)), ("mean_all", f"mean ({len(languages)})")]
    header = ["Direction", "Metric", *languages, *(label for _, label in groups)]
    rows = []
    for direction, label in XTD_ROWS:
        for k in (1, 5, 10):
            metric = f"recall@{k}"
            values = [scores["languages"][code].get(direction, {}).get(metric) for code in languages]
            values += [(scores[group].get(direction) or {}).get(metric) for group, _ in groups]
            if any(v is not None for v in values):
                rows.append([label, f"R@{k}", *(cell(v) for v in values)])
    intro = ("Recall@k (%); P@1 = R@1. The paper reports text→image R@10 and its mean over "
             f"es it ko pl ru tr zh. {TIE_NOTES[scores.get('ties', 'pessimistic')]}")
    return ["## XTD", "", intro, "", *table(header, rows)]


def markdown(model: dict[str, Any], summaries: dict[str, Summary]) -> str:
    name = str(model.get("name", "model"))
    lines = [f"# Evaluation of `{name}`", ""]
    if "mmeb" in summaries:
        lines += [*mmeb_tables(name, summaries["mmeb"].scores), ""]
    if "mmeb-v2" in summaries:
        lines += [*mmeb_v2_tables(name, summaries["mmeb-v2"].scores), ""]
    if "xtd" in summaries:
        lines += [*xtd_tables(summaries["xtd"].scores), ""]
    return "\n".join(lines)


def mmeb_v2_leaderboard(model: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    """report_score_v2.py's submission file of an MMEB-V2 run: each set's metrics as fractions, as the
    reference's `_score.json` holds them; the metadata this run knows (the rest is for the submitter)."""
    metrics = {name: {k: v / 100.0 for k, v in entry.items() if "@" in k} | {"num_pred": entry["queries"]}
               for name, entry in scores["datasets"].items()}
    input_format = scores.get("input_format") or {}
    metadata = {"model_name": model.get("name"), "model_backbone": None, "model_size": None,
                "embedding_dimension": None, "max_length_tokens": input_format.get("max_length"),
                "num_frames": scores.get("num_frames"), "model_release_date": None,
                "data_source": None, "url": None}
    return leaderboard_json(metadata, metrics)


def prediction_lines(ranked: Ranked) -> Iterable[str]:
    """JSONL of one ranking; padding columns (-inf) of short candidate lists are left out."""
    for query, (gold_rank, top, scores) in enumerate(zip(ranked.ranks, ranked.top, ranked.top_scores,
                                                         strict=True)):
        keep = torch.isfinite(scores)
        yield json.dumps({"query": query, "gold_rank": int(gold_rank), "top": top[keep].tolist(),
                          "scores": [round(s, 6) for s in scores[keep].tolist()]}) + "\n"


def write_outputs(out: str | Path, model: dict[str, Any], summaries: dict[str, Summary],
                  results: dict[str, dict[str, Ranked]], truncated_items: int = 0) -> None:
    """scores.json, results.md and the predictions of every benchmark run (see the module docstring)."""
    out = Path(out)
    payload = {"model": model} | {name: s.scores for name, s in summaries.items()}
    payload["truncated_items"] = truncated_items
    payload["scalars"] = {f"{name}/{k}": v for name, s in summaries.items() for k, v in s.scalars.items()}
    write_json(out / "scores.json", payload)
    with atomic_write(out / "results.md") as file:
        file.write(markdown(model, summaries))
    if "mmeb-v2" in summaries and summaries["mmeb-v2"].scores["sets"]["published"]:  # the 78, not own sets
        write_json(out / LEADERBOARD_FILE, mmeb_v2_leaderboard(model, summaries["mmeb-v2"].scores))
    for name, rankings in results.items():
        for key, ranked in rankings.items():
            with atomic_write(out / "predictions" / name / f"{key}.jsonl") as file:
                file.writelines(prediction_lines(ranked))
