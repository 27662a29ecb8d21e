"""Turn a batch of samples into processor batches for the encoder, chunked for the gradient cache.

Only real hard negatives are embedded: a sample with fewer than `num_negatives` leaves masked slots, so
nothing is padded with copies and no side can shift onto another sample's row.

Under a sharded model (FSDP) every rank must run the same modules the same number of times per step, since
each module's forward and backward are collectives. `lockstep=True` makes the chunks uniform across ranks:
missing negatives become placeholder rows (so every rank has B × K negative rows), and a chunk without any
image gets a placeholder image row (so the vision tower runs in every chunk). Each chunk then carries
`keep` (n,) bool, and the encoder drops the placeholder rows' embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from torch import Tensor

from mme5.backbones.base import Item
from mme5.data.schema import Side
from mme5.data.stream import StreamBatch

Chunks = list[dict[str, Tensor]]  # one processor batch per chunk, in item order

# Lockstep padding: a one-word row stands for a missing negative (not an empty one: a row without tokens
# breaks e.g. Qwen2-VL's rope index); a blank image row makes a chunk run the vision path. Their
# embeddings are dropped (`keep` False), so they only cost compute.
TEXT_PLACEHOLDER = Item(text="none")
IMAGE_PLACEHOLDER = Item(text="none", image=PIL.Image.new("RGB", (32, 32)))


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


def lockstep_batch(items: Sequence[Item], collate: Callable[[Sequence[Item]], Mapping],
                   keep: Sequence[bool] | None = None) -> dict[str, Tensor]:
    """One processor batch that runs the vision path too, with `keep` flagging the real rows.

    IMAGE_PLACEHOLDER is appended (never kept) when no item has an image, also when there are no items:
    a rank with nothing left to embed still takes part in a sharded model's collectives.
    """
    items, keep = list(items), list(keep) if keep is not None else [True] * len(items)
    if all(item.image is None for item in items):
        items, keep = [*items, IMAGE_PLACEHOLDER], [*keep, False]
    batch = dict(collate(items))
    batch["keep"] = torch.tensor(keep, dtype=torch.bool)
    return batch


def chunked(items: Sequence[Item], size: int | None, collate: Callable[[Sequence[Item]], Mapping],
            keep: Sequence[bool] | None = None, lockstep: bool = False) -> Chunks:
    """Processor batches of `size` items (None: one batch); `lockstep_batch`es with `lockstep`."""
    size = size or max(len(items), 1)
    keep = list(keep) if keep is not None else [True] * len(items)
    return [lockstep_batch(items[s : s + size], collate, keep[s : s + size]) if lockstep
            else dict(collate(items[s : s + size])) for s in range(0, len(items), size)]


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
        negatives: list[Item] = []
        for row, sample in enumerate(samples):
            kept = sample.negatives[: self.num_negatives]
            mask[row, : len(kept)] = True
            negatives += [side_item(side) for side in kept]
            if self.lockstep:
                negatives += [TEXT_PLACEHOLDER] * (self.num_negatives - len(kept))
        keep = mask.flatten().tolist() if self.lockstep else None  # row-major: sample by sample, slot order

        def chunks(items: Sequence[Item], flags: Sequence[bool] | None = None) -> Chunks:
            return chunked(items, self.chunk_size, self.collate_items, flags, self.lockstep) if items else []

        return ContrastiveBatch(
            query=chunks([side_item(s.query) for s in samples]),
            positive=chunks([side_item(s.positive) for s in samples]),
            negatives=chunks(negatives, keep),
            negative_mask=mask,
            ids=[s.id for s in samples],
            sources=[s.source for s in samples],
            tasks=[str(s.task) for s in samples],
            languages=[s.language for s in samples],
            slot=batch.slot,
            position=batch.position,
            skipped=batch.skipped,
        )
