"""MMEB-V2 as a `Benchmark`: the selected sets of a fetched root read by their modality's reader, each
ranking scored by its graded metrics, summarised as VLM2Vec's `report_score_v2.py` reports them.

Layout: what `python -m mme5.data.fetch --dataset mmeb-v2 --out ROOT` writes (`image-tasks/`,
`video-tasks/`, `visdoc-tasks/<set>/`). Scores (percentages in `scores.json`): hit, recall, MRR and
linear NDCG at 1/5/10 per set, its main score (hit@1, or ndcg_linear@5 for visdoc), and the means per
meta-task, per modality and over all sets (`aggregate.aggregate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mme5.backbones import InputFormat
from mme5.eval.mmeb_v2.aggregate import aggregate, main_score
from mme5.eval.mmeb_v2.readers import frames_folder, read_image, read_video
from mme5.eval.mmeb_v2.registry import MMEB_V2, MODALITIES, REGISTRY_FILE, V2Set, v2_registry_of
from mme5.eval.mmeb_v2.visdoc import read_visdoc
from mme5.eval.registry import once_each, unknown_names
from mme5.eval.retrieval import Ranked, RetrievalSet
from mme5.eval.rows import data_identity
from mme5.eval.run import Summary
from mme5.files import OWNER_RECORD, read_owner

FETCH_COMMAND = "mme5.data.fetch"  # its owner record's command (mme5.data.fetch.COMMAND)
FETCH = f"python -m {FETCH_COMMAND} --dataset mmeb-v2 --out {{root}}"


@dataclass(frozen=True)
class SetReader:
    """How one modality's sets are read from the root: `read(root, spec, max_queries)`; `rows(root, spec)`,
    the folder of the set's rows (part of the data's identity); `media(root, spec)`, the folder of its
    frames or images (None: they sit with the rows). Both must exist before the model loads: a set not
    fetched is named then, not after hours of encoding the sets before it."""

    read: Callable[[Path, V2Set, int | None], RetrievalSet]
    rows: Callable[[Path, V2Set], Path]
    media: Callable[[Path, V2Set], Path] | None = None


def refuse_unfinished_fetch(root: Path) -> None:
    """Refuse a root that a fetch is writing or stopped writing: an archive cut mid-unpack leaves videos
    with some of their frames, which would be scored as shorter videos, silently."""
    record = read_owner(root)
    if record and record.get("command") == FETCH_COMMAND and not record.get("complete"):
        raise ValueError(f"{root}: the fetch writing it has not completed (its record {OWNER_RECORD}, "
                         f"updated {record.get('updated')}, says so): a stopped unpack leaves videos short "
                         f"of frames; rerun `{FETCH.format(root=root)}` with the --modalities it was given "
                         "(it resumes), or wait for the one running")


def visdoc_folder(root: Path, spec: V2Set) -> Path:
    return root / "visdoc-tasks" / spec.name


def annotation_repo(root: Path, spec: V2Set) -> Path:
    return root / "annotations" / spec.annotations.repo


def image_folder(root: Path, spec: V2Set) -> Path:
    return root / "image-tasks"


def video_folder(root: Path, spec: V2Set) -> Path:
    return root / "video-tasks" / "frames" / frames_folder(spec)


def read_visdoc_set(root: Path, spec: V2Set, max_queries: int | None = None) -> RetrievalSet:
    return read_visdoc(visdoc_folder(root, spec), spec, max_queries)


READERS: dict[str, SetReader] = {
    "image": SetReader(read_image, annotation_repo, image_folder),
    "video": SetReader(read_video, annotation_repo, video_folder),
    "visdoc": SetReader(read_visdoc_set, visdoc_folder),
}


def with_relevance(data: RetrievalSet) -> RetrievalSet:
    """The set with every ranking graded: one with no `relevance` gets its gold alone, at grade 1."""
    rankings = {}
    for key, ranking in data.rankings.items():
        if ranking.relevance is None:
            relevance = torch.zeros(ranking.candidates.shape)  # (Q, C)
            relevance[torch.arange(len(ranking.gold)), ranking.gold] = 1.0
            ranking = replace(ranking, relevance=relevance)
        rankings[key] = ranking
    return replace(data, rankings=rankings)


def select(subsets: Sequence[str] | None, modalities: Sequence[str] | None,
           sets: Sequence[V2Set] = MMEB_V2) -> list[V2Set]:
    """The sets of the registry `sets` named in `subsets` (all by default) of the `modalities` (all by
    default), in registry order; an unknown name, or a named set outside the modalities, is an error."""
    subsets = once_each(subsets, "MMEB-V2 data set(s)")
    modalities = once_each(modalities, "MMEB-V2 modalities") or list(MODALITIES)
    if unknown := [m for m in modalities if m not in MODALITIES]:
        raise ValueError(f"unknown MMEB-V2 modality {unknown}: one of {MODALITIES}")
    registry = {s.name: s for s in sets}
    if unknown := unknown_names(subsets or [], list(registry)):
        raise ValueError(f"unknown MMEB-V2 data set(s) {', '.join(unknown)}: the registry's {len(sets)} are "
                         f"{', '.join(registry)}")
    if outside := [name for name in subsets or [] if registry[name].modality not in modalities]:
        raise ValueError(f"MMEB-V2 data set(s) {outside} are not of the modalities {modalities}")
    chosen = set(subsets) if subsets else {s.name for s in sets if s.modality in modalities}
    return [s for s in sets if s.name in chosen]


class MMEBV2:
    """MMEB-V2 on a fetched root: the selected sets, read one at a time.

    Args:
        root: the folder `mme5.data.fetch --dataset mmeb-v2` wrote, or one with its own registry
            (`<root>/sets.json`, e.g. the demo world's `mmeb-v2/`) in the same layouts.
        subsets: data sets to evaluate (default: the registry's (the 78), or those of `modalities`).
        modalities: "image", "video", "visdoc" (default: all three).
        max_queries: first N queries of each data set (a deterministic subset, e.g. during training).
    """

    name = "mmeb-v2"
    reference_ties = "descending"  # VLM2Vec-V2's eval.py: `np.argsort(-scores)`

    def __init__(self, root: str | Path, subsets: Sequence[str] | None = None,
                 modalities: Sequence[str] | None = None, max_queries: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder; fetch MMEB-V2 into it with "
                                    f"`{FETCH.format(root=self.root)}`")
        refuse_unfinished_fetch(self.root)
        self.benchmark = v2_registry_of(self.root)  # every set: All needs them all
        self.registry = select(subsets, modalities, self.benchmark)
        if unread := sorted({s.modality for s in self.registry} - set(READERS)):
            raise ValueError(f"MMEB-V2 {unread} sets have no reader yet (readers: {sorted(READERS)}); "
                             "choose --modalities among those")
        readers = {s.name: READERS[s.modality] for s in self.registry}
        needed = {s.name: [f(self.root, s) for f in (readers[s.name].rows, readers[s.name].media) if f]
                  for s in self.registry}
        if absent := {name: folder for name, folders in needed.items() for folder in folders
                      if not folder.is_dir()}:
            names = [*list(absent)[:10], *(["..."] if len(absent) > 10 else [])]
            raise FileNotFoundError(f"{self.root}: no folder for {len(absent)} MMEB-V2 data set(s) {names} "
                                    f"(e.g. {next(iter(absent.values()))}); fetch them with "
                                    f"`{FETCH.format(root=self.root)}`, or choose the ones present with "
                                    "--subsets / --modalities")
        self.folders = sorted({readers[s.name].rows(self.root, s) for s in self.registry})
        self.max_queries = max_queries
        self.notes: dict[str, dict[str, int]] = {}  # each set's, as `sets` read it

    def sets(self) -> Iterator[RetrievalSet]:
        for spec in self.registry:
            found = with_relevance(READERS[spec.modality].read(self.root, spec, self.max_queries))
            self.notes[spec.name] = found.notes  # for `summarize`
            yield found

    def identity(self) -> dict[str, Any]:
        """The data evaluated: the selected sets and a fingerprint of their rows' folders (a visdoc set's
        holds its pages; the frames and images of the others are keyed by content in the embedding cache,
        and listing millions of frames here would cost minutes)."""
        files = sorted(f for folder in self.folders for f in folder.rglob("*") if f.is_file())
        if (self.root / REGISTRY_FILE).is_file():
            files.append(self.root / REGISTRY_FILE)
        return data_identity(self.root, files) | {"sets": [s.name for s in self.registry]}

    def summarize(self, results: dict[str, Ranked]) -> Summary:
        """Every metric of each set evaluated (%), its main score, and the aggregates (an Overall only when
        every set of the registry (the 78) was)."""
        datasets = {s.name: set_entry(s, results[s.name]) | self.notes.get(s.name, {}) for s in self.registry
                    if s.name in results}
        scores = {name: entry["score"] for name, entry in datasets.items()}
        aggregates = aggregate(scores, self.benchmark)
        counts = {"evaluated": len(datasets), "in_benchmark": len(self.benchmark),
                  "max_queries": self.max_queries, "published": self.benchmark == MMEB_V2}
        return Summary(
            scores={"datasets": datasets, "sets": counts, **aggregates},
            scalars=scores | {k: v for k, v in aggregates.items() if v is not None},
        )


def set_entry(spec: V2Set, ranked: Ranked) -> dict[str, Any]:
    """One set's line of scores.json: where it belongs, its metrics in %, and its main score."""
    metrics = {key: 100.0 * values.float().mean().item() for key, values in ranked.metrics.items()}
    return {"modality": spec.modality, "meta_task": spec.meta_task, "eval_type": spec.eval_type,
            "metric": spec.metric, "score": main_score(metrics, spec), "queries": int(ranked.ranks.numel()),
            **metrics}


def input_record(input_format: InputFormat) -> dict[str, Any]:
    """What scores.json records of the model's (completed) input format: all of it, and `num_frames` beside
    it, since video scores depend on it (papers report 8 or 64)."""
    return {"input_format": asdict(input_format), "num_frames": input_format.num_frames}
