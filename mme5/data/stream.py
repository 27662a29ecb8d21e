"""An unbounded, mixed, resumable stream of sample batches from several shard sources.

Each source is a shard directory (with its manifest) drawn with a weight and an optional cap on the
number of samples it contributes. Every (rank, dataloader worker) pair is one *slot*: each epoch the
source's shard list is reshuffled and split over the slots (or, with fewer shards than slots, the samples
of every shard are split), so no two slots read the same sample in an epoch. When a slot's shards run
out it starts the next epoch: the stream never ends and training is driven by `max_steps`.

Resuming: each batch carries its slot's stream position (per source: epoch, shard, records read). Saving
the newest position of every slot and handing it back restarts each slot where it stopped; the samples
that were waiting in a slot's shuffle buffer are not replayed (exact with `shuffle_buffer=1`).

A resume on another number of slots (more or fewer ranks or workers) continues the same epochs: what every
old slot had left of its epoch (and of any later epoch it had not reached) is pooled, in shard units, and
split over the new slots (units round robin, or every unit strided when there are fewer units than slots);
later epochs are split over the new slots as usual. No sample of an epoch is read
twice or skipped. A slot's work for an epoch is a list of units, (shard url, first record, records, stride,
member): the default split needs none stored, a re-split stores them in the position ("units" for the
current epoch, "carry" for later ones).

Batch composition: "mixed" draws every sample's source by weight, each slot on its own. "per_source" draws
every run of `interleave_batch_size` samples (default: the whole batch) from one source group (a source, or
the sources sharing a `group`), chosen by weight from a schedule seeded by the global step the batch serves:
slot k's b-th batch serves step b × workers + k mod workers on every rank, so all ranks and workers agree on
a step's groups without communicating, and a resume (same or other slot count) continues the schedule from
the saved batch counts. Each source's reading position stays its own, so resuming stays exact.
"""

from __future__ import annotations

import hashlib
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

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
BatchComposition = Literal["mixed", "per_source"]


class SourceRefused(ValueError):
    """The sources cannot be read as asked (the message names the source, the cause and the way out)."""


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
        group: with `batch_composition: per_source`, sources of one group fill a batch together, mixed by
            their weights, as if they were one source (e.g. `classification` for every classification set:
            their labels become one candidate pool, RzenEmbed's merged label space). Ignored when mixed.
    """

    path: str
    weight: float | None = None
    max_samples: int | None = None
    name: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        self.name = self.name or Path(self.path).name
        if self.weight is not None and self.weight <= 0:
            raise ValueError(f"source {self.name}: weight must be positive, got {self.weight}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"source {self.name}: max_samples must be at least 1, got {self.max_samples}")

    def shard_dirs(self) -> list[Path]:
        """`path` if it holds a manifest, else its sub-folders that do (`path` alone when none does, so
        that reading it names the missing manifest)."""
        root = Path(self.path)
        if (root / MANIFEST).is_file():
            return [root]
        return sorted(manifest.parent for manifest in root.glob(f"*/{MANIFEST}")) or [root]

    def planned_shards(self) -> list[PlannedShard]:
        """The shards read, in manifest order, the last one cut to `max_samples`."""
        plan, left = [], self.max_samples if self.max_samples is not None else float("inf")
        for folder in self.shard_dirs():
            for info in read_manifest(folder)["shards"]:
                take = int(min(info["count"], left))
                if take <= 0:
                    break
                plan.append(PlannedShard(str(folder / info["file"]), take, info["count"], info.get("bytes")))
                left -= take
        if not plan:
            raise ValueError(f"source {self.name}: {self.path} holds no samples")
        return plan

    def shard_plan(self) -> list[tuple[str, int]]:
        """(shard url, records to read from it), in manifest order, truncated to `max_samples`."""
        return [(shard.url, shard.take) for shard in self.planned_shards()]

    def fingerprint(self) -> list[list]:
        """What saved stream positions of this source point into: [shard path under `path`, records read,
        bytes, digest of its first 64 KiB] of each planned shard; other content (or another `max_samples`)
        gives another list. The digest tells apart shards of equal size (tar pads to 10 KiB), reading
        little."""
        return [[self.part_name(shard.url), shard.take, shard.bytes, head_digest(shard.url)]
                for shard in self.planned_shards()]

    def part_name(self, url: str) -> str:
        """A shard's path under the source's folder (e.g. `part-00001-of-00004/shard-000000.tar`)."""
        return Path(url).relative_to(self.path).as_posix()

    def check_parts(self) -> None:
        """Refuse a folder of parts in which a sample id occurs twice (e.g. the parts of two job arrays run
        with different `--num-shards`): training would read those samples twice an epoch. Reads the tar
        headers only; also checks each part shard's records against its manifest count."""
        folders = self.shard_dirs()
        if len(folders) < 2:
            return
        seen: dict[str, str] = {}
        for shard in self.planned_shards():
            ids = shard_ids(shard.url)
            if len(ids) > shard.count:
                raise count_edited(shard.url, shard.count, str(len(ids)))
            for sample_id in ids[: shard.take]:
                if sample_id in seen:
                    raise SourceRefused(
                        f"source {self.name}: sample id {sample_id!r} is in {seen[sample_id]} and in "
                        f"{self.part_name(shard.url)}: its parts overlap (a job array run again with another "
                        f"--num-shards into the same --out?); keep one set of parts in {self.path}")
                seen[sample_id] = self.part_name(shard.url)


@dataclass(frozen=True)
class PlannedShard:
    """A shard as a source reads it: `take` of its `count` records (fewer under `max_samples`)."""

    url: str
    take: int
    count: int
    bytes: int | None


def head_digest(path: str, size: int = 64 * 1024) -> str | None:
    """SHA-1 of a file's first `size` bytes (None if it cannot be read: the reader counts it as lost)."""
    try:
        with open(path, "rb") as file:
            return hashlib.sha1(file.read(size)).hexdigest()
    except OSError:
        return None


def fingerprint_changes(saved: list[list], current: list[list]) -> str:
    """In words, how a source's `fingerprint` differs from a saved one ("" if it does not)."""
    before = {path: tuple(rest) for path, *rest in saved}
    after = {path: tuple(rest) for path, *rest in current}
    if list(before.items()) == list(after.items()):
        return ""
    gone = [path for path in before if path not in after]
    new = [path for path in after if path not in before]
    changed = [f"{path} ({_described(before[path])} → {_described(after[path])})"
               for path in before if path in after and before[path] != after[path]]
    said = [f"{len(paths)} {what}: {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}"
            for what, paths in (("shard(s) gone", gone), ("new shard(s)", new), ("changed", changed))
            if paths]
    return "; ".join(said) or "its shards are listed in another order"


def _described(entry: tuple) -> str:
    take, size, digest = entry
    return f"{take} samples, {size} bytes, content {str(digest)[:8]}"


def count_edited(url: str, count: int, held: str) -> SourceRefused:
    """The error for a shard holding more records than its manifest counts (those would never be read)."""
    return SourceRefused(f"{Path(url).parent / MANIFEST}: lists {count} records for {Path(url).name}, the "
                         f"shard holds {held}: the manifest was edited; restore it or write the shards again")


def shard_ids(url: str) -> list[str]:
    """The sample ids of a shard, in order, from its tar headers (no member data is read); a shard that
    ends early gives the ids before the damage (the reader counts the rest as lost)."""
    ids = []
    try:
        with tarfile.open(url, mode="r:") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    ids.append(member.name[: -len(".json")])
    except (tarfile.TarError, OSError):
        pass
    return ids


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


Unit = list  # [shard url, first record, records to read, stride, member]: records i with i % stride == member


class SourceReader:
    """Reads one source for one slot, epoch after epoch, from a saved position."""

    def __init__(self, source: Source, slot: Slot, seed: int, stats: ReadStats, strict: bool,
                 position: dict[str, Any] | None = None):
        self.source, self.slot, self.seed, self.stats, self.strict = source, slot, seed, stats, strict
        planned = source.planned_shards()
        self.plan = [(shard.url, shard.take) for shard in planned]
        self.counts = {shard.url: shard.count for shard in planned}  # the manifests' record counts
        self.position = dict(position or {"epoch": 0, "shard": 0, "read": 0})

    def default_units(self, epoch: int, slot: Slot) -> list[Unit]:
        """`slot`'s share of an epoch: whole shards of the reshuffled list, or every shard strided when
        there are fewer shards than slots."""
        plan = list(self.plan)
        random.Random(f"{self.seed}/{self.source.name}/{epoch}").shuffle(plan)
        if len(plan) >= slot.count:
            return [[url, 0, take, 1, 0] for url, take in plan[slot.index :: slot.count]]
        return [[url, 0, take, slot.count, slot.index] for url, take in plan]

    def __iter__(self) -> Iterator[tuple[Sample, str]]:
        empty_epochs = 0
        while True:
            carried = "units" in self.position
            epoch = self.position["epoch"]
            units = self.position["units"] if carried else self.default_units(epoch, self.slot)
            produced = False
            while self.position["shard"] < len(units):
                for sample in self.read_shard(*units[self.position["shard"]]):
                    produced = True
                    yield sample, units[self.position["shard"]][0]
                self.position["shard"] += 1
                self.position["read"] = 0
            if not carried:  # a re-split may leave a slot nothing of an epoch; the default split may not
                empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise ValueError(f"source {self.source.name}: slot {self.slot.index} of {self.slot.count} "
                                 "gets no valid sample; use fewer workers or check the shards")
            self.position = self._next_epoch()

    def _next_epoch(self) -> dict[str, Any]:
        epoch = self.position["epoch"] + 1
        carry = dict(self.position.get("carry", {}))
        position: dict[str, Any] = {"epoch": epoch, "shard": 0, "read": 0}
        units = carry.pop(str(epoch), None)
        if units is not None:
            position["units"] = units
        if carry:
            position["carry"] = carry
        return position

    def read_shard(self, url: str, first: int, take: int, stride: int, member: int) -> Iterator[Sample]:
        """Parse this unit's records of one shard, after the ones already read (images stay encoded)."""
        handler = tar_error_handler(self.stats, self.strict)
        records = wds.tarfile_to_samples(handler=handler)(iter([{"url": url}]))
        decode = decode_samples(self.stats, self.strict, decode_images=False)
        begin = max(first, self.position["read"])
        for index, record in enumerate(records):
            if index >= take:
                if take == self.counts.get(url):
                    raise count_edited(url, take, "more")
                return
            if index < begin:
                continue
            self.position["read"] = index + 1
            if index % stride != member:
                continue
            yield from decode([record])
        # The shard ended before the manifest's count (truncated, or unreadable from some point on): the
        # records never read are lost samples, counted as such (a tar error alone would count 1).
        start = max(begin, self.position["read"])
        lost = sum(1 for index in range(start, take) if index % stride == member)
        if lost:
            message = (f"{url}: {lost} sample(s) lost: the manifest lists {take} records, the shard ended "
                       f"after {start}")
            if self.strict:
                raise CorruptSample(message)
            self.stats.skip("lost", message, lost)
        self.position["read"] = take

    def resplit(self, saved: dict[int, dict[str, Any] | None], old_count: int) -> dict[str, Any]:
        """This slot's position after a run on `old_count` slots saved `saved` (old slot → its position in
        this source; missing: the slot had consumed nothing): the old slots' unread work, epoch by epoch,
        split over the current slots."""
        states = [saved.get(k) or {"epoch": 0, "shard": 0, "read": 0} for k in range(old_count)]
        low = min(state["epoch"] for state in states)
        high = max(max([state["epoch"], *map(int, state.get("carry", {}))]) for state in states)
        pending: dict[int, list[Unit]] = {epoch: [] for epoch in range(low, high + 1)}
        for index, state in enumerate(states):
            old_slot = Slot(index, old_count)
            current = state["units"] if "units" in state else self.default_units(state["epoch"], old_slot)
            rest = [list(unit) for unit in current[state["shard"] :]]
            if rest:
                rest[0][1] = max(rest[0][1], state["read"])
            pending[state["epoch"]] += rest
            for epoch in range(state["epoch"] + 1, high + 1):
                carried = state.get("carry", {}).get(str(epoch))
                pending[epoch] += carried if carried is not None else self.default_units(epoch, old_slot)
        mine = {epoch: self._share(units) for epoch, units in pending.items()}
        position: dict[str, Any] = {"epoch": low, "shard": 0, "read": 0, "units": mine[low]}
        if high > low:
            position["carry"] = {str(epoch): mine[epoch] for epoch in range(low + 1, high + 1)}
        return position

    def _share(self, units: list[Unit]) -> list[Unit]:
        """This slot's share of pooled units: every count-th unit, or, with fewer units than slots, a strided
        part of every unit (as the default split does with fewer shards than slots)."""
        index, count = self.slot.index, self.slot.count
        if len(units) >= count:
            return units[index::count]
        return [[url, first, take, stride * count, member + index * stride]
                for url, first, take, stride, member in units]


class MixedShardStream(IterableDataset):
    """Yields `StreamBatch`es of `batch_size` samples drawn from the sources by weight, forever.

    `rank`/`world_size` are captured in the main process (workers cannot ask torch.distributed).
    `batch_composition`, `interleave_batch_size`: see the module docstring and `run_size`.
    `resume` maps a slot index to the position a previous run saved for it.
    """

    def __init__(self, sources: list[Source], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 1000, batch_composition: BatchComposition = "mixed",
                 interleave_batch_size: int | None = None, strict: bool = False,
                 resume: dict[int, dict[str, Any]] | None = None):
        super().__init__()
        if not sources:
            raise ValueError("at least one source is needed")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 (1 = no shuffling), got {shuffle_buffer}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        self.run = run_size(batch_composition, batch_size, interleave_batch_size)
        self.groups = source_groups(sources)
        self.sources, self.batch_size, self.rank, self.world_size = sources, batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.batch_composition = seed, shuffle_buffer, batch_composition
        self.strict, self.resume = strict, resume or {}

    def slot(self) -> Slot:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return Slot(self.rank * workers + worker, self.world_size * workers)

    def __iter__(self) -> Iterator[StreamBatch]:
        slot = self.slot()
        stats = ReadStats()
        old_counts = {position.get("slots") for position in self.resume.values()}
        if self.resume and old_counts != {slot.count}:
            readers, batches = self.resplit_readers(slot, stats)
        else:
            saved = self.resume.get(slot.index, {})
            positions = saved.get("sources", {})
            readers = {s.name: SourceReader(s, slot, self.seed, stats, self.strict, positions.get(s.name))
                       for s in self.sources}
            batches = saved.get("batches", 0)
        streams = {}
        for name, reader in readers.items():
            shuffle_rng = random.Random(f"{self.seed}/{name}/{slot.index}/{batches}")
            streams[name] = self.decoded(self.shuffled(iter(reader), shuffle_rng), stats)
        names = [s.name for s in self.sources]
        held = {name: sum(take for _, take in reader.plan) for name, reader in readers.items()}
        weights = draw_weights(self.sources, held)
        members = {group: ([s.name for s in part], draw_weights(part, held))
                   for group, part in self.groups.items()}
        group_weights = {group: sum(part_weights) for group, (_, part_weights) in members.items()}
        workers = slot.count // self.world_size
        while True:
            # Seeded per batch, so that a resumed stream draws its sources exactly as the original would.
            rng = random.Random(f"{self.seed}/mix/{slot.index}/{batches}")
            if self.batch_composition == "mixed":
                drawn = [next(streams[rng.choices(names, weights)[0]]) for _ in range(self.batch_size)]
            else:  # the step's groups, the same on every slot; each slot draws the members on its own
                step = batches * workers + slot.index % workers
                schedule = group_schedule(self.seed, step, group_weights, self.batch_size // self.run)
                drawn = [next(streams[rng.choices(*members[group])[0]])
                         for group in schedule for _ in range(self.run)]
            batches += 1
            position = {"slots": slot.count, "batches": batches,
                        "sources": {name: dict(reader.position) for name, reader in readers.items()}}
            samples, urls = [sample for sample, _ in drawn], [url for _, url in drawn]
            yield StreamBatch(samples, slot.index, position, stats.num_skipped, list(stats.errors[-5:]), urls)

    def resplit_readers(self, slot: Slot, stats: ReadStats) -> tuple[dict[str, SourceReader], int]:
        """Readers continuing a run saved on another number of slots (see the module docstring)."""
        old_counts = {position.get("slots") for position in self.resume.values()}
        if len(old_counts) != 1 or not isinstance(next(iter(old_counts)), int):
            raise ValueError("saved stream positions disagree on the number of slots: "
                             f"{sorted(map(str, old_counts))}")
        old_count = old_counts.pop()
        readers = {}
        for source in self.sources:
            reader = SourceReader(source, slot, self.seed, stats, self.strict)
            saved = {index: position.get("sources", {}).get(source.name)
                     for index, position in self.resume.items()}
            reader.position = reader.resplit(saved, old_count)
            readers[source.name] = reader
        # Batch seeds continue past the old run's (a fresh 0 would repeat its first batches' draws).
        return readers, max(position.get("batches", 0) for position in self.resume.values())

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


def draw_weights(sources: list[Source], held: dict[str, int]) -> list[float]:
    """Each source's drawing weight: its own, or the samples it holds (`held`, by name)."""
    return [s.weight if s.weight is not None else held[s.name] for s in sources]


def run_size(batch_composition: str, batch_size: int, interleave_batch_size: int | None) -> int:
    """Samples in a row that a per_source batch draws from one group: `interleave_batch_size` (VLM2Vec-V2's
    setting, per device: a global run is it × ranks), by default the whole batch. Refuses settings that
    cannot be met."""
    if batch_composition not in ("mixed", "per_source"):
        raise ValueError(f"data.batch_composition must be mixed or per_source, got {batch_composition!r}")
    if interleave_batch_size is None:
        return batch_size
    if batch_composition != "per_source":
        raise ValueError("data.interleave_batch_size draws runs of one source: it needs "
                         f"data.batch_composition: per_source, got {batch_composition}")
    if interleave_batch_size < 1 or batch_size % interleave_batch_size:
        raise ValueError(f"data.interleave_batch_size ({interleave_batch_size}) must divide data.batch_size "
                         f"({batch_size}): a batch is a whole number of runs")
    return interleave_batch_size


def source_groups(sources: list[Source]) -> dict[str, list[Source]]:
    """What a per_source run is drawn from: each `group`'s sources, an ungrouped source alone (by name)."""
    clash = {s.name for s in sources if s.group is None} & {s.group for s in sources}
    if clash:
        raise ValueError(f"source {sorted(clash)[0]}: its name is also the group of other sources; rename "
                         "the source or the group")
    groups: dict[str, list[Source]] = {}
    for source in sources:
        groups.setdefault(source.group or source.name, []).append(source)
    return groups


def group_schedule(seed: int, step: int, weights: dict[str, float], runs: int) -> list[str]:
    """The groups of a global step's `runs` runs, drawn by weight: a function of the seed and the step only,
    so every rank and worker serving that step draws the same."""
    return random.Random(f"{seed}/groups/{step}").choices(list(weights), list(weights.values()), k=runs)


def check_batches_fit(sources: list[Source], batch_size: int, slots: int,
                      batch_composition: BatchComposition = "mixed") -> None:
    """Refuse batches that would repeat samples: a batch draws `batch_size × share` samples of a source, its
    weight share of the sources the batch mixes (on average over every source when mixed; per_source, a
    whole batch may come from one group, shared among the group's sources), from the one slot's share of it
    (its samples / `slots` an epoch); drawing more than that share repeats samples inside the batch. (A batch
    that spans the end of a slot's epoch may still meet a sample of both epochs: the stream never ends, and
    that is rare once the data is many batches long.)"""
    held = {s.name: sum(take for _, take in s.shard_plan()) for s in sources}
    per_source = batch_composition == "per_source"
    for group, part in (source_groups(sources) if per_source else {"": sources}).items():
        by_size = all(s.weight is None for s in part)
        hint = "data.batch_composition: mixed, " if per_source else "" if by_size else "lower its weight, "
        for what, samples, share in batch_shares(group, part, held):
            drawn = batch_size * share
            if drawn * slots > samples:
                raise SourceRefused(
                    f"data: {what} {samples} samples, but each of the {slots} stream slots (ranks × "
                    f"dataloader workers) draws {drawn:.4g} of them a batch ({drawn * slots:.4g} a step): "
                    "every batch would repeat samples. Lower data.batch_size or data.num_workers, train on "
                    f"fewer devices, {hint}or add data")


def batch_shares(group: str, part: list[Source], held: dict[str, int]) -> list[tuple[str, int, float]]:
    """(what, samples held, share of a batch) of the sources one batch mixes (`group` "" : all sources):
    one total when they are drawn in proportion to their size, else each source with its weight share."""
    if all(s.weight is None for s in part):
        what = (f"source {part[0].name} holds" if len(part) == 1 else
                f"group {group} holds" if group else "the sources hold")
        return [(what, sum(held[s.name] for s in part), 1.0)]
    weights = draw_weights(part, held)
    return [(f"source {s.name} holds", held[s.name], weight / sum(weights))
            for s, weight in zip(part, weights, strict=True)]
