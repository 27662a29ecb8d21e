"""Turn a batch of samples into processor batches for the encoder, chunked for the gradient cache.

Only real hard negatives are embedded: a sample with fewer than `num_negatives` leaves masked slots, so
nothing is padded with copies and no side can shift onto another sample's row (`negative_padding="repeat"`
reproduces the reference instead: a shorter list is padded by repeating its last negative). Under a
sharded model the chunks are lockstep chunks (`mme5.backbones.base.collate_chunks`): missing negatives
become padding rows, so every rank has B × K negative rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mme5.backbones.base import Chunk, Item, collate_chunks
from mme5.data.schema import Side
from mme5.data.shards import CorruptSample
from mme5.data.stream import StreamBatch

log = logging.getLogger(__name__)
NEGATIVE_PADDING = ("mask", "repeat")


@dataclass
class ContrastiveBatch:
    """What one training step consumes.

    `negatives` holds the real hard negatives of all samples, sample by sample in slot order;
    `negative_mask[i, k]` says whether sample i has a k-th negative, so the negatives' embeddings
    (N, D) scatter into a (B, K, D) tensor at `negative_mask`.
    """

    query: list[Chunk]
    positive: list[Chunk]
    negatives: list[Chunk]
    negative_mask: Tensor  # (B, K) bool
    ids: list[str]
    sources: list[str]
    tasks: list[str]
    languages: list[str]
    slot: int = 0
    position: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    skip_errors: list[str] = field(default_factory=list)  # the slot's latest skip messages
    truncated: int = 0  # items of this slot whose text was cut to max_length so far
    positive_keys: Tensor | None = None  # (B,) int64 content keys of the positives (false-negative masking)

    @property
    def size(self) -> int:
        return len(self.ids)


def side_item(side: Side) -> Item:
    """The encoder's item of a side: its image decoded, its video as every frame's encoded bytes (the
    adapter keeps `num_frames` of them and decodes only those)."""
    return Item(instruction=side.instruction, text=side.text, image=side.pil(), prompt=side.prompt,
                video=tuple(side.video) if side.video is not None else None)


class ContrastiveCollator:
    """StreamBatch → ContrastiveBatch through a backbone adapter's `collate` (runs in dataloader workers).

    A sample the processor cannot take (any of its sides) is dropped from the batch as a whole, so queries,
    positives and negatives stay aligned; it is counted in `skipped` and logged with its shard and id
    (`strict`: raised instead). Under lockstep its slots become padding rows, so chunk counts still agree
    across ranks. `lockstep`: uniform chunks for sharded models (see the module docstring).
    `negative_padding`: "mask" (a missing negative is masked out of the loss) or "repeat" (the reference:
    a non-empty list shorter than `num_negatives` is padded with copies of its last negative).
    `truncated`: how many items `collate_items` has cut to max_length so far (an adapter's
    `truncated_count`), carried with each batch to the run's data report. `video`: the family reads video
    (`reads_video`), so a lockstep chunk also runs its video path (`mme5.backbones.base.lockstep_chunk`).
    """

    def __init__(self, collate_items: Callable[[Sequence[Item]], Mapping], num_negatives: int = 3,
                 chunk_size: int | None = None, lockstep: bool = False, strict: bool = False,
                 negative_padding: str = "mask", truncated: Callable[[], int] | None = None,
                 video: bool = False):
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if negative_padding not in NEGATIVE_PADDING:
            raise ValueError(f"negative_padding must be one of {NEGATIVE_PADDING}, got {negative_padding!r}")
        self.negative_padding = negative_padding
        self.collate_items = collate_items
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size
        self.lockstep = lockstep
        self.video = video
        self.strict = strict
        self.truncated = truncated
        self.recounted = 0  # cuts counted a second time while finding unprocessable samples
        self.unprocessable = 0  # samples dropped so far by this worker's collator
        self.unprocessable_errors: list[str] = []

    def __call__(self, batch: StreamBatch) -> ContrastiveBatch:
        counted = self._cuts()
        try:
            return self._collate(batch, frozenset())
        except Exception:
            problems = self._unprocessable(batch)
            if not problems:
                raise
        self.recounted += self._cuts() - counted  # the failed try and the probes cut items again
        message = "; ".join(problems.values())
        if self.strict:
            raise CorruptSample(message) from None
        for text in problems.values():
            log.warning("skipped: %s", text)
        self.unprocessable += len(problems)
        self.unprocessable_errors += problems.values()
        return self._collate(batch, frozenset(problems))

    def _cuts(self) -> int:
        """Items this worker's `collate_items` has cut to max_length so far, each counted once."""
        return (self.truncated() if self.truncated is not None else 0) - self.recounted

    def _unprocessable(self, batch: StreamBatch) -> dict[int, str]:
        """The samples (by row) with a side the processor refuses, each with its shard, id and the error."""
        problems = {}
        for row, sample in enumerate(batch.samples):
            for role, side in sample.sides[: 2 + self.num_negatives]:
                try:
                    self.collate_items([side_item(side)])
                except Exception as error:  # noqa: BLE001 - whatever the processor raises, the sample goes
                    url = batch.urls[row] if row < len(batch.urls) else "?"
                    problems[row] = f"{url}: sample '{sample.id}': {role} cannot be processed ({error})"
                    break
        return problems

    def _collate(self, batch: StreamBatch, dropped: frozenset[int]) -> ContrastiveBatch:
        samples = batch.samples
        kept = [s for row, s in enumerate(samples) if row not in dropped]
        mask = torch.zeros(len(kept), self.num_negatives, dtype=torch.bool)
        query: list[Item | None] = []
        positive: list[Item | None] = []
        negatives: list[Item | None] = []  # slot by slot, sample by sample; None = no negative there
        for row, sample in enumerate(samples):
            if row in dropped:  # a missing item in every slot: left out, or padding rows under lockstep
                query.append(None)
                positive.append(None)
                negatives += [None] * self.num_negatives
                continue
            negative_sides = sample.negatives[: self.num_negatives]
            if self.negative_padding == "repeat" and negative_sides:
                negative_sides += [negative_sides[-1]] * (self.num_negatives - len(negative_sides))
            mask[row - sum(r < row for r in dropped), : len(negative_sides)] = True
            query.append(side_item(sample.query))
            positive.append(side_item(sample.positive))
            negatives += [side_item(side) for side in negative_sides]
            negatives += [None] * (self.num_negatives - len(negative_sides))

        def chunks(items: Sequence[Item | None]) -> list[Chunk]:
            return collate_chunks(items, self.chunk_size, self.collate_items, self.lockstep, self.video)

        query_chunks, positive_chunks, negative_chunks = chunks(query), chunks(positive), chunks(negatives)
        return ContrastiveBatch(
            query=query_chunks,
            positive=positive_chunks,
            negatives=negative_chunks,
            negative_mask=mask,
            ids=[s.id for s in kept],
            positive_keys=torch.tensor([s.positive.content_key() for s in kept], dtype=torch.long),
            sources=[s.source for s in kept],
            tasks=[str(s.task) for s in kept],
            languages=[s.language for s in kept],
            slot=batch.slot,
            position=batch.position,
            skipped=batch.skipped + self.unprocessable,
            skip_errors=batch.skip_errors + self.unprocessable_errors[-5:],
            truncated=self._cuts(),  # after the chunks above were collated
        )
