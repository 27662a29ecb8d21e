"""The synthesis run: plan → images → one MLLM call per sample → validated samples in shards.

The folder is claimed first (`owner`) and the plan is on disk before any call (`config.load_or_write_plan`);
every finished sample and every failure is committed to the work folder at once and packed into shards
while the calls go on (`workdir`), so a run killed at any point resumes from what is on disk. Failed ids
are skipped on resume unless `retry_failed`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme5.files import OutputFolder, path_fingerprint, remove_path, write_json
from mme5.synthesis.answers import commit_answer, record_failed, sample_inputs
from mme5.synthesis.batch import BatchOutcome, Ledger, run_batches
from mme5.synthesis.client import ChatClient, ChatError, ServiceError, Usage
from mme5.synthesis.config import PLAN, SynthesisConfig, load_or_write_plan, planned_samples
from mme5.synthesis.images import Embed, ImagePool, NeighbourIndex, encoder_embedder
from mme5.synthesis.owner import claim_output
from mme5.synthesis.plan import PlannedSample, split
from mme5.synthesis.validation import InvalidAnswer, parse_answer
from mme5.synthesis.workdir import (
    SUMMARY,
    Packer,
    failed_rows,
    pack,
    packed_ids,
    prepare,
    summarise,
)

log = logging.getLogger(__name__)


@dataclass
class _Stats:
    written: int = 0
    failed: Counter = field(default_factory=Counter)
    retried_written: int = 0


async def _synthesise(config: SynthesisConfig, todo: list[PlannedSample], pool: ImagePool | None,
                      index: NeighbourIndex | None, work: Path, client: ChatClient, bar: tqdm, stats: _Stats,
                      retried: frozenset[str] = frozenset(), packer: Packer | None = None) -> None:
    """Synthesise `todo` into `work`, counting into `stats`; a service or disk failure propagates."""
    # Recent pool images, so a neighbour image used by many samples is read (and base64-encoded, see
    # client.data_url) once rather than per request.
    read_image = functools.lru_cache(maxsize=32)(pool.read) if pool is not None else None
    queue: asyncio.Queue[PlannedSample] = asyncio.Queue()
    for planned in todo:
        queue.put_nowait(planned)

    async def one(planned: PlannedSample) -> None:
        attempts, usage = 0, Usage()
        try:
            inputs = sample_inputs(planned, pool, index, read_image)
            while True:
                attempts += 1
                result = await client.complete(**inputs.chat_arguments(config))
                usage += result.usage
                try:
                    parsed = parse_answer(planned, result.content, inputs.images)
                    break
                except InvalidAnswer:
                    if attempts > config.answer_retries:
                        raise
        except ServiceError:
            raise  # the service, not this sample: the run stops and nothing is recorded against the id
        except InvalidAnswer as e:
            await _fail(planned, e.reason, e.detail, attempts, attempts, usage)
            return
        except ChatError as e:
            reason = f"chat_http_{e.status_code}" if e.status_code is not None else "chat_error"
            # the last call got no answer; the earlier ones did (answers that failed validation)
            await _fail(planned, reason, str(e), attempts, attempts - 1, usage)
            return
        except Exception as e:  # one bad sample (unreadable image, ...) must not stop the run
            await _fail(planned, type(e).__name__, str(e)[:500], attempts, max(0, attempts - 1), usage)
            return
        # In a thread: the fsyncs must not stall the event loop that keeps the other requests going. A
        # failed commit (a full disk) is the run's failure, not the sample's: it propagates and stops the run.
        record, meta = await asyncio.to_thread(commit_answer, work, planned, parsed, inputs.keys, attempts,
                                               attempts, usage, client.config.model)
        if packer is not None:
            packer.committed(planned.id, record, meta)
        stats.written += 1
        stats.retried_written += planned.id in retried
        bar.update(1)

    async def _fail(planned: PlannedSample, reason: str, detail: str, attempts: int, calls: int,
                    usage: Usage) -> None:
        await asyncio.to_thread(record_failed, work, planned, reason, detail, attempts, calls, usage,
                                client.config.model)
        if packer is not None:
            packer.failed(planned.id)
        stats.failed[reason] += 1
        bar.update(1)

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    # The first error that escapes a worker (a service or disk failure) cancels the others at once.
    workers = max(1, min(client.config.max_concurrency, len(todo)))
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # re-raises a worker's error


def run(config: SynthesisConfig, embed: Embed | None = None, embed_name: str | None = None, *,
        overwrite: bool = False, allow_model_change: bool = False) -> dict[str, Any]:
    """Synthesise this job's share of the plan into `config.work_dir`; returns the summary.

    The folder is claimed first (`owner.claim_output`): another identity (plan, model, images, embedder)
    is refused before anything is written or paid, unless `overwrite` (start afresh) or, for the model
    alone, `allow_model_change`. Resume: ids already written are skipped; ids recorded as failed are
    skipped too unless `config.retry_failed`, which re-attempts them (with the ids never attempted).
    `embed` replaces the encoder named by `config.embedder` (for tests, or another retrieval model).
    """
    start = time.monotonic()
    plan = planned_samples(config)
    pool = _image_pool(config, split(plan, config.num_shards, config.shard_index))
    identity = config.output_identity(None, None) if pool is None else \
        config.output_identity(pool.fingerprint(), _embedder_identity(config, embed, embed_name))
    with claim_output(config, identity, overwrite=overwrite, allow_model_change=allow_model_change) as folder:
        summary = _run(config, folder, plan, pool, embed, embed_name, start)
        if "stopped" not in summary and summary["written"] + summary["failed"] == summary["planned"]:
            folder.complete(**{key: summary[key] for key in ("planned", "written", "failed",
                                                             "written_by_model")})
    return summary


def _image_pool(config: SynthesisConfig, share: list[PlannedSample]) -> ImagePool | None:
    """The pool a share with images draws from (read before the claim: its fingerprint is in the identity)."""
    if not any(s.needs_images for s in share):
        return None
    if config.images is None:
        raise ValueError("the plan has samples with images: set `images` (a folder or list of images)")
    return ImagePool(config.images)


def _embedder_identity(config: SynthesisConfig, embed: Embed | None, embed_name: str | None) -> str:
    """The retrieval model's identity without loading it: `embed`'s name, or the model files' fingerprint."""
    if embed is not None:
        return embed_name or getattr(embed, "name", "embedder")
    if config.embedder is None:
        raise ValueError("set `embedder` (a model folder) to pick neighbour images")
    if not Path(config.embedder).exists():
        raise FileNotFoundError(f"embedder {config.embedder}: no such model folder or file")
    return path_fingerprint(config.embedder)


def _run(config: SynthesisConfig, folder: OutputFolder, full_plan: list[PlannedSample],
         pool: ImagePool | None, embed: Embed | None, embed_name: str | None, start: float) -> dict[str, Any]:
    """`run` in its claimed folder."""
    work = folder.work
    shared = work if config.num_shards == 1 else Path(config.out)  # the plan and cache of every part
    try:
        plan = split(load_or_write_plan(full_plan, shared / PLAN), config.num_shards, config.shard_index)
        prepare(work)
        write_json(work / "config.json", asdict(config))
        pack(work, plan, config.shard_size)  # a killed run's staged samples first
        written = set(packed_ids(work))
        failed_before = set(failed_rows(work)) - written
        skip = written if config.retry_failed else written | failed_before
        todo = [s for s in plan if s.id not in skip]
        retried = frozenset(s.id for s in todo if s.id in failed_before)
        index = None
        # batch mode: the ids in batches a killed run left open need their images too (when committed)
        asked = todo if config.client_config().mode == "online" else [s for s in plan if s.id not in written]
        if pool is not None and any(s.needs_images for s in asked):
            if embed is None:
                embed, embed_name = encoder_embedder(config.embedder)
            index = NeighbourIndex(pool, embed, embed_name or getattr(embed, "name", "embedder"),
                                   config.embedding_cache or shared / "cache", config.embed_batch_size,
                                   config.positive_ranks, config.negative_ranks)
    except BaseException:
        if folder.state == "new":  # nothing was there and nothing was paid for: leave nothing behind,
            for path in work.iterdir():  # so that the corrected command is not refused as another output
                remove_path(path)
        raise

    packer: Packer | None = None
    client: ChatClient | None = None
    stats = _Stats()

    async def main() -> None:
        nonlocal packer, client
        async with ChatClient(config.client_config()) as client:
            packer = Packer(work, [s.id for s in todo], config.shard_size)
            try:
                with tqdm(total=len(todo), desc="synthesis", unit="sample",
                          disable=not config.progress) as bar:
                    await _synthesise(config, todo, pool, index, work, client, bar, stats, retried, packer)
            finally:
                await asyncio.to_thread(packer.close)

    batch_mode = config.client_config().mode == "batch"
    batches = BatchOutcome()
    stopped = None
    try:
        if batch_mode:
            read_image = functools.lru_cache(maxsize=32)(pool.read) if pool is not None else None
            run_batches(config, work, plan, todo,
                        functools.partial(sample_inputs, pool=pool, index=index, read_image=read_image),
                        set(written), batches)
        elif todo:
            asyncio.run(main())
    except (ServiceError, OSError) as error:  # the service or the disk, not a sample: stop, say why
        stopped = f"{type(error).__name__}: {error}"
        log.error("synthesis stopped: %s (nothing recorded against the ids in flight; fix it and run "
                  "the same command again to resume)", stopped)
    if batch_mode:
        stats.written, stats.failed = len(batches.written), Counter(batches.failed_reasons)
        stats.retried_written = len(retried.intersection(batches.written))
    usage, calls = (client.total, client.calls) if client is not None else (batches.usage, batches.calls)
    # The packer finished: every id is known without reading the shards back; otherwise pack reads them.
    packed = None if batch_mode or (packer is not None and packer.error is not None) else \
        written | set(packer.packed if packer is not None else ())
    pack(work, plan, config.shard_size, packed)
    summary = summarise(work, plan, packed)
    summary["this_run"] = {
        "attempted": len(todo), "retried": len(retried), "retried_written": stats.retried_written,
        "written": stats.written, "failed": sum(stats.failed.values()),
        "failed_by_reason": dict(stats.failed.most_common()), "calls": calls,
        "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
        "cost_usd": round(usage.cost_usd, 6), "wall_s": round(time.monotonic() - start, 3),
        "model": config.client["model"]}
    if batch_mode:
        summary["this_run"] |= {"mode": "batch", "batches": batches.batches}
        summary["batches"] = len(Ledger(work).rows)
    if folder.identity["model"] != config.client["model"]:  # --allow-model-change
        summary["this_run"]["folder_model"] = folder.identity["model"]
    if stopped is not None:
        summary["stopped"] = stopped
    write_json(work / SUMMARY, summary)
    print(json.dumps(summary, indent=2))
    return summary
