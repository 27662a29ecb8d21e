"""The durable state of a synthesis work folder, and the packing of finished samples into shards.

Each finished sample is committed at once as its own small tar (`staging/<id>.tar`, atomic and fsynced),
each failure as one fsynced line of `failed.jsonl`; both carry the calls, tokens and cost the sample took.
Packing moves committed samples into shards (`ShardWriter`) in plan order, each with its row in
`answers.jsonl`: during the run in a thread (`Packer`), and at the end, or at the start of a resumed run,
by `pack`, which takes whatever is still staged. Staging files are removed only once the shard manifest is
complete and the answer rows are fsynced, so a run killed at any point (kill -9 included) restarts from
what is on disk without calling the MLLM again for a finished id and without writing any sample twice.
`failed.jsonl` is append-only, the latest row per id counts, and a written id is not failed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mme5.data.shards import MANIFEST, ShardWriter, read_manifest, record_to_sample
from mme5.files import atomic_write, remove_stale
from mme5.synthesis.plan import PlannedSample

FAILED = "failed.jsonl"
ANSWERS = "answers.jsonl"
SUMMARY = "summary.json"
STAGING = "staging"

log = logging.getLogger(__name__)


def prepare(work: Path) -> None:
    """Make `work` ready for a (resumed) run: the staging folder exists, without an interrupted write's
    temporary files, and `failed.jsonl` ends with a whole line."""
    (work / STAGING).mkdir(parents=True, exist_ok=True)
    remove_stale(work / STAGING)
    repair_tail(work / FAILED)


def commit_sample(staging: Path, record: dict[str, bytes], sample_id: str, meta: dict[str, Any]) -> None:
    """Write one finished sample atomically as `staging/<id>.tar` (record members + `meta.json`)."""
    members = {f"{sample_id}.{ext}": data for ext, data in record.items()}
    members["meta.json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    with atomic_write(staging / f"{sample_id}.tar", "wb") as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_staged(path: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(record keyed by extension, meta) of a staged sample."""
    record, meta = {}, {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name == "meta.json":
                meta = json.loads(data)
            else:
                record[member.name.split(".", 1)[1]] = data
    return record, meta


_APPEND_LOCK = threading.Lock()


def record_failure(work: Path, row: dict[str, Any]) -> None:
    """Append one failure row to `failed.jsonl`, fsynced. Rows are never rewritten: a later row for the
    same id (a `--retry-failed` run) supersedes an earlier one, and a committed sample supersedes both."""
    append_row(work / FAILED, row)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line to `path`, fsynced before this returns (a crash keeps it or tears only it)."""
    line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    with _APPEND_LOCK, open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) off a JSONL file, so the next append starts a fresh line."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a crash mid-append) is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def failed_rows(work: Path) -> dict[str, dict[str, Any]]:
    """The latest failure row per id (a later row supersedes an earlier one)."""
    return {row["id"]: row for row in jsonl_rows(work / FAILED)}


def usage_of(row: dict[str, Any]) -> dict[str, float]:
    """The calls, tokens and cost a sample's meta or failure row records (old rows: what is there)."""
    usage = row.get("usage") or {}
    return {"calls": row.get("calls") or 0, "input_tokens": usage.get("input_tokens") or 0,
            "output_tokens": usage.get("output_tokens") or 0, "cost_usd": usage.get("cost_usd") or 0.0}


def total_usage(answers: list[dict[str, Any]], failures: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls, tokens and cost over every run of a folder: each written sample's answer row (all its calls,
    invalid answers included) plus every failure row ever appended (superseded ones too: they were paid
    for). Read after packing, when every committed sample has its row in `answers.jsonl`."""
    total = Counter()
    for row in answers + failures:
        total.update(usage_of(row))
    return {"calls": int(total["calls"]), "input_tokens": int(total["input_tokens"]),
            "output_tokens": int(total["output_tokens"]), "cost_usd": round(total["cost_usd"], 6)}


def packed_ids(work: Path) -> list[str]:
    """Ids in the finished shards the manifest lists (complete or not)."""
    if not (work / MANIFEST).exists():
        return []
    ids = []
    for info in read_manifest(work)["shards"]:
        with tarfile.open(work / info["file"]) as tar:
            ids += [m.name[: -len(".json")] for m in tar.getmembers()
                    if m.name.endswith(".json") and m.name.count(".") == 1]
    return ids


def summarise(work: Path, plan: list[PlannedSample], packed: set[str] | None = None) -> dict[str, Any]:
    """The state of `work` on disk: planned, written (and by which model: rows from before models were
    recorded count as "unrecorded"), failed (the latest outcome per id: an id written since it failed is not
    failed), and the calls, tokens and cost over all runs (`total`). `packed`: the ids in the shards, if
    known (default: read from the shards)."""
    written = read_manifest(work)["num_samples"] if (work / MANIFEST).exists() else 0
    packed = set(packed_ids(work)) if packed is None else packed
    answers, failure_rows = jsonl_rows(work / ANSWERS), jsonl_rows(work / FAILED)
    latest = {row["id"]: row for row in failure_rows}
    failures = Counter(row["reason"] for sample_id, row in latest.items() if sample_id not in packed)
    by_model = Counter(row.get("model", "unrecorded") for row in answers)
    return {"planned": len(plan), "written": written, "failed": sum(failures.values()),
            "failed_by_reason": dict(failures.most_common()),
            "written_by_model": dict(by_model.most_common()), "total": total_usage(answers, failure_rows)}


class PackedOutput:
    """Where a packed sample goes: its entry in the shards and its row in `answers.jsonl`. On a clean exit
    the rows are fsynced, then the manifest is completed; on an error the finished shards are kept."""

    def __init__(self, work: Path, shard_size: int):
        self._answers = open(work / ANSWERS, "a", encoding="utf-8")
        try:
            self._writer = ShardWriter(work, max_count=shard_size, resume=True)
        except BaseException:
            self._answers.close()
            raise

    def add(self, sample_id: str, record: dict[str, bytes], meta: dict[str, Any], *, shard: bool = True,
            answer: bool = True) -> None:
        """Pack one committed sample; `shard`/`answer` False: that half is on disk already."""
        if shard:
            self._writer.write(record_to_sample(record, decode_images=False))
        if answer:
            self._answers.write(json.dumps({"id": sample_id, **meta}, ensure_ascii=False, sort_keys=True)
                                + "\n")

    def __enter__(self) -> PackedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._answers.flush()
                os.fsync(self._answers.fileno())
            self._writer.__exit__(exc_type, exc, tb)
        finally:
            self._answers.close()


def pack(work: Path, plan: list[PlannedSample], shard_size: int, packed: set[str] | None = None) -> int:
    """Move staged samples into shards in plan order; returns how many were packed now.

    A staged id already in a finished shard (a run killed while packing) is not written again, but still
    gets its `answers.jsonl` row if that row was lost; the rows are fsynced before any staged file goes.
    `packed`: the ids known to be in the shards already (default: read from the shards).
    """
    staging = work / STAGING
    staged = {p.stem: p for p in staging.glob("*.tar")} if staging.exists() else {}
    if not staged and (work / MANIFEST).exists() and read_manifest(work)["complete"]:
        return 0
    done = set(packed_ids(work)) if packed is None else packed
    repair_tail(work / ANSWERS)
    answered = {row["id"] for row in jsonl_rows(work / ANSWERS)}
    todo = [s.id for s in plan if s.id in staged and (s.id not in done or s.id not in answered)]
    with PackedOutput(work, shard_size) as output:
        for sample_id in todo:
            record, meta = read_staged(staged[sample_id])
            output.add(sample_id, record, meta, shard=sample_id not in done, answer=sample_id not in answered)
    # The manifest is complete: every staged id is in a finished shard. Unlinks in parallel: on ext4 each
    # waits for the journal, and concurrent ones share its commits (512 files: ~1 s in turn, ~0.1-0.4 s so).
    with ThreadPoolExecutor(max_workers=16) as unlinker:
        list(unlinker.map(Path.unlink, staged.values()))
    return sum(sample_id not in done for sample_id in todo)


class Packer:
    """Packs this run's samples into shards while the calls go on, in a thread, in plan order.

    `todo` is the run's ids in plan order; each id is resolved once, as committed (`committed`, after its
    staging tar is durable) or failed (`failed`). The thread packs the resolved prefix: committed samples
    from memory, or from their staging tar once more than `max_buffered` wait. Staging files stay until the
    final `pack`, which also takes over whatever this packer did not get to (a crash, an error here): the
    packer only saves work, it is never needed.
    """

    _END = object()

    def __init__(self, work: Path, todo: list[str], shard_size: int, max_buffered: int = 1024):
        self.work, self.todo, self.shard_size, self.max_buffered = work, todo, shard_size, max_buffered
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._buffered = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.packed: list[str] = []
        """Ids written to the shards, valid once `close` returned and `error` is None."""
        self._thread = threading.Thread(target=self._run, name="synthesis-packer", daemon=True)
        self._thread.start()

    def committed(self, sample_id: str, record: dict[str, bytes], meta: dict[str, Any]) -> None:
        with self._lock:
            keep = self._buffered < self.max_buffered  # beyond the cap: read back from staging when due
            self._buffered += keep
        self._events.put((sample_id, (record if keep else None, meta)))

    def failed(self, sample_id: str) -> None:
        self._events.put((sample_id, None))

    def close(self) -> None:
        self._events.put(self._END)
        self._thread.join()
        if self.error is not None:
            log.warning("packing during the run stopped (%r); the final pack takes over", self.error)

    def _run(self) -> None:
        resolved: dict[str, Any] = {}
        position, ended = 0, False
        try:
            with PackedOutput(self.work, self.shard_size) as output:
                while not ended:
                    event = self._events.get()
                    if event is self._END:
                        ended = True
                    else:
                        resolved[event[0]] = event[1]
                    while position < len(self.todo) and self.todo[position] in resolved:
                        sample_id = self.todo[position]
                        done = resolved.pop(sample_id)
                        position += 1
                        if done is None:  # failed
                            continue
                        record, meta = done
                        if record is None:
                            record, meta = read_staged(self.work / STAGING / f"{sample_id}.tar")
                        else:
                            with self._lock:
                                self._buffered -= 1
                        output.add(sample_id, record, meta)
                        self.packed.append(sample_id)
                    if ended and position < len(self.todo):  # ids never resolved (an interrupted run)
                        raise RuntimeError(f"{len(self.todo) - position} ids left unresolved")
        except BaseException as error:  # the final pack repairs (its rows and shards are idempotent)
            self.error = error
