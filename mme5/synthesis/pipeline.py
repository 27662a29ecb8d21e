"""The synthesis run: plan → images → one MLLM call per sample → validated samples in shards.

Durability: the plan is on disk before any call. Each finished sample is committed at once as its own
small tar (`staging/<id>.tar`, written to a temporary file, fsynced and renamed), each failure as one
fsynced line of `failed.jsonl`; both carry the calls, tokens and cost the sample took. While the calls run,
a thread packs the committed samples into shards with `ShardWriter` in plan order and appends their
answer metadata to `answers.jsonl`; at the end (and at the start of a resumed run) `pack` takes whatever is
still staged, and the staging files are removed only once the shard manifest is complete and the answer
rows are fsynced. A run killed at any point (kill -9 included) restarts from what is on disk without
calling the MLLM again for a finished id, and without writing any sample twice. Failed ids are skipped on
resume unless `retry_failed`; `failed.jsonl` is append-only, the latest row per id counts, and a written id
is not failed.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import os
import queue
import tarfile
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme5.data.schema import Modality, Task
from mme5.data.shards import MANIFEST, ShardWriter, read_manifest, record_to_sample, sample_to_record
from mme5.synthesis.client import ChatClient, ChatError, ClientConfig, Usage
from mme5.synthesis.images import Embed, ImagePool, NeighbourIndex, encoder_embedder, select_images
from mme5.synthesis.languages import default_language_weights
from mme5.synthesis.plan import PlannedSample, make_plan, read_plan, split, write_plan
from mme5.synthesis.prompting import build_request, image_roles
from mme5.synthesis.validation import InvalidAnswer, parse_answer

PLAN = "plan.jsonl"
FAILED = "failed.jsonl"
ANSWERS = "answers.jsonl"
SUMMARY = "summary.json"
STAGING = "staging"

log = logging.getLogger(__name__)


@dataclass
class SynthesisConfig:
    """One synthesis run (see configs/synthesis/default.yaml). The API key is never part of it: the client
    reads the environment variable named by `client.api_key_env`."""

    out: str
    images: str | None = None
    embedder: str | None = None
    """Model folder of the retrieval model that picks neighbour images (the project's encoder)."""
    num_samples: int = 1000
    seed: int = 0
    english_share: float = 0.3
    combination_weights: dict[str, float] | None = None
    """"task/modality" → weight, e.g. {"retrieval/I2T": 2.0}; None: all combinations equally."""
    shard_index: int = 0
    num_shards: int = 1
    use_response_format: bool = True
    answer_retries: int = 2
    """Extra calls for an answer that fails validation before the sample is recorded as failed."""
    shard_size: int = 1000
    positive_ranks: list[int] = field(default_factory=lambda: [1, 5])
    negative_ranks: list[int] = field(default_factory=lambda: [10, 50])
    embed_batch_size: int = 16
    embedding_cache: str | None = None
    """Folder of the pool-embedding cache; None: `<out>/cache`."""
    estimated_output_tokens: int = 900
    estimated_image_tokens: int = 800
    progress: bool = True
    retry_failed: bool = False
    """Resume re-attempts the ids recorded in `failed.jsonl` (default: skip them, they cost money)."""
    client: dict[str, Any] = field(default_factory=lambda: {"model": "gpt-4o"})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SynthesisConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown synthesis settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def client_config(self) -> ClientConfig:
        return ClientConfig(**self.client)

    @property
    def work_dir(self) -> Path:
        """Where this job writes: the output folder, or a part folder of a job-array split."""
        out = Path(self.out)
        return out if self.num_shards == 1 else out / f"part-{self.shard_index:05d}-of-{self.num_shards:05d}"


def planned_samples(config: SynthesisConfig) -> list[PlannedSample]:
    """The full plan from the settings."""
    combos = None
    if config.combination_weights:
        combos = {}
        for name, weight in config.combination_weights.items():
            task, modality = name.split("/")
            combos[(Task(task), Modality(modality))] = weight
    return make_plan(config.num_samples, config.seed, combos, default_language_weights(config.english_share))


def load_or_write_plan(config: SynthesisConfig) -> list[PlannedSample]:
    """Write the plan to `<out>/plan.jsonl`, or check that an existing one is the plan of these settings."""
    plan = planned_samples(config)
    path = Path(config.out) / PLAN
    if path.exists():
        if read_plan(path) != plan:
            raise ValueError(f"{path} is the plan of other settings (num_samples, seed, weights); use a "
                             "new output folder or the settings it was made with")
    else:
        write_plan(plan, path)
    return plan


def estimate(config: SynthesisConfig, plan: list[PlannedSample]) -> dict[str, Any]:
    """Rough tokens and cost of synthesising `plan` (~4 characters a token, a fixed charge per image)."""
    client = config.client_config()
    input_tokens = 0
    for planned in plan:
        n_images = len(image_roles(planned.modality))
        request = build_request(planned, n_images)
        prompt = request.prompt if config.use_response_format else request.fallback_prompt
        schema = len(json.dumps(request.schema)) if config.use_response_format else 0
        input_tokens += (len(prompt) + len(request.system) + schema) // 4
        input_tokens += n_images * config.estimated_image_tokens
    output_tokens = len(plan) * config.estimated_output_tokens
    cost = (input_tokens * client.input_usd_per_million + output_tokens * client.output_usd_per_million) / 1e6
    return {"calls": len(plan), "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cost_usd": round(cost, 4)}


# ----------------------------------------------------------------------------- on-disk state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_sample(staging: Path, record: dict[str, bytes], sample_id: str, meta: dict[str, Any]) -> None:
    """Write one finished sample atomically as `staging/<id>.tar` (record members + `meta.json`)."""
    members = {f"{sample_id}.{ext}": data for ext, data in record.items()}
    members["meta.json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=f".{sample_id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, staging / f"{sample_id}.tar")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(staging)


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
    line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    with _APPEND_LOCK, open(work / FAILED, "ab") as f:
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


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
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
    return {row["id"]: row for row in _jsonl_rows(work / FAILED)}


def usage_of(row: dict[str, Any]) -> dict[str, float]:
    """The calls, tokens and cost a sample's meta or failure row records (old rows: what is there)."""
    usage = row.get("usage") or {}
    return {"calls": row.get("calls") or 0, "input_tokens": usage.get("input_tokens") or 0,
            "output_tokens": usage.get("output_tokens") or 0, "cost_usd": usage.get("cost_usd") or 0.0}


def total_usage(work: Path) -> dict[str, Any]:
    """Calls, tokens and cost over every run of this folder: each written sample's answer row (all its
    calls, invalid answers included) plus every failure row ever appended (superseded ones too: they were
    paid for). Read after packing, when every committed sample has its row in `answers.jsonl`."""
    total = Counter()
    for row in _jsonl_rows(work / ANSWERS) + _jsonl_rows(work / FAILED):
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
    answered = {row["id"] for row in _jsonl_rows(work / ANSWERS)}
    todo = [s.id for s in plan if s.id in staged and (s.id not in done or s.id not in answered)]
    packed = 0
    with open(work / ANSWERS, "a", encoding="utf-8") as answers, \
            ShardWriter(work, max_count=shard_size, resume=True) as writer:
        for sample_id in todo:
            record, meta = read_staged(staged[sample_id])
            if sample_id not in done:
                writer.write(record_to_sample(record, decode_images=False))
                packed += 1
            if sample_id not in answered:
                row = {"id": sample_id, **meta}
                answers.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        answers.flush()
        os.fsync(answers.fileno())
    # The manifest is complete: every staged id is in a finished shard. Unlinks in parallel: on ext4 each
    # waits for the journal, and concurrent ones share its commits (512 files: ~1 s in turn, ~0.1-0.4 s so).
    with ThreadPoolExecutor(max_workers=16) as unlinker:
        list(unlinker.map(Path.unlink, staged.values()))
    return packed


class _Packer:
    """Packs this run's samples into shards while the calls go on, in a thread, in plan order.

    `todo` is the run's ids in plan order; each id is resolved once, as committed (`committed`, after its
    staging tar is durable) or failed (`failed`). The thread writes the resolved prefix: committed samples
    to the shards (from memory; from their staging tar once more than `max_buffered` wait), each with its
    `answers.jsonl` row. Staging files stay until the final `pack`, which also takes over whatever this
    packer did not get to (a crash, an error here): the packer only saves work, it is never needed.
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
            with open(self.work / ANSWERS, "a", encoding="utf-8") as answers, \
                    ShardWriter(self.work, max_count=self.shard_size, resume=True) as writer:
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
                        writer.write(record_to_sample(record, decode_images=False))
                        self.packed.append(sample_id)
                        row = {"id": sample_id, **meta}
                        answers.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                    if ended and position < len(self.todo):  # ids never resolved (an interrupted run)
                        raise RuntimeError(f"{len(self.todo) - position} ids left unresolved")
                answers.flush()
                os.fsync(answers.fileno())
        except BaseException as error:  # the final pack repairs (its rows and shards are idempotent)
            self.error = error


# ----------------------------------------------------------------------------- the run


@dataclass
class _Stats:
    written: int = 0
    failed: Counter = field(default_factory=Counter)
    retried_written: int = 0


async def _synthesise(config: SynthesisConfig, todo: list[PlannedSample], pool: ImagePool | None,
                      index: NeighbourIndex | None, work: Path, client: ChatClient, bar: tqdm,
                      retried: frozenset[str] = frozenset(), packer: _Packer | None = None) -> _Stats:
    stats = _Stats()
    # Recent pool images, so a neighbour image used by many samples is read (and base64-encoded, see
    # client.data_url) once rather than per request.
    read_image = functools.lru_cache(maxsize=32)(pool.read) if pool is not None else None
    queue: asyncio.Queue[PlannedSample] = asyncio.Queue()
    for planned in todo:
        queue.put_nowait(planned)

    async def one(planned: PlannedSample) -> None:
        attempts, usage = 0, Usage()
        try:
            keys = select_images(planned, pool, index) if (pool is not None and index is not None) else {}
            request = build_request(planned, len(keys))
            images = {role: read_image(key) for role, key in keys.items()}
            while True:
                attempts += 1
                result = await client.complete(
                    request.prompt if config.use_response_format else request.fallback_prompt,
                    [images[role] for role in request.image_roles], system=request.system,
                    json_schema=request.schema, schema_name=request.schema_name,
                    use_response_format=config.use_response_format)
                usage += result.usage
                try:
                    parsed = parse_answer(planned, result.content, images)
                    break
                except InvalidAnswer:
                    if attempts > config.answer_retries:
                        raise
            # Usage: every call this sample cost (invalid answers included), committed with the sample so
            # that the total over resumed runs survives kill -9 (see total_usage).
            meta = {**parsed.metadata, "images": keys, "attempts": attempts, "calls": attempts,
                    "usage": asdict(usage)}
            # In a thread: the fsyncs must not stall the event loop that keeps the other requests going.
            record = sample_to_record(parsed.sample)
            await asyncio.to_thread(commit_sample, work / STAGING, record, planned.id, meta)
            if packer is not None:
                packer.committed(planned.id, record, meta)
            stats.written += 1
            stats.retried_written += planned.id in retried
        except InvalidAnswer as e:
            await _fail(planned, e.reason, e.detail, attempts, attempts, usage)
        except ChatError as e:
            reason = f"chat_http_{e.status_code}" if e.status_code is not None else "chat_error"
            # the last call got no answer; the earlier ones did (answers that failed validation)
            await _fail(planned, reason, str(e), attempts, attempts - 1, usage)
        except Exception as e:  # one bad sample (unreadable image, ...) must not stop the run
            await _fail(planned, type(e).__name__, str(e)[:500], attempts, max(0, attempts - 1), usage)
        bar.update(1)

    async def _fail(planned: PlannedSample, reason: str, detail: str, attempts: int, calls: int,
                    usage: Usage) -> None:
        row = {"id": planned.id, "reason": reason, "detail": detail, "attempts": attempts, "calls": calls,
               "usage": asdict(usage)}
        await asyncio.to_thread(record_failure, work, row)
        if packer is not None:
            packer.failed(planned.id)
        stats.failed[reason] += 1

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    workers = max(1, min(client.config.max_concurrency, len(todo)))
    await asyncio.gather(*(worker() for _ in range(workers)))
    return stats


def run(config: SynthesisConfig, embed: Embed | None = None, embed_name: str | None = None) -> dict[str, Any]:
    """Synthesise this job's share of the plan into `config.work_dir`; returns the summary.

    Resume: ids already written are skipped; ids recorded as failed are skipped too unless
    `config.retry_failed`, which re-attempts them (with the ids never attempted). `embed` replaces the
    encoder named by `config.embedder` (for tests, or another retrieval model).
    """
    start = time.monotonic()
    plan = split(load_or_write_plan(config), config.num_shards, config.shard_index)
    work = config.work_dir
    (work / STAGING).mkdir(parents=True, exist_ok=True)
    for stale in (work / STAGING).glob(".*.tmp"):
        stale.unlink()
    repair_tail(work / FAILED)
    _write_json(work / "config.json", asdict(config))
    pack(work, plan, config.shard_size)  # a killed run's staged samples first
    written = set(packed_ids(work))
    failed_before = set(failed_rows(work)) - written
    skip = written if config.retry_failed else written | failed_before
    todo = [s for s in plan if s.id not in skip]
    retried = frozenset(s.id for s in todo if s.id in failed_before)

    pool = index = None
    if any(image_needed(s) for s in todo):
        if config.images is None:
            raise ValueError("the plan has samples with images: set `images` (a folder or list of images)")
        pool = ImagePool(config.images)
        if embed is None:
            if config.embedder is None:
                raise ValueError("set `embedder` (a model folder) to pick neighbour images")
            embed, embed_name = encoder_embedder(config.embedder)
        index = NeighbourIndex(pool, embed, embed_name or getattr(embed, "name", "embedder"),
                               config.embedding_cache or Path(config.out) / "cache",
                               config.embed_batch_size, config.positive_ranks, config.negative_ranks)

    packer: _Packer | None = None

    async def main() -> tuple[_Stats, Any, int]:
        nonlocal packer
        async with ChatClient(config.client_config()) as client:
            packer = _Packer(work, [s.id for s in todo], config.shard_size)
            try:
                with tqdm(total=len(todo), desc="synthesis", unit="sample",
                          disable=not config.progress) as bar:
                    stats = await _synthesise(config, todo, pool, index, work, client, bar, retried, packer)
            finally:
                await asyncio.to_thread(packer.close)
            return stats, client.total, client.calls

    stats, usage, calls = asyncio.run(main()) if todo else (_Stats(), Usage(), 0)
    # The packer finished: every id is known without reading the shards back; otherwise pack reads them.
    packed = None if packer is not None and packer.error is not None else \
        written | set(packer.packed if packer is not None else ())
    pack(work, plan, config.shard_size, packed)
    summary = summarise(work, plan, packed)
    summary["this_run"] = {
        "attempted": len(todo), "retried": len(retried), "retried_written": stats.retried_written,
        "written": stats.written, "failed": sum(stats.failed.values()),
        "failed_by_reason": dict(stats.failed.most_common()), "calls": calls,
        "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
        "cost_usd": round(usage.cost_usd, 6), "wall_s": round(time.monotonic() - start, 3)}
    _write_json(work / SUMMARY, summary)
    print(json.dumps(summary, indent=2))
    return summary


def summarise(work: Path, plan: list[PlannedSample], packed: set[str] | None = None) -> dict[str, Any]:
    """The state of `work` on disk: planned, written, failed (the latest outcome per id: an id written
    since it failed is not failed), and the calls, tokens and cost over all runs (`total`). `packed`: the
    ids in the shards, if known (default: read from the shards)."""
    written = read_manifest(work)["num_samples"] if (work / MANIFEST).exists() else 0
    packed = set(packed_ids(work)) if packed is None else packed
    failures = Counter(row["reason"] for sample_id, row in failed_rows(work).items()
                       if sample_id not in packed)
    return {"planned": len(plan), "written": written, "failed": sum(failures.values()),
            "failed_by_reason": dict(failures.most_common()), "total": total_usage(work)}


def image_needed(planned: PlannedSample) -> bool:
    return "I" in planned.modality.query or "I" in planned.modality.target


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)

