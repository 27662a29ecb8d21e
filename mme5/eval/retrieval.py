"""The one shape every evaluation takes: distinct items, and rankings of queries against candidate lists.

MMEB (each query against its own list, gold at 0) and XTD (each caption against all images, and back)
both become a `RetrievalSet`, so they share one encoding path and one scorer. Items are interned: each
distinct (instruction, text, published prompt, image) gets one row and is encoded once per set, however
many rankings and candidate lists name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mme5.eval.images import ImageRef, ImageStore, MissingImageError
from mme5.eval.metrics import gold_ranks
from mme5.eval.mmeb_v2.frames import frame_refs
from mme5.eval.mmeb_v2.metrics import query_metrics, ranked_order


@dataclass(frozen=True)
class ItemSpec:
    """An item to embed, its image or video frames referenced (not loaded): hashable, cheap to hold by the
    thousand."""

    instruction: str = ""
    text: str | None = None
    image: ImageRef | None = None
    prompt: str | None = None  # a published row's string, verbatim (see `Item.prompt`)
    video: tuple[ImageRef, ...] | None = None  # every frame of a frames folder, in order (`Item.video`)
    # Where the item was first read (set, file, row, field): names it in an error met while encoding it.
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Ranking:
    """Queries, each ranked against its candidate list; all entries are rows of the set's items.

    queries: (Q,); candidates: (Q, C), -1 pads a list shorter than C (and marks a labelled document that
    has no item: it scores -inf); gold: (Q,) the gold's column. relevance: (Q, C) graded relevance of
    each column where a query has several labelled documents (MMEB-V2's BEIR sets), else None (the gold
    alone is relevant).
    """

    queries: Tensor
    candidates: Tensor
    gold: Tensor
    relevance: Tensor | None = None


@dataclass
class RetrievalSet:
    """One data set: its distinct items and named rankings over them. `notes`: what its reader met that a
    reader of the scores should know (e.g. labelled documents with no page), recorded in scores.json."""

    name: str
    items: list[ItemSpec]
    rankings: dict[str, Ranking]
    notes: dict[str, int] = field(default_factory=dict)


def pad_lists(lists: Sequence[Sequence[int]]) -> Tensor:
    """Candidate lists of different lengths as a (Q, C) tensor, -1 after each list's end."""
    out = torch.full((len(lists), max((len(x) for x in lists), default=0)), -1, dtype=torch.long)
    for row, values in enumerate(lists):
        out[row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
    return out


@dataclass
class SetBuilder:
    """Interns the items of one data set while a reader walks its rows, then builds the set."""

    name: str
    images: ImageStore | None = None
    items: list[ItemSpec] = field(default_factory=list)
    rankings: dict[str, Ranking] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    _rows: dict[tuple[str, str | None, str | None, str | None, str | None], int] = field(default_factory=dict)

    def item(self, instruction: str, text: str | None, image: str | None, where: str,
             prompt: str | None = None, video: str | Path | None = None) -> int:
        """Row of the item; `where` (e.g. "row 3, tgt_img_path[2]") names it in a missing-image error.
        `prompt`: the published string of a row-format item, fed to the model verbatim. `video`: a frames
        folder, every frame of it taken (`frames.frame_refs`)."""
        key = (instruction, text or None, image or None, prompt, video and str(video))
        row = self._rows.get(key)
        if row is None:
            try:
                ref = self._image(image, where) if image else None
                frames = frame_refs(Path(video)) if video else None
            except MissingImageError as error:
                raise MissingImageError(f"{self.name}, {where}: {error}") from None
            row = self._rows[key] = len(self.items)
            self.items.append(ItemSpec(instruction, text or None, ref, prompt, frames,
                                       where=f"{self.name}, {where}"))
        return row

    def _image(self, image: str, where: str) -> ImageRef:
        if self.images is None:
            raise ValueError(f"{self.name}, {where}: image {image!r} named, but no image store set")
        return self.images.ref(image)

    def rank(self, key: str, queries: Sequence[int], candidates: Tensor | Sequence[Sequence[int]],
             gold: Tensor | Sequence[int], relevance: Tensor | None = None) -> None:
        if not isinstance(candidates, Tensor):
            candidates = pad_lists(candidates)
        self.rankings[key] = Ranking(torch.as_tensor(queries, dtype=torch.long), candidates,
                                     torch.as_tensor(gold, dtype=torch.long), relevance)

    def build(self) -> RetrievalSet:
        return RetrievalSet(self.name, self.items, self.rankings, self.notes)


@dataclass(frozen=True)
class Ranked:
    """Outcome of one ranking: gold ranks (Q,) under the run's tie rule, and the top-k
    candidate columns (Q, k) with their cosine scores, best first (order among exact ties unspecified).
    metrics: a graded ranking's per-query hit / recall / mrr / ndcg_linear at 1, 5, 10 ((Q,) each,
    `mme5.eval.mmeb_v2.metrics.query_metrics`), else None."""

    ranks: Tensor
    top: Tensor
    top_scores: Tensor
    metrics: dict[str, Tensor] | None = None


def rank(ranking: Ranking, embeddings: Tensor, top_k: int = 10, budget: int = 1 << 26,
         ties: str = "pessimistic") -> Ranked:
    """Score each query against its own candidates only, `budget` floats of candidates at a time; `ties`:
    how a candidate scoring exactly as the gold counts (`mme5.eval.metrics.RANK_RULES`).

    Scores are elementwise products summed over D (not a matmul): identical embeddings then get
    bit-identical scores wherever they sit, which both tie rules rely on. A ranking with `relevance` is
    also scored by its graded metrics, from the whole order under `ties` ("pessimistic" or "descending").
    """
    num_queries, width = ranking.candidates.shape
    step = max(1, budget // max(1, width * embeddings.shape[1]))
    ranks, tops, top_scores, metrics = [], [], [], []
    for start in range(0, num_queries, step):
        candidates = ranking.candidates[start : start + step]  # (q, C)
        queries = embeddings[ranking.queries[start : start + step]]  # (q, D)
        scores = (embeddings[candidates.clamp(min=0)] * queries[:, None, :]).sum(-1)  # (q, C)
        scores = scores.masked_fill(candidates < 0, float("-inf"))
        gold = ranking.gold[start : start + step]
        if ranking.relevance is None:
            ranks.append(gold_ranks(scores, gold, ties))
        else:
            order, graded = graded_scores(scores, ranking.relevance[start : start + step], ties)
            ranks.append((order == gold[:, None]).int().argmax(dim=1) + 1)  # the gold's place in the order
            metrics.append(graded)
        best = scores.topk(min(top_k, width), dim=1)
        tops.append(best.indices)
        top_scores.append(best.values)
    if not ranks:
        empty = torch.empty(0, 0)
        return Ranked(torch.empty(0, dtype=torch.long), empty.long(), empty)
    graded = {key: torch.cat([chunk[key] for chunk in metrics]) for key in metrics[0]} if metrics else None
    return Ranked(torch.cat(ranks), torch.cat(tops), torch.cat(top_scores), graded)


GRADED_TIES = {"pessimistic": "pessimistic", "descending": "reference"}  # rank rule -> `ranked_order`'s


def graded_scores(scores: Tensor, relevance: Tensor, ties: str) -> tuple[Tensor, dict[str, Tensor]]:
    """The candidate order (q, C) of scored rows and its per-query graded metrics; a -inf column (padding,
    a labelled document with no item) is never found."""
    if ties not in GRADED_TIES:
        raise ValueError(f"a ranking with graded relevance is ordered under one of {list(GRADED_TIES)}, "
                         f"got ties {ties!r}")
    order = ranked_order(scores, relevance, GRADED_TIES[ties])
    return order, query_metrics(order, relevance, listed=scores.cpu() > float("-inf"))
