"""Turn a batch of samples into processor batches for the encoder, chunked for the gradient cache.

Only real hard negatives are embedded: a sample with fewer than `num_negatives` leaves masked slots, so
nothing is padded with copies and no side can shift onto another sample's row. Under a sharded model the
chunks are lockstep chunks (`mme5.backbones.base.collate_chunks`): missing negatives become padding rows,
so every rank has B × K negative rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mme5.backbones.base import Chunk, Item, collate_chunks
from mme5.data.schema import Side
from mme5.data.stream import StreamBatch


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

    @property
    def size(self) -> int:
        return len(self.ids)


def side_item(side: Side) -> Item:
    return Item(instruction=side.instruction, text=side.text, image=side.pil(), prompt=side.prompt)


class ContrastiveCollator:
    """StreamBatch → ContrastiveBatch through a backbone adapter's `collate` (runs in dataloader workers).

    `lockstep`: uniform chunks for sharded models (see the module docstring).
    """

    def __init__(self, collate_items: Callable[[Sequence[Item]], Mapping], num_negatives: int = 3,
                 chunk_size: int | None = None, lockstep: bool = False):
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.collate_items = collate_items
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size
        self.lockstep = lockstep

    def __call__(self, batch: StreamBatch) -> ContrastiveBatch:
        samples = batch.samples
        mask = torch.zeros(len(samples), self.num_negatives, dtype=torch.bool)
        negatives: list[Item | None] = []  # slot by slot, sample by sample; None = no negative there
        for row, sample in enumerate(samples):
            kept = sample.negatives[: self.num_negatives]
            mask[row, : len(kept)] = True
            negatives += [side_item(side) for side in kept] + [None] * (self.num_negatives - len(kept))

        def chunks(items: Sequence[Item | None]) -> list[Chunk]:
            return collate_chunks(items, self.chunk_size, self.collate_items, self.lockstep)

        return ContrastiveBatch(
            query=chunks([side_item(s.query) for s in samples]),
            positive=chunks([side_item(s.positive) for s in samples]),
            negatives=chunks(negatives),
            negative_mask=mask,
            ids=[s.id for s in samples],
            sources=[s.source for s in samples],
            tasks=[str(s.task) for s in samples],
            languages=[s.language for s in samples],
            slot=batch.slot,
            position=batch.position,
            skipped=batch.skipped,
        )
