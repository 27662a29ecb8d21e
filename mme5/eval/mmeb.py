"""MMEB-eval read from its published layout; each query ranked against its own candidates, gold at 0.

Layout (TIGER-Lab/MMEB-eval, and the demo world's copy of it):
    <root>/<Subset>/test-*.parquet   qry_text, qry_img_path ("" if none), tgt_text (list), tgt_img_path (list)
    <root>/subsets.json              optional registry (the demo world's); without it, the 36 MMEB sets
Images: an image path in the parquet is looked up under each image source (default: `<root>` and every
`<root>/*.zip`, e.g. the published images zip, read without unpacking), first as written, then under
`eval_images/` (published paths start below that folder; the demo world's include it).
Texts are encoded as published (`Item(prompt=qry_text)`): the instruction is inside the string, which the
model gets verbatim, only the `<|image_1|>` placeholder replaced by the family's image token. Candidate
lists may differ in length per query.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mme5.eval.images import ImageStore
from mme5.eval.metrics import metrics_from_ranks
from mme5.eval.registry import MMEB as MMEB_SETS
from mme5.eval.registry import EvalSet, aggregate, load_registry, once_each, unknown_names
from mme5.eval.retrieval import Ranked, RetrievalSet, SetBuilder
from mme5.eval.rows import add_rows, data_identity, parquet_files
from mme5.eval.run import Summary

REGISTRY_FILE = "subsets.json"
IMAGE_PREFIXES = ("", "eval_images/")
SCORE = "precision@1"  # MMEB's metric (hit@1)


def registry_of(root: Path) -> tuple[EvalSet, ...]:
    """`<root>/subsets.json` when present, else the 36 MMEB data sets."""
    path = root / REGISTRY_FILE
    return load_registry(path) if path.is_file() else MMEB_SETS


class MMEB:
    """The MMEB benchmark on a folder: the selected data sets, read one at a time.

    Args:
        root: folder holding one sub-folder per data set.
        subsets: data sets to evaluate (default: every one of the registry; each must be in it; a repeat is
            dropped, with a warning).
        images: image sources, folders or .zip files (default: `root` and its .zip files).
        max_queries: first N queries of each data set (a deterministic subset, e.g. during training).
    """

    name = "mmeb"
    reference_ties = "argmax"  # VLM2Vec's and mmE5's MMEB scoring: `np.argmax(scores) == 0`

    def __init__(self, root: str | Path, subsets: Sequence[str] | None = None,
                 images: Sequence[str | Path] | None = None, max_queries: int | None = None):
        self.root = Path(root)
        self.benchmark = registry_of(self.root)  # every set: Overall needs them all
        registry = {s.name: s for s in self.benchmark}
        subsets = once_each(subsets, "MMEB data set(s)")
        unknown = unknown_names(subsets or [], list(registry))
        if unknown:
            raise ValueError(f"unknown MMEB data set(s) {', '.join(unknown)}: not in the registry of "
                             f"{self.root} ({', '.join(registry)})")
        self.registry = [registry[name] for name in subsets] if subsets else list(registry.values())
        absent = [s.name for s in self.registry if not (self.root / s.name).is_dir()]
        if absent:
            raise FileNotFoundError(f"{self.root}: no folder for data set(s) {absent}; "
                                    "choose the ones present with --subsets")
        sources = list(images) if images else [self.root, *sorted(self.root.glob("*.zip"))]
        self.images = ImageStore(sources, IMAGE_PREFIXES)
        self.max_queries = max_queries

    def sets(self) -> Iterator[RetrievalSet]:
        for spec in self.registry:
            builder = SetBuilder(spec.name, self.images)
            add_rows(builder, spec.name, parquet_files(self.root / spec.name), self.max_queries)
            yield builder.build()

    def identity(self) -> dict[str, Any]:
        """The data evaluated: the selected sets, and (fingerprint) their row files and the registry."""
        files = [f for spec in self.registry for f in parquet_files(self.root / spec.name)]
        registry = self.root / REGISTRY_FILE
        return data_identity(self.root, files + ([registry] if registry.is_file() else [])) | {
            "sets": [s.name for s in self.registry]}

    def summarize(self, results: dict[str, Ranked]) -> Summary:
        """Per data set metrics (P@1 is the score), the leaderboard aggregates (an Overall only when every set
        of the benchmark was evaluated) and how many sets were."""
        datasets = {s.name: {"meta_task": s.meta_task, "split": s.split}
                    | metrics_from_ranks(results[s.name].ranks) for s in self.registry if s.name in results}
        scores = {name: entry[SCORE] for name, entry in datasets.items()}
        aggregates = aggregate(scores, self.benchmark)
        counts = {"evaluated": len(datasets), "in_benchmark": len(self.benchmark),
                  "max_queries": self.max_queries}
        return Summary(
            scores={"metric": SCORE, "datasets": datasets, "sets": counts, **aggregates},
            scalars=scores | {k: v for k, v in aggregates.items() if v is not None},
        )
