"""Runs a benchmark: encode each set's items, rank, summarise.

The command and the training callbacks both call `evaluate`; only the command writes files
(`mme5.eval.report.write_outputs`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm import tqdm

from mme5.distributed import rank_and_world
from mme5.eval.encode import Embed, EmbeddingCache, encode
from mme5.eval.metrics import TIE_RULES
from mme5.eval.retrieval import Ranked, RetrievalSet, rank
from mme5.matryoshka import truncate


@dataclass
class Summary:
    """A benchmark's outcome: nested JSON-ready scores and flat scalars (names → %) for logs and tables."""

    scores: dict[str, Any]
    scalars: dict[str, float]


class Benchmark(Protocol):
    name: str
    reference_ties: str  # how the reference code breaks ties on it (`mme5.eval.metrics.RANK_RULES`)

    def sets(self) -> Iterable[RetrievalSet]: ...

    def identity(self) -> dict[str, Any]: ...

    def summarize(self, results: dict[str, Ranked]) -> Summary: ...


def evaluate(benchmark: Benchmark, embed: Embed, *, sets: Iterable[RetrievalSet] | None = None,
             batch_size: int = 16, cache: EmbeddingCache | None = None, top_k: int = 10,
             progress: bool = False, ties: str = "pessimistic", dim: int | None = None
             ) -> tuple[Summary, dict[str, Ranked]]:
    """Scores of `benchmark` (its `sets()` unless given); results are keyed by ranking name. `ties`: the
    tie rule (`mme5.eval.metrics.TIE_RULES`), recorded in the scores. `dim`: rank by the first `dim`
    dimensions of the embeddings, normalised again (the cache keeps them whole, for any `dim`)."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    rule = benchmark.reference_ties if ties == "reference" else ties
    results: dict[str, Ranked] = {}
    sets = benchmark.sets() if sets is None else sets
    quiet = not progress or rank_and_world()[0] != 0
    for retrieval_set in tqdm(sets, desc=benchmark.name, unit="set", disable=quiet):
        empty = [key for key, ranking in retrieval_set.rankings.items() if len(ranking.queries) == 0]
        if empty or not retrieval_set.rankings:
            raise ValueError(f"{benchmark.name}/{retrieval_set.name}: no query to evaluate in "
                             f"{empty or 'any ranking'} (an empty data set, or max_queries 0); a score of "
                             "nothing would be NaN")
        embeddings = truncate(encode(retrieval_set.items, embed, batch_size=batch_size, cache=cache,
                                     namespace=f"{benchmark.name}/{retrieval_set.name}", progress=progress,
                                     desc=retrieval_set.name), dim)
        for key, ranking in retrieval_set.rankings.items():
            results[key] = rank(ranking, embeddings, top_k, ties=rule)
    summary = benchmark.summarize(results)
    summary.scores["ties"] = ties
    summary.scores["data"] = benchmark.identity()
    return summary, results
