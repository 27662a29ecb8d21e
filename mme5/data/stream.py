"""An unbounded, mixed, resumable stream of sample batches from several shard sources.

Each source is a shard directory (with its manifest) drawn with a weight and an optional cap on the
number of samples it contributes. Every (rank, dataloader worker) pair is one *slot*: each epoch the
source's shard list is reshuffled and split over the slots (or, with fewer shards than slots, the samples
of every shard are split), so no two slots read the same sample in an epoch. When a slot's shards run
out it starts the next epoch: the stream never ends and training is driven by `max_steps`.

Resuming: each batch carries its slot's stream position (per source: epoch, shard, records read). Saving
the newest position of every slot and handing it back restarts each slot where it stopped; the samples
that were waiting in a slot's shuffle buffer are not replayed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mme5.data.schema import Sample, SchemaError
from mme5.data.shards import (
    MANIFEST,
    CorruptSample,
    ReadStats,
    decode_sample_images,
    decode_samples,
    read_manifest,
    tar_error_handler,
)

T = TypeVar("T")


@dataclass
class Source:
    """One stream of training shards.

    Attributes:
        path: a shard directory written by mme5 (it holds `manifest.json`), or a folder of such
            directories read as one source, in name order (e.g. a synthesis job array's `part-*-of-N`).
        weight: relative probability of drawing the next sample (or batch) from this source; None (the
            default) = proportional to the samples it holds (after `max_samples`), which mixes the sources
            as one shuffled concatenation would (the paper's recipe).
        max_samples: use only the first N samples of the source (the paper caps each labeled set at 50K).
        name: label in logs and batch metadata (default: the directory name).
    """

    path: str
    weight: float | None = None
    max_samples: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        self.name = self.name or Path(self.path).name
        if self.weight is not None and self.weight <= 0:
            raise ValueError(f"source {self.name}: weight must be positive, got {self.weight}")

    def shard_dirs(self) -> list[Path]:
        """`path` if it holds a manifest, else its sub-folders that do (`path` alone when none does, so
        that reading it names the missing manifest)."""
        root = Path(self.path)
        if (root / MANIFEST).is_file():
            return [root]
        return sorted(manifest.parent for manifest in root.glob(f"*/{MANIFEST}")) or [root]

    def shard_plan(self) -> list[tuple[str, int]]:
        """(shard url, records to read from it), in manifest order, truncated to `max_samples`."""
        plan, left = [], self.max_samples if self.max_samples is not None else float("inf")
        for folder in self.shard_dirs():
            for info in read_manifest(folder)["shards"]:
                take = int(min(info["count"], left))
                if take <= 0:
                    break
                plan.append((str(folder / info["file"]), take))
                left -= take
        if not plan:
            raise ValueError(f"source {self.name}: {self.path} holds no samples")
        return plan


@dataclass
class Slot:
    """Which share of the data one (rank, worker) reads."""

    index: int
    count: int


@dataclass
class StreamBatch:
    """A batch of samples plus where its slot's stream stands after it (for checkpoints)."""

    samples: list[Sample]
    slot: int
    position: dict[str, Any]
    skipped: int = 0
    skip_errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # the shard each sample came from


class SourceReader:
    """Reads one source for one slot, epoch after epoch, from a saved position."""

    def __init__(self, source: Source, slot: Slot, seed: int, stats: ReadStats, strict: bool,
                 position: dict[str, int] | None = None):
        self.source, self.slot, self.seed, self.stats, self.strict = source, slot, seed, stats, strict
        self.plan = source.shard_plan()
        self.position = dict(position or {"epoch": 0, "shard": 0, "read": 0})

    def assignment(self, epoch: int) -> list[tuple[str, int, int]]:
        """(url, records to read, sample stride) for this slot in this epoch; stride > 1 splits a shard."""
        plan = list(self.plan)
        random.Random(f"{self.seed}/{self.source.name}/{epoch}").shuffle(plan)
        if len(plan) >= self.slot.count:
            return [(url, take, 1) for url, take in plan[self.slot.index :: self.slot.count]]
        return [(url, take, self.slot.count) for url, take in plan]

    def __iter__(self) -> Iterator[tuple[Sample, str]]:
        empty_epochs = 0
        while True:
            shards = self.assignment(self.position["epoch"])
            produced = False
            while self.position["shard"] < len(shards):
                url, take, stride = shards[self.position["shard"]]
                for sample in self.read_shard(url, take, stride):
                    produced = True
                    yield sample, url
                self.position["shard"] += 1
                self.position["read"] = 0
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise ValueError(f"source {self.source.name}: slot {self.slot.index} of {self.slot.count} "
                                 "gets no valid sample; use fewer workers or check the shards")
            self.position = {"epoch": self.position["epoch"] + 1, "shard": 0, "read": 0}

    def read_shard(self, url: str, take: int, stride: int) -> Iterator[Sample]:
        """Parse this slot's records of one shard, after the ones already read (images stay encoded)."""
        handler = tar_error_handler(self.stats, self.strict)
        records = wds.tarfile_to_samples(handler=handler)(iter([{"url": url}]))
        decode = decode_samples(self.stats, self.strict, decode_images=False)
        for index, record in enumerate(records):
            if index >= take:
                return
            if index < self.position["read"]:
                continue
            self.position["read"] = index + 1
            if index % stride != self.slot.index % stride:
                continue
            yield from decode([record])
        # The shard ended before the manifest's count (truncated, or unreadable from some point on): the
        # records never read are lost samples, counted as such (a tar error alone would count 1).
        mine = self.slot.index % stride
        lost = sum(1 for index in range(self.position["read"], take) if index % stride == mine)
        if lost:
            message = (f"{url}: {lost} sample(s) lost: the manifest lists {take} records, the shard ended "
                       f"after {self.position['read']}")
            if self.strict:
                raise CorruptSample(message)
            self.stats.skip("lost", message, lost)
        self.position["read"] = take


class MixedShardStream(IterableDataset):
    """Yields `StreamBatch`es of `batch_size` samples mixed from the sources by weight, forever.

    `rank`/`world_size` are captured in the main process (workers cannot ask torch.distributed).
    `resume` maps a slot index to the position a previous run saved for it.
    """

    def __init__(self, sources: list[Source], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 1000, same_source_batches: bool = False,
                 strict: bool = False, resume: dict[int, dict[str, Any]] | None = None):
        super().__init__()
        if not sources:
            raise ValueError("at least one source is needed")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 (1 = no shuffling), got {shuffle_buffer}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        self.sources, self.batch_size, self.rank, self.world_size = sources, batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.same_source_batches = seed, shuffle_buffer, same_source_batches
        self.strict, self.resume = strict, resume or {}

    def slot(self) -> Slot:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return Slot(self.rank * workers + worker, self.world_size * workers)

    def __iter__(self) -> Iterator[StreamBatch]:
        slot = self.slot()
        saved = self.resume.get(slot.index, {})
        if saved and saved.get("slots") != slot.count:
            saved = {}  # a different number of ranks/workers: positions do not carry over
        stats = ReadStats()
        positions = saved.get("sources", {})
        readers = {s.name: SourceReader(s, slot, self.seed, stats, self.strict, positions.get(s.name))
                   for s in self.sources}
        batches = saved.get("batches", 0)
        streams = {}
        for name, reader in readers.items():
            shuffle_rng = random.Random(f"{self.seed}/{name}/{slot.index}/{batches}")
            streams[name] = self.decoded(self.shuffled(iter(reader), shuffle_rng), stats)
        names = [s.name for s in self.sources]
        weights = [s.weight if s.weight is not None else sum(take for _, take in readers[s.name].plan)
                   for s in self.sources]
        while True:
            # Seeded per batch, so that a resumed stream draws its sources exactly as the original would.
            rng = random.Random(f"{self.seed}/mix/{slot.index}/{batches}")
            if self.same_source_batches:
                source = rng.choices(names, weights)[0]
                drawn = [next(streams[source]) for _ in range(self.batch_size)]
            else:
                drawn = [next(streams[rng.choices(names, weights)[0]]) for _ in range(self.batch_size)]
            batches += 1
            position = {"slots": slot.count, "batches": batches,
                        "sources": {name: dict(reader.position) for name, reader in readers.items()}}
            samples, urls = [sample for sample, _ in drawn], [url for _, url in drawn]
            yield StreamBatch(samples, slot.index, position, stats.num_skipped, list(stats.errors[-5:]), urls)

    def shuffled(self, items: Iterator[T], rng: random.Random) -> Iterator[T]:
        """Shuffle an unbounded stream: hold `shuffle_buffer` items, emit a random one per arrival."""
        buffer: list[T] = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                index = rng.randrange(len(buffer))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()

    def decoded(self, items: Iterator[tuple[Sample, str]], stats: ReadStats) -> Iterator[tuple[Sample, str]]:
        """Decode images only after shuffling (the buffer holds encoded bytes); skip and count broken ones."""
        for sample, url in items:
            try:
                decode_sample_images(sample)
            except SchemaError as error:
                message = f"{url}: sample '{sample.id}': {error}"
                if self.strict:
                    raise CorruptSample(message) from None
                stats.skip("record", message)
                continue
            yield sample, url
