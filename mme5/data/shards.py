"""Samples in WebDataset tar shards: an atomic, resumable writer with a manifest, and a validating reader.

Record layout of one sample in a shard (all members share the key = the sample id):
    <id>.json       metadata + per-side instruction/text/published prompt + image and frame member names
    <id>.qry.<ext>  query image (encoded bytes as given: jpg, png, ...), if any
    <id>.pos.<ext>  positive image, if any
    <id>.neg<i>.<ext> hard-negative images, if any
    <id>.<role>.f<NNNNN>.<ext>  frame NNNNN of a side's video, if any (bytes as given, one member a frame)

A video is stored one member per frame rather than as one container member: the frames stay byte-exact
files that `tar` lists and WebDataset groups under the sample's key like any member (its key ends at the
first dot), no container format needs writing or parsing, and a sample's members stay consecutive, so
shard-level resume and skipping are unchanged. The json lists the frame members in order.

A shard is written under a temporary name (`mme5.files.AtomicFile`) and renamed when complete, so a crash
never leaves a truncated shard that reads as valid. The manifest (`manifest.json`) lists finished shards
with their counts and a caller-defined resume cursor, so an interrupted conversion continues after the last
finished shard.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from mme5.data.schema import Sample, SchemaError, Side, image_extension
from mme5.files import AtomicFile, remove_stale, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "mme5-shards/2"  # 2: sides keep the published string (`prompt`) of converted rows
COUNTED_FIELDS = ("task", "modality", "language", "source")


# ----------------------------------------------------------------------------- encoding


def sample_to_record(sample: Sample) -> dict[str, bytes]:
    """Serialise a sample into tar members keyed by extension (the WebDataset convention)."""
    members: dict[str, bytes] = {}
    sides = {}
    for role, side in sample.sides:
        image_member = None
        if side.image is not None:
            image_member = f"{role}.{image_extension(side.image)}"
            members[image_member] = side.image
        frame_members = [f"{role}.f{index:05d}.{image_extension(frame)}" for index, frame in
                         enumerate(side.video or ())]
        members.update(zip(frame_members, side.video or (), strict=True))
        sides[role] = {"instruction": side.instruction, "text": side.text, "prompt": side.prompt,
                       "image": image_member} | ({"video": frame_members} if side.video else {})
    meta = sample.metadata() | {"num_negatives": len(sample.negatives), "sides": sides}
    members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return members


def record_to_sample(record: dict[str, Any], decode_images: bool = True) -> Sample:
    """Rebuild and validate a sample from a WebDataset record; SchemaError names the bad field."""
    if "json" not in record:
        raise SchemaError("missing the 'json' member")
    try:
        meta = json.loads(record["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SchemaError(f"'json' member is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise SchemaError("'json' member is not an object")
    for key in ("id", "task", "modality", "language", "source", "num_negatives", "sides"):
        if key not in meta:
            raise SchemaError(f"field '{key}' is missing")
    num_negatives = meta["num_negatives"]
    if not isinstance(num_negatives, int) or num_negatives < 0:
        raise SchemaError(f"field 'num_negatives' must be a non-negative integer, found {num_negatives!r}")
    roles = ["qry", "pos"] + [f"neg{i}" for i in range(num_negatives)]
    sides = [_read_side(meta["sides"], role, record) for role in roles]
    try:
        sample = Sample(
            id=meta["id"],
            task=meta["task"],
            modality=meta["modality"],
            language=meta["language"],
            source=meta["source"],
            query=sides[0],
            positive=sides[1],
            negatives=sides[2:],
        )
    except ValueError as error:  # bad enum values or inconsistent sides
        raise SchemaError(str(error)) from None
    if decode_images:
        decode_sample_images(sample)
    return sample


def decode_sample_images(sample: Sample) -> None:
    """Decode every image of a sample now (cached on its sides); SchemaError names the broken one. Video
    frames stay encoded: the adapter decodes the few it keeps, and a broken one drops its sample there."""
    for role, side in sample.sides:
        try:
            side.pil()
        except OSError as error:  # PIL: unidentified, truncated or corrupt image
            raise SchemaError(f"field 'sides.{role}.image' is not a readable image: {error}") from None


def _read_side(sides: dict[str, Any], role: str, record: dict[str, Any]) -> Side:
    if not isinstance(sides, dict) or role not in sides:
        raise SchemaError(f"field 'sides.{role}' is missing")
    entry = sides[role]
    image = None
    if entry.get("image"):
        member = entry["image"]
        if member not in record:
            raise SchemaError(f"field 'sides.{role}.image' names member '{member}', which is missing")
        image = record[member]
    video = _read_frames(entry.get("video"), role, record)
    try:
        return Side(instruction=entry.get("instruction") or "", text=entry.get("text"), image=image,
                    video=video, prompt=entry.get("prompt"))
    except SchemaError as error:
        raise SchemaError(f"field 'sides.{role}': {error}") from None


def _read_frames(members: Any, role: str, record: dict[str, Any]) -> list[bytes] | None:
    """A side's video frames from the members its json lists, in the listed order."""
    if members is None:
        return None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise SchemaError(f"field 'sides.{role}.video' must list frame member names, found {members!r:.60}")
    missing = [m for m in members if m not in record]
    if missing:
        raise SchemaError(f"field 'sides.{role}.video' names member '{missing[0]}', which is missing")
    return [record[m] for m in members]


# ----------------------------------------------------------------------------- writing


@dataclass
class ShardInfo:
    file: str
    count: int
    bytes: int
    cursor: Any  # caller-defined position in its input after this shard (for resuming)
    counts: dict[str, dict[str, int]]


class ShardWriter:
    """Writes samples into bounded shards `<prefix>-NNNNNN.tar`, atomically, with a resumable manifest.

    `write(sample, cursor)` takes an opaque cursor: the caller's input position after this sample. When a
    shard is finished, its cursor is stored in the manifest; `resume_cursor` returns the last finished
    shard's cursor so a restarted job skips what is already on disk. Unfinished `.tmp` shards are
    discarded on resume. Tar members get fixed metadata, so equal input gives byte-identical shards.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_count: int = 1000,
        max_bytes: int = 256 * 1024**2,
        resume: bool = False,
        extra: dict[str, Any] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.extra = dict(extra or {})
        self.shards: list[ShardInfo] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(self.out_dir)  # an interrupted shard or manifest write
        for stale in self.out_dir.glob(f"{prefix}-*.tar.tmp"):  # the same, as written before mme5.files
            stale.unlink()
        if resume and (self.out_dir / MANIFEST).exists():
            manifest = read_manifest(self.out_dir)
            self.shards = [ShardInfo(**info) for info in manifest["shards"]]
            self.extra = manifest.get("extra", {}) | self.extra
        elif not resume:
            for old in self.out_dir.glob(f"{prefix}-*.tar"):
                old.unlink()
            (self.out_dir / MANIFEST).unlink(missing_ok=True)
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0
        self._counts: dict[str, Counter] = {}
        self._cursor: Any = None
        self._ids: set[str] = set()

    @property
    def resume_cursor(self) -> Any:
        return self.shards[-1].cursor if self.shards else None

    @property
    def num_written(self) -> int:
        return sum(info.count for info in self.shards) + self._count

    def write(self, sample: Sample, cursor: Any = None) -> None:
        record = sample_to_record(sample)
        size = sum(len(v) for v in record.values())
        if self._tar is not None and (self._count >= self.max_count or self._bytes + size > self.max_bytes):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        if sample.id in self._ids:
            raise SchemaError(f"sample id {sample.id!r} written twice to shard {self._path.name}")
        self._ids.add(sample.id)
        for ext in sorted(record, key=_member_order):
            _add_member(self._tar, f"{sample.id}.{ext}", record[ext])
        self._count += 1
        self._bytes += size
        for key, value in sample.metadata().items():
            if key in COUNTED_FIELDS:
                self._counts.setdefault(key, Counter())[value] += 1
        self._cursor = cursor

    def close(self) -> dict[str, Any]:
        """Finish the open shard and mark the manifest complete; returns the manifest."""
        if self._tar is not None:
            self._finish_shard()
        return self._write_manifest(complete=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # keep finished shards, drop the partial one
            self._tar.close()
            self._file.discard()
            self._tar = None

    def _open_shard(self) -> None:
        self._path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = AtomicFile(self._path, "wb")
        self._tar = tarfile.open(fileobj=self._file.file, mode="w", format=tarfile.USTAR_FORMAT)
        self._count, self._bytes, self._counts, self._ids = 0, 0, {}, set()

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()  # writes the end-of-archive blocks; the file itself stays open
        self._file.commit()
        counts = {key: dict(sorted(counter.items())) for key, counter in sorted(self._counts.items())}
        self.shards.append(ShardInfo(self._path.name, self._count, self._path.stat().st_size, self._cursor,
                                     counts))
        self._tar = None
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> dict[str, Any]:
        totals: dict[str, Counter] = {key: Counter() for key in COUNTED_FIELDS}
        for info in self.shards:
            for key, counter in info.counts.items():
                totals[key].update(counter)
        manifest = {
            "format": FORMAT,
            "complete": complete,
            "num_samples": sum(info.count for info in self.shards),
            "counts": {key: dict(sorted(counter.items())) for key, counter in totals.items()},
            "shards": [vars(info) for info in self.shards],
            "extra": self.extra,
        }
        write_json(self.out_dir / MANIFEST, manifest)
        return manifest


def _member_order(ext: str) -> tuple[int, str]:
    return (0 if ext == "json" else 1, ext)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """A shard directory's manifest, checked: JSON of this format (errors name the file), each shard listed
    once (a repeated entry is read once, with a warning) and `num_samples` equal to the shards' counts (a
    count edited by hand is refused, not trusted)."""
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard manifest (is this a directory written by mme5?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SchemaError(f"{path}: not a readable manifest ({error}); mme5 writes it as UTF-8 JSON: restore "
                          "it or convert the source again") from None
    if not isinstance(manifest, dict):
        raise SchemaError(f"{path}: a manifest is a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise SchemaError(
            f"{path}: shard format {manifest.get('format')!r}, this version reads {FORMAT!r}; convert the "
            "source again (python -m mme5.data.convert, or delete a demo world to rebuild it): format 2 "
            "keeps the published prompt strings that the model is fed")
    manifest["shards"] = _listed_once(path, manifest.get("shards"))
    listed = sum(info["count"] for info in manifest["shards"])
    if manifest.get("num_samples") != listed:
        raise SchemaError(
            f"{path}: num_samples is {manifest.get('num_samples')!r} but its shards' counts add up to "
            f"{listed}: the manifest was edited; restore it or convert the source again (to read fewer "
            "samples, set the source's max_samples)")
    return manifest


def _listed_once(path: Path, shards: Any) -> list[dict[str, Any]]:
    """The manifest's shard entries, checked, each file once (the first entry of a repeated one)."""
    if not isinstance(shards, list):
        raise SchemaError(f"{path}: field 'shards' must be a list, found {shards!r}")
    entries: dict[str, dict[str, Any]] = {}
    for index, info in enumerate(shards):
        if not (isinstance(info, dict) and isinstance(info.get("file"), str)
                and isinstance(info.get("count"), int) and info["count"] >= 0):
            raise SchemaError(f"{path}: shards[{index}] needs a 'file' name and a non-negative 'count', "
                              f"found {info!r}")
        if info["file"] in entries:
            log.warning("%s: shard %s is listed more than once; it is read once", path, info["file"])
            continue
        entries[info["file"]] = info
    return list(entries.values())


def shard_urls(shard_dir: str | os.PathLike) -> list[str]:
    """The finished shards of a directory, in order, as listed by its manifest."""
    shard_dir = Path(shard_dir)
    return [str(shard_dir / info["file"]) for info in read_manifest(shard_dir)["shards"]]


# ----------------------------------------------------------------------------- reading


@dataclass
class SkipLog:
    """Counts of skipped inputs by kind, keeping the first `max_errors` messages (which name the input)."""

    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    max_errors: int = 100

    def skip(self, kind: str, message: str, count: int = 1) -> None:
        self.skipped[kind] += count
        if len(self.errors) < self.max_errors:
            self.errors.append(message)


@dataclass
class ReadStats(SkipLog):
    """What a reader read and skipped, and why (messages name shard, key and reason). The first
    `log_first` skips are logged as warnings, then one in a hundred, so a bad source shows in the run's
    log without flooding it."""

    samples: int = 0
    log_first: int = 10

    def skip(self, kind: str, message: str, count: int = 1) -> None:
        super().skip(kind, message, count)
        seen = self.num_skipped
        if seen <= self.log_first or seen % 100 < count:
            log.warning("skipped %d sample(s) (%d so far): %s", count, seen, message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class CorruptSample(ValueError):
    """A record or shard could not be read; raised in strict mode, counted otherwise."""


def decode_samples(
    stats: ReadStats | None = None, strict: bool = False, decode_images: bool = True
) -> Callable[[Iterable[dict[str, Any]]], Iterator[Sample]]:
    """A WebDataset pipeline stage: raw records in, validated samples out (bad ones skipped and counted)."""
    stats = stats if stats is not None else ReadStats()

    def stage(records: Iterable[dict[str, Any]]) -> Iterator[Sample]:
        for record in records:
            try:
                sample = record_to_sample(record, decode_images=decode_images)
            except SchemaError as error:
                message = f"{record.get('__url__', '?')}: sample '{record.get('__key__', '?')}': {error}"
                if strict:
                    raise CorruptSample(message) from None
                stats.skip("record", message)
                continue
            stats.samples += 1
            yield sample

    return stage


def tar_error_handler(stats: ReadStats, strict: bool) -> Callable[[Exception], bool]:
    """WebDataset handler for unreadable shards (truncated tar, missing file): count and go on, or raise."""

    def handler(error: Exception) -> bool:
        if strict:
            raise CorruptSample(f"unreadable shard data: {error}") from error
        stats.skip("shard", f"unreadable shard data: {error}")
        return True

    return handler


def read_samples(
    urls: str | list[str], strict: bool = False, stats: ReadStats | None = None, decode_images: bool = True
) -> Iterator[Sample]:
    """Stream validated samples from shards in order (no shuffling, no splitting): for tools and tests."""
    stats = stats if stats is not None else ReadStats()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=tar_error_handler(stats, strict)),
        decode_samples(stats, strict, decode_images),
    )
    yield from pipeline
