"""LightningDataModule: mixed, unbounded, resumable streaming of training shards, collated per backbone."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from mme5.backbones import InputFormat, load_processing
from mme5.data.collate import ContrastiveBatch, ContrastiveCollator
from mme5.data.stream import MixedShardStream, Source
from mme5.distributed import from_all_ranks
from mme5.sharding import shards_parameters

MAX_REPORTED_ERRORS = 50


class ShardDataModule(L.LightningDataModule):
    """Streams training batches from several shard sources mixed by weight.

    Args:
        sources: the shard directories to draw from, with weights and optional caps.
        backbone: model folder or hub id whose processor formats and batches the items.
        batch_size: samples per batch on each device (the contrastive pool is this × world size).
        num_negatives: hard negatives used per sample (K); samples with fewer are masked.
        negative_padding: "mask" (missing negatives leave the loss) or "repeat" (the reference: a shorter
            list is padded with copies of its last negative).
        chunk_size: items per processor batch; set to the gradient cache's chunk size (None = one chunk).
        input_format: how items become model inputs (linked from `model.input_format` by train.py).
        num_workers: dataloader worker processes per device (each reads its own share of the shards).
        shuffle_buffer: samples held per worker and source for shuffling (1 = stream order).
        same_source_batches: draw each batch from one source (harder in-batch negatives).
        seed: stream seed (shard order, mixing, shuffling).
        strict: raise on the first corrupt sample instead of skipping and counting it.
    """

    def __init__(
        self,
        sources: list[Source],
        backbone: str,
        batch_size: int = 32,
        num_negatives: int = 3,
        negative_padding: Literal["mask", "repeat"] = "mask",
        chunk_size: int | None = None,
        input_format: InputFormat | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        same_source_batches: bool = False,
        seed: int = 0,
        strict: bool = False,
    ):
        super().__init__()
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in sources]
        # Into checkpoints as `datamodule_hyper_parameters`, as plain types, so that checkpoints load with
        # torch.load(weights_only=True).
        self.input_format = InputFormat.of(input_format)
        self.save_hyperparameters(ignore=["sources", "input_format"])
        self.hparams["sources"] = [asdict(source) for source in self.sources]
        self.hparams["input_format"] = asdict(self.input_format)
        self.backbone = backbone
        self.batch_size = batch_size
        self.num_negatives = num_negatives
        self.negative_padding = negative_padding
        self.chunk_size = chunk_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.same_source_batches = same_source_batches
        self.seed = seed
        self.strict = strict
        self.positions: dict[int, dict[str, Any]] = {}  # newest stream position of each slot
        self.skipped: dict[int, int] = {}  # corrupt or lost samples skipped so far, per slot
        self.skip_errors: list[str] = []  # the first messages seen (shard, key, reason)

    def train_dataloader(self) -> DataLoader:
        for source in self.sources:
            source.shard_plan()  # fail here, in the main process, on a missing or empty source
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.positions:
            self._say_how_the_stream_resumes(world * max(self.num_workers, 1))
        stream = MixedShardStream(
            self.sources, self.batch_size, rank=rank, world_size=world, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, same_source_batches=self.same_source_batches,
            strict=self.strict, resume=self.positions,
        )
        # A sharded model needs chunks that make every rank run the same modules (see mme5.data.collate).
        lockstep = self.trainer is not None and shards_parameters(self.trainer.strategy)
        collator = ContrastiveCollator(load_processing(self.backbone, self.input_format).collate,
                                       self.num_negatives, self.chunk_size, lockstep=lockstep,
                                       strict=self.strict, negative_padding=self.negative_padding)
        workers = self.num_workers
        # An own generator: creating the iterator must not draw from the global RNG, or a resumed run's
        # dropout masks would shift by one draw against an uninterrupted run's.
        return DataLoader(stream, batch_size=None, collate_fn=collator, num_workers=workers,
                          persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(self.seed))

    def _say_how_the_stream_resumes(self, slots: int) -> None:
        """What a resume does with the saved stream positions, said at start when it is not exact."""
        saved = {position.get("slots") for position in self.positions.values()}
        if saved != {slots}:
            rank_zero_info(f"data: resuming on {slots} stream slots (ranks × workers) after {sorted(saved)}: "
                           "the rest of each epoch is split over the new slots, no sample read twice or "
                           "skipped")
        if self.shuffle_buffer > 1:
            rank_zero_warn(f"data: resuming with shuffle_buffer={self.shuffle_buffer}: the samples that were "
                           "waiting in the shuffle buffers when the checkpoint was saved are skipped this "
                           "epoch (up to shuffle_buffer per slot and source); shuffle_buffer: 1 resumes "
                           "exactly")

    def samples_per_epoch(self) -> int:
        """Samples in one pass over every source (each capped at its `max_samples`), from the manifests."""
        return sum(take for source in self.sources for _, take in source.shard_plan())

    def steps_per_epoch(self, world_size: int) -> int:
        """Optimizer steps in one pass over the sources at this global batch (the last one partial)."""
        return -(-self.samples_per_epoch() // (self.batch_size * world_size))

    def on_before_batch_transfer(self, batch: ContrastiveBatch, dataloader_idx: int) -> ContrastiveBatch:
        # Called in the main process for each batch the step is about to consume.
        self.positions[batch.slot] = batch.position
        self.skipped[batch.slot] = batch.skipped
        for message in batch.skip_errors:
            if message not in self.skip_errors and len(self.skip_errors) < MAX_REPORTED_ERRORS:
                self.skip_errors.append(message)
        return batch

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip_report(self) -> dict[str, Any]:
        """Samples skipped or lost over the run, every rank's (a collective: call it on all ranks)."""
        gathered = from_all_ranks((self.skipped, self.skip_errors))
        skipped = {slot: n for part, _ in gathered for slot, n in part.items()}
        errors = list(dict.fromkeys(message for _, part in gathered for message in part))
        return {"skipped_samples": sum(skipped.values()), "by_slot": skipped,
                "first_errors": errors[:MAX_REPORTED_ERRORS]}

    def state_dict(self) -> dict[str, Any]:
        """Every rank's slot positions (each rank only sees its own slots, so gather them)."""
        gathered = from_all_ranks((self.positions, self.skipped))
        positions = {slot: p for part, _ in gathered for slot, p in part.items()}
        skipped = {slot: n for _, part in gathered for slot, n in part.items()}
        return {"positions": positions, "skipped": skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.positions = {int(k): v for k, v in state.get("positions", {}).items()}
        self.skipped = {int(k): v for k, v in state.get("skipped", {}).items()}
