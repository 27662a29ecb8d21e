"""Runs a benchmark: encode each set's items, rank, summarise; and writes what a run leaves on disk.

The command and the training callbacks both call `evaluate`; only the command writes files:
    <out>/scores.json                      {"model": ..., "<benchmark>": scores, "scalars": {...}}
    <out>/results.md                       leaderboard-style Markdown tables (mme5.eval.report)
    <out>/predictions/<benchmark>/<ranking>.jsonl
                                           one line a query: query index, gold rank, top-k candidate
                                           indices (positions in the query's candidate list) and scores
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from mme5.eval.encode import Embed, EmbeddingCache, encode, world
from mme5.eval.report import markdown
from mme5.eval.retrieval import Ranked, RetrievalSet, rank


@dataclass
class Summary:
    """A benchmark's outcome: nested JSON-ready scores and flat scalars (names → %) for logs and tables."""

    scores: dict[str, Any]
    scalars: dict[str, float]


class Benchmark(Protocol):
    name: str

    def sets(self) -> Iterable[RetrievalSet]: ...

    def summarize(self, results: dict[str, Ranked]) -> Summary: ...


def evaluate(benchmark: Benchmark, embed: Embed, *, sets: Iterable[RetrievalSet] | None = None,
             batch_size: int = 16, cache: EmbeddingCache | None = None, top_k: int = 10,
             progress: bool = False, lockstep: bool = False) -> tuple[Summary, dict[str, Ranked]]:
    """Scores of `benchmark` (its `sets()` unless given); results are keyed by ranking name.

    lockstep: every rank calls `embed` equally often (a sharded model's forwards are collectives).
    """
    results: dict[str, Ranked] = {}
    sets = benchmark.sets() if sets is None else sets
    for retrieval_set in tqdm(sets, desc=benchmark.name, unit="set", disable=not progress or world()[0] != 0):
        embeddings = encode(retrieval_set.items, embed, batch_size=batch_size, cache=cache,
                            namespace=f"{benchmark.name}/{retrieval_set.name}", progress=progress,
                            desc=retrieval_set.name, lockstep=lockstep)
        for key, ranking in retrieval_set.rankings.items():
            results[key] = rank(ranking, embeddings, top_k)
    return benchmark.summarize(results), results


def prediction_lines(ranked: Ranked) -> Iterable[str]:
    """JSONL of one ranking; padding columns (-inf) of short candidate lists are left out."""
    for query, (gold_rank, top, scores) in enumerate(zip(ranked.ranks, ranked.top, ranked.top_scores,
                                                         strict=True)):
        keep = torch.isfinite(scores)
        yield json.dumps({"query": query, "gold_rank": int(gold_rank), "top": top[keep].tolist(),
                          "scores": [round(s, 6) for s in scores[keep].tolist()]}) + "\n"


def write_outputs(out: str | Path, model: dict[str, Any], summaries: dict[str, Summary],
                  results: dict[str, dict[str, Ranked]]) -> None:
    """scores.json, results.md and the predictions of every benchmark run (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model} | {name: s.scores for name, s in summaries.items()}
    payload["scalars"] = {f"{name}/{k}": v for name, s in summaries.items() for k, v in s.scalars.items()}
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    (out / "scores.json").write_text(text, encoding="utf-8")
    (out / "results.md").write_text(markdown(model, summaries), encoding="utf-8")
    for name, rankings in results.items():
        for key, ranked in rankings.items():
            path = out / "predictions" / name / f"{key}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as file:
                file.writelines(prediction_lines(ranked))
