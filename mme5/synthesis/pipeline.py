"""The synthesis run: plan → images → one MLLM call per sample → validated samples in shards.

Durability: the plan is on disk before any call. Each finished sample is committed at once as its own
small tar (`staging/<id>.tar`, written to a temporary file, fsynced and renamed), each failure as one
fsynced line of `failed.jsonl`. At the end (and at the start of a resumed run) the staged samples are
packed into shards with `ShardWriter` in plan order, their answer metadata appended to `answers.jsonl`, and
the staging files removed only once the shard manifest is complete. A run killed at any point (kill -9
included) restarts from what is on disk without calling the MLLM again for a finished id, and without
writing any sample twice.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme5.data.schema import Modality, Task
from mme5.data.shards import MANIFEST, ShardWriter, read_manifest, record_to_sample, sample_to_record
from mme5.synthesis.client import ChatClient, ChatError, ClientConfig
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
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name == "meta.json":
                meta = json.loads(data)
            else:
                record[member.name.split(".", 1)[1]] = data
    return record, meta


def record_failure(work: Path, row: dict[str, Any]) -> None:
    with open(work / FAILED, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
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
    return {row["id"]: row for row in _jsonl_rows(work / FAILED)}


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


def pack(work: Path, plan: list[PlannedSample], shard_size: int) -> int:
    """Move staged samples into shards in plan order; returns how many were packed now."""
    staging = work / STAGING
    staged = {p.stem: p for p in staging.glob("*.tar")} if staging.exists() else {}
    if not staged and (work / MANIFEST).exists() and read_manifest(work)["complete"]:
        return 0
    done = set(packed_ids(work))
    todo = [s.id for s in plan if s.id in staged and s.id not in done]
    answered = {row["id"] for row in _jsonl_rows(work / ANSWERS)}
    with open(work / ANSWERS, "a", encoding="utf-8") as answers, \
            ShardWriter(work, max_count=shard_size, resume=True) as writer:
        for sample_id in todo:
            record, meta = read_staged(staged[sample_id])
            writer.write(record_to_sample(record, decode_images=False))
            if sample_id not in answered:
                row = {"id": sample_id, **meta}
                answers.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        answers.flush()
        os.fsync(answers.fileno())
    for path in staged.values():  # the manifest is complete: every staged id is in a finished shard
        path.unlink()
    return len(todo)


# ----------------------------------------------------------------------------- the run


@dataclass
class _Stats:
    written: int = 0
    failed: Counter = field(default_factory=Counter)


async def _synthesise(config: SynthesisConfig, todo: list[PlannedSample], pool: ImagePool | None,
                      index: NeighbourIndex | None, work: Path, client: ChatClient, bar: tqdm) -> _Stats:
    stats = _Stats()
    queue: asyncio.Queue[PlannedSample] = asyncio.Queue()
    for planned in todo:
        queue.put_nowait(planned)

    async def one(planned: PlannedSample) -> None:
        attempts = 0
        try:
            keys = select_images(planned, pool, index) if (pool is not None and index is not None) else {}
            request = build_request(planned, len(keys))
            images = {role: pool.read(key) for role, key in keys.items()}
            while True:
                attempts += 1
                result = await client.complete(
                    request.prompt if config.use_response_format else request.fallback_prompt,
                    [images[role] for role in request.image_roles], system=request.system,
                    json_schema=request.schema, schema_name=request.schema_name,
                    use_response_format=config.use_response_format)
                try:
                    parsed = parse_answer(planned, result.content, images)
                    break
                except InvalidAnswer:
                    if attempts > config.answer_retries:
                        raise
            meta = {**parsed.metadata, "images": keys, "attempts": attempts,
                    "usage": asdict(result.usage)}
            # In a thread: the fsyncs must not stall the event loop that keeps the other requests going.
            record = sample_to_record(parsed.sample)
            await asyncio.to_thread(commit_sample, work / STAGING, record, planned.id, meta)
            stats.written += 1
        except InvalidAnswer as e:
            _fail(planned, e.reason, e.detail, attempts)
        except ChatError as e:
            reason = f"chat_http_{e.status_code}" if e.status_code is not None else "chat_error"
            _fail(planned, reason, str(e), attempts)
        except Exception as e:  # one bad sample (unreadable image, ...) must not stop the run
            _fail(planned, type(e).__name__, str(e)[:500], attempts)
        bar.update(1)

    def _fail(planned: PlannedSample, reason: str, detail: str, attempts: int) -> None:
        record_failure(work, {"id": planned.id, "reason": reason, "detail": detail, "attempts": attempts})
        stats.failed[reason] += 1

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    workers = max(1, min(client.config.max_concurrency, len(todo)))
    await asyncio.gather(*(worker() for _ in range(workers)))
    return stats


def run(config: SynthesisConfig, embed: Embed | None = None, embed_name: str | None = None) -> dict[str, Any]:
    """Synthesise this job's share of the plan into `config.work_dir`; returns the summary.

    `embed` replaces the encoder named by `config.embedder` (for tests, or another retrieval model).
    """
    start = time.monotonic()
    plan = split(load_or_write_plan(config), config.num_shards, config.shard_index)
    work = config.work_dir
    (work / STAGING).mkdir(parents=True, exist_ok=True)
    for stale in (work / STAGING).glob(".*.tmp"):
        stale.unlink()
    _write_json(work / "config.json", asdict(config))
    pack(work, plan, config.shard_size)  # a killed run's staged samples first
    finished = set(packed_ids(work)) | set(failed_rows(work))
    todo = [s for s in plan if s.id not in finished]

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

    async def main() -> tuple[_Stats, Any, int]:
        async with ChatClient(config.client_config()) as client:
            with tqdm(total=len(todo), desc="synthesis", unit="sample", disable=not config.progress) as bar:
                stats = await _synthesise(config, todo, pool, index, work, client, bar)
            return stats, client.total, client.calls

    stats, usage, calls = asyncio.run(main()) if todo else (_Stats(), None, 0)
    pack(work, plan, config.shard_size)
    failures = Counter(row["reason"] for row in failed_rows(work).values())
    summary = {
        "planned": len(plan),
        "written": read_manifest(work)["num_samples"] if (work / MANIFEST).exists() else 0,
        "failed": sum(failures.values()),
        "failed_by_reason": dict(failures.most_common()),
        "this_run": {"attempted": len(todo), "written": stats.written, "failed": sum(stats.failed.values()),
                     "calls": calls,
                     "input_tokens": usage.input_tokens if usage else 0,
                     "output_tokens": usage.output_tokens if usage else 0,
                     "cost_usd": round(usage.cost_usd, 6) if usage else 0.0,
                     "wall_s": round(time.monotonic() - start, 3)},
    }
    _write_json(work / SUMMARY, summary)
    print(json.dumps(summary, indent=2))
    return summary


def image_needed(planned: PlannedSample) -> bool:
    return "I" in planned.modality.query or "I" in planned.modality.target


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)

