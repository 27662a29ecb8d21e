"""LightningDataModule: mixed, unbounded, resumable streaming of training shards, collated per backbone."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from mme5.backbones import ADAPTERS, InputFormat, family_of, load_processing
from mme5.backbones.base import video_families
from mme5.data.collate import ContrastiveBatch, ContrastiveCollator
from mme5.data.shards import read_manifest
from mme5.data.stream import (
    BatchComposition,
    MixedShardStream,
    Source,
    SourceRefused,
    check_batches_fit,
    fingerprint_changes,
    run_size,
)
from mme5.distributed import from_all_ranks
from mme5.hub import local_model
from mme5.settings import at_least
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
        batch_composition: "mixed" (the paper's: each sample's source drawn by weight) or "per_source":
            every global batch from one source group, chosen by weight (harder in-batch negatives; a source's
            `group` merges several, e.g. the classification sets into one label space).
        interleave_batch_size: per_source only: samples per device drawn in a row from one group, as
            VLM2Vec-V2's `interleave_batch_size` (a batch is batch_size / this runs, each run one group on
            every rank); None = the whole batch.
        seed: stream seed (shard order, mixing, shuffling).
        strict: raise on the first corrupt sample instead of skipping and counting it.
    """

    def __init__(
        self,
        sources: list[Source],
        backbone: str,
        batch_size: PositiveInt = 32,
        num_negatives: NonNegativeInt = 3,
        negative_padding: Literal["mask", "repeat"] = "mask",
        chunk_size: PositiveInt | None = None,
        input_format: InputFormat | None = None,
        num_workers: NonNegativeInt = 2,
        shuffle_buffer: PositiveInt = 1000,
        batch_composition: BatchComposition = "mixed",
        interleave_batch_size: PositiveInt | None = None,
        seed: int = 0,
        strict: bool = False,
    ):
        super().__init__()
        # The bounded types make the CLI refuse a bad value while parsing (`at_least` below refuses other
        # callers); plain ints from here on, so that checkpoints load with torch.load(weights_only=True).
        batch_size, num_negatives, num_workers, shuffle_buffer = map(
            int, (batch_size, num_negatives, num_workers, shuffle_buffer))
        chunk_size = None if chunk_size is None else int(chunk_size)
        interleave_batch_size = None if interleave_batch_size is None else int(interleave_batch_size)
        run_size(batch_composition, batch_size, interleave_batch_size)  # refuse a bad pair while configuring
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in sources]
        # Into checkpoints as `datamodule_hyper_parameters`, as plain types, so that checkpoints load with
        # torch.load(weights_only=True).
        self.input_format = InputFormat.of(input_format)
        self.max_length = self.input_format.max_length  # what items are cut to, known once the data is read
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
        self.batch_composition = batch_composition
        self.interleave_batch_size = interleave_batch_size
        self.seed = seed
        self.strict = strict
        at_least(self, {"batch_size": 1, "num_negatives": 0, "chunk_size": 1, "num_workers": 0,
                        "shuffle_buffer": 1})
        self.positions: dict[int, dict[str, Any]] = {}  # newest stream position of each slot
        self.skipped: dict[int, int] = {}  # corrupt or lost samples skipped so far, per slot
        self.truncated: dict[int, int] = {}  # items whose text was cut to max_length so far, per slot
        self.earlier = {"skipped": 0, "truncated": 0}  # the same counts of this run before it was resumed
        self.fingerprints: dict[str, list] = {}  # per source: what its stream positions point into
        self.skip_errors: list[str] = []  # the first messages seen (shard, key, reason)

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.check_sources(world)
        if self.positions:
            self._say_how_the_stream_resumes(self.slots(world))
        stream = MixedShardStream(
            self.sources, self.batch_size, rank=rank, world_size=world, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, batch_composition=self.batch_composition,
            interleave_batch_size=self.interleave_batch_size, strict=self.strict, resume=self.positions,
        )
        # A sharded model needs chunks that make every rank run the same modules (see mme5.data.collate).
        lockstep = self.trainer is not None and shards_parameters(self.trainer.strategy)
        processing = load_processing(self.backbone, self.input_format)
        self.max_length = processing.max_length  # the preset's where the recipe leaves it None
        collator = ContrastiveCollator(processing.collate, self.num_negatives, self.chunk_size,
                                       lockstep=lockstep, strict=self.strict,
                                       negative_padding=self.negative_padding,
                                       truncated=processing.truncated_count, video=processing.reads_video)
        workers = self.num_workers
        # An own generator: creating the iterator must not draw from the global RNG, or a resumed run's
        # dropout masks would shift by one draw against an uninterrupted run's.
        return DataLoader(stream, batch_size=None, collate_fn=collator, num_workers=workers,
                          persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(self.seed))

    def slots(self, world_size: int) -> int:
        """Stream slots: every (rank, dataloader worker) reads its own share of the data."""
        return world_size * max(self.num_workers, 1)

    def check_sources(self, world_size: int) -> None:
        """Refuse sources that cannot be read as asked: missing or empty, parts that overlap, other content
        than a loaded checkpoint's stream positions point into, or too few samples for a batch on
        `world_size` ranks; then record what the positions will point into. `train_dataloader` calls it (in
        the main process, before the first step); a command may call it earlier, before it writes."""
        for source in self.sources:
            source.shard_plan()
            source.check_parts()
        current = {source.name: source.fingerprint() for source in self.sources}
        for index, source in enumerate(self.sources):
            saved = self.fingerprints.get(source.name)
            changes = fingerprint_changes(saved, current[source.name]) if saved and self.positions else ""
            if changes:
                raise SourceRefused(
                    f"data.sources[{index}] {source.name} ({source.path}) is not the data this run's saved "
                    f"stream positions point into: {changes}. Resuming would read other samples from the old "
                    "positions. Put its content back, give the source another name "
                    f"(data.sources[{index}].name: then it is read from its start), or start a new run")
        check_batches_fit(self.sources, self.batch_size, self.slots(world_size), self.batch_composition)
        self._check_video_readable(world_size)
        self.fingerprints = current

    def _check_video_readable(self, world_size: int) -> None:
        """Sources holding video samples when the backbone reads no video: each such sample is dropped from
        its batch (counted as skipped), said here; on several ranks refused, since ranks would then hold
        batches of different sizes (the loss gathers equal ones)."""
        if ADAPTERS[family_of(local_model(self.backbone))].reads_video:  # the family: the input format is
            return  # checked by the model, with its own message
        for index, source in enumerate(self.sources):
            counts: dict[str, int] = {}
            for folder in source.shard_dirs():
                for modality, n in read_manifest(folder).get("counts", {}).get("modality", {}).items():
                    counts[modality] = counts.get(modality, 0) + n
            if video := {m: n for m, n in counts.items() if "V" in m}:
                message = (f"data.sources[{index}] {source.name} ({source.path}) holds video samples "
                           f"{video}; the backbone's family reads no video (families that do: "
                           f"{', '.join(video_families())})")
                if world_size > 1:
                    raise SourceRefused(f"{message}: on {world_size} ranks their batches would differ in "
                                        "size; train a video family, or convert the source without them")
                rank_zero_warn(f"{message}: they are skipped")

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
        self.truncated[batch.slot] = batch.truncated
        for message in batch.skip_errors:
            if message not in self.skip_errors and len(self.skip_errors) < MAX_REPORTED_ERRORS:
                self.skip_errors.append(message)
        return batch

    @property
    def num_skipped(self) -> int:
        """Samples skipped or lost so far by this rank's slots (and by the run before it was resumed)."""
        return self.earlier["skipped"] + sum(self.skipped.values())

    def skip_report(self) -> dict[str, Any]:
        """Samples skipped or lost, and items truncated to max_length, over the run (resumes included),
        every rank's (a collective: call it on all ranks)."""
        gathered = from_all_ranks((self.skipped, self.truncated, self.skip_errors))
        skipped = {slot: n for part, _, _ in gathered for slot, n in part.items()}
        truncated = sum(n for _, part, _ in gathered for n in part.values())
        errors = list(dict.fromkeys(message for _, _, part in gathered for message in part))
        return {"skipped_samples": self.earlier["skipped"] + sum(skipped.values()), "by_slot": skipped,
                "first_errors": errors[:MAX_REPORTED_ERRORS],
                "truncated_items": self.earlier["truncated"] + truncated,
                "max_length": self.max_length}

    def state_dict(self) -> dict[str, Any]:
        """Every rank's slot positions and counts (each rank only sees its own slots, so gather them), and
        the sources' fingerprints that the positions belong to."""
        gathered = from_all_ranks((self.positions, self.skipped, self.truncated))
        positions = {slot: p for part, _, _ in gathered for slot, p in part.items()}
        skipped = {slot: n for _, part, _ in gathered for slot, n in part.items()}
        truncated = {slot: n for _, _, part in gathered for slot, n in part.items()}
        return {"positions": positions, "skipped": skipped, "truncated": truncated, "earlier": self.earlier,
                "sources": self.fingerprints}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Resumed slots count from 0 again: what the run counted before goes to `earlier`.
        self.positions = {int(k): v for k, v in state.get("positions", {}).items()}
        earlier = state.get("earlier", {})
        self.earlier = {key: earlier.get(key, 0) + sum(state.get(key, {}).values())
                        for key in ("skipped", "truncated")}
        self.skipped, self.truncated = {}, {}
        self.fingerprints = state.get("sources", {})
