"""Compare evaluation runs side by side: one Markdown row per `scores.json`, leaderboard columns.

    python -m mme5.eval.compare runs/demo/eval/untrained runs/demo/eval/trained

Each argument is a `scores.json` or the folder holding it. Columns: the MMEB meta-tasks, IND, OOD and
Overall, then XTD text→image Recall@10 averaged over the paper's languages and over all languages, then
(when a run has MMEB-V2) its Image, Video, VisDoc and All means. A run of fewer MMEB or MMEB-V2 sets or
paper languages has no Overall, All or paper mean: its partial mean stands there, labelled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mme5.eval.registry import OVERALL, mean_over_sets
from mme5.eval.report import HEADLINE, cell, table
from mme5.eval.xtd import covers_paper_languages, paper_mean_label
from mme5.settings import command_parser

XTD_COLUMNS = (("mean", "XTD R@10 (paper langs)"), ("mean_all", "XTD R@10 (all)"))
V2_COLUMNS = (("image", "V2 Image"), ("video", "V2 Video"), ("visdoc", "V2 VisDoc"), (OVERALL, "V2 All"))


def scores_file(run: str | Path) -> Path:
    """The scores.json of a run given as the file or its folder, resolved (two spellings of one run agree)."""
    path = Path(run).resolve()
    return path / "scores.json" if path.is_dir() else path


def load_scores(path: str | Path) -> dict[str, Any]:
    path = scores_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path}: cannot read scores: {error}") from None


COLUMNS = (*HEADLINE, *(label for _, label in XTD_COLUMNS))


def _xtd_r10(xtd: dict[str, Any], group: str) -> float | None:
    return ((xtd.get(group) or {}).get("t2i") or {}).get("recall@10")


def figures(scores: dict[str, Any], v2: bool = False) -> dict[str, float | None]:
    """The comparison's columns of one `scores.json` (None where the run has no such score: a partial run
    has no Overall, nor a mean over the paper's languages); `v2`: with the MMEB-V2 columns."""
    mmeb = scores.get("mmeb", {})
    xtd = scores.get("xtd", {})
    values = {key: mmeb.get(key) for key in HEADLINE}
    for group, label in XTD_COLUMNS:
        values[label] = _xtd_r10(xtd, group) if group != "mean" or covers_paper_languages(xtd) else None
    if v2:
        values |= {label: scores.get("mmeb-v2", {}).get(key) for key, label in V2_COLUMNS}
    return values


def row(scores: dict[str, Any], v2: bool = False) -> list[str]:
    """One run's cells; a partial run's means, labelled, where its Overall, All and paper mean would be."""
    cells = {key: cell(value) for key, value in figures(scores, v2).items()}
    mmeb, xtd, mmeb_v2 = scores.get("mmeb"), scores.get("xtd"), scores.get("mmeb-v2")
    for column, benchmark in [(OVERALL, mmeb), (V2_COLUMNS[-1][1], mmeb_v2 if v2 else None)]:
        label, mean = mean_over_sets(benchmark) if benchmark else (OVERALL, None)
        if label != OVERALL:  # a partial or sampled run: its mean, labelled
            cells[column] = f"{cell(mean)} ({label})"
    if xtd and not covers_paper_languages(xtd):
        cells[XTD_COLUMNS[0][1]] = f"{cell(_xtd_r10(xtd, 'mean'))} ({paper_mean_label(xtd)})"
    return list(cells.values())


def comparison(runs: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of {row name: scores}; the MMEB-V2 columns when any run has MMEB-V2 scores."""
    v2 = any("mmeb-v2" in scores for scores in runs.values())
    rows = [[name, *row(scores, v2)] for name, scores in runs.items()]
    columns = [*COLUMNS, *(label for _, label in V2_COLUMNS)] if v2 else list(COLUMNS)
    return "\n".join(table(["Run", *columns], rows))


def distinct_names(runs: list[str]) -> list[str]:
    """Each run's folder name, the alike ones extended by their parent folders until they differ
    (`a/eval`, `b/eval`, `x/trained` → `a/eval`, `b/eval`, `trained`)."""
    folders = [Path(r).resolve() if Path(r).is_dir() else Path(r).resolve().parent for r in runs]
    depths = [1] * len(folders)
    while True:
        names = ["/".join(folder.parts[-depth:]) for folder, depth in zip(folders, depths, strict=True)]
        alike = [i for i, name in enumerate(names)
                 if names.count(name) > 1 and depths[i] < len(folders[i].parts)]
        if not alike:
            return names
        for i in alike:
            depths[i] += 1


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="scores.json files or folders holding one")
    parser.add_argument("--names", nargs="+",
                        help="row names (default: the folder names, with their parents where two are alike)")
    args = parser.parse_args(argv)
    files = [scores_file(run) for run in args.runs]
    if repeated := sorted({str(f) for f in files if files.count(f) > 1}):
        parser.error(f"{repeated} given more than once (a folder and its scores.json are one run)")
    names = args.names or distinct_names(args.runs)
    if len(names) != len(args.runs):
        parser.error(f"{len(names)} names for {len(args.runs)} runs")
    if len(set(names)) != len(names):
        parser.error(f"row names must differ: {names}")
    print(comparison({name: load_scores(run) for name, run in zip(names, args.runs, strict=True)}))


if __name__ == "__main__":
    main()
