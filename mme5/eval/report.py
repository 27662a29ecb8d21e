"""Markdown tables of a run, laid out like the MMEB leaderboard (and an XTD table by language)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mme5.eval.registry import META_TASKS, SPLITS

if TYPE_CHECKING:
    from mme5.eval.run import Summary

HEADLINE = (*META_TASKS, *SPLITS, "Overall")
XTD_ROWS = (("t2i", "text→image"), ("i2t", "image→text"))


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def mmeb_tables(model: str, scores: dict[str, Any]) -> list[str]:
    """The leaderboard line (meta-tasks, IND, OOD, Overall), then every data set by meta-task."""
    lines = ["## MMEB", "", f"Score: {scores['metric']} (%). Overall is the mean over all data sets.", ""]
    lines += table(["Model", *HEADLINE], [[model, *(cell(scores.get(k)) for k in HEADLINE)]])
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
    groups = [("mean", f"mean ({len(scores['paper_languages'])} paper)"),
              ("mean_all", f"mean ({len(languages)})")]
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
             "es it ko pl ru tr zh.")
    return ["## XTD", "", intro, "", *table(header, rows)]


def markdown(model: dict[str, Any], summaries: dict[str, Summary]) -> str:
    name = str(model.get("name", "model"))
    lines = [f"# Evaluation of `{name}`", ""]
    if "mmeb" in summaries:
        lines += [*mmeb_tables(name, summaries["mmeb"].scores), ""]
    if "xtd" in summaries:
        lines += [*xtd_tables(summaries["xtd"].scores), ""]
    return "\n".join(lines)
