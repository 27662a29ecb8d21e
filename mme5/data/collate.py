"""Turn a batch of samples into processor batches for the encoder, chunked for the gradient cache.

Only real hard negatives are encoded: a sample with fewer than `num_negatives` leaves masked slots, so
nothing is padded with copies and no side can shift onto another sample's row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mme5.backbones.base import Item
from mme5.data.schema import Side
from mme5.data.stream import StreamBatch

Chunks = list[dict[str, Tensor]]  # one processor batch per chunk, in item order


@dataclass
class ContrastiveBatch:
    """What one training step consumes.

    `negatives` holds the real hard negatives of all samples, sample by sample in slot order;
    `negative_mask[i, k]` says whether sample i has a k-th negative, so the negatives' embeddings
    (N, D) scatter into a (B, K, D) tensor at `negative_mask`.
    """

    query: Chunks
    positive: Chunks
    negatives: Chunks
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
    return Item(instruction=side.instruction, text=side.text, image=side.pil())


def chunked(items: Sequence[Item], size: int | None, collate: Callable[[Sequence[Item]], Mapping]) -> Chunks:
    size = size or max(len(items), 1)
    return [dict(collate(items[i : i + size])) for i in range(0, len(items), size)]


class ContrastiveCollator:
    """StreamBatch → ContrastiveBatch through a backbone adapter's `collate` (runs in dataloader workers)."""

    def __init__(self, collate_items: Callable[[Sequence[Item]], Mapping], num_negatives: int = 3,
                 chunk_size: int | None = None):
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.collate_items = collate_items
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size

    def __call__(self, batch: StreamBatch) -> ContrastiveBatch:
        samples = batch.samples
        mask = torch.zeros(len(samples), self.num_negatives, dtype=torch.bool)
        negatives: list[Item] = []
        for row, sample in enumerate(samples):
            kept = sample.negatives[: self.num_negatives]
            mask[row, : len(kept)] = True
            negatives += [side_item(side) for side in kept]
        return ContrastiveBatch(
            query=chunked([side_item(s.query) for s in samples], self.chunk_size, self.collate_items),
            positive=chunked([side_item(s.positive) for s in samples], self.chunk_size, self.collate_items),
            negatives=chunked(negatives, self.chunk_size, self.collate_items) if negatives else [],
            negative_mask=mask,
            ids=[s.id for s in samples],
            sources=[s.source for s in samples],
            tasks=[str(s.task) for s in samples],
            languages=[s.language for s in samples],
            slot=batch.slot,
            position=batch.position,
            skipped=batch.skipped,
        )
