"""What an evaluation run leaves on disk, with Markdown tables laid out like the MMEB leaderboard (and an
XTD table by language):
    <out>/scores.json                      {"model": ..., "<benchmark>": scores, "scalars": {...},
                                            "truncated_items": items whose text this run cut to max_length}
    <out>/results.md                       leaderboard-style Markdown tables
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
                          "`np.argsort(scores)[-k:]`)."}


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
    if "xtd" in summaries:
        lines += [*xtd_tables(summaries["xtd"].scores), ""]
    return "\n".join(lines)


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
    for name, rankings in results.items():
        for key, ranked in rankings.items():
            with atomic_write(out / "predictions" / name / f"{key}.jsonl") as file:
                file.writelines(prediction_lines(ranked))
