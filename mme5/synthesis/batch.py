"""Batch mode: the plan's requests as Batch-API JSONL files, answered by OpenAI's Batch API (half price,
within 24 h) or by a local command (`vllm run-batch`), and committed through the online path's validation.

Exactly once. `batches.jsonl` (append-only, fsynced; the latest row per batch counts) records each batch
before and after every remote step; its `state` says what is done and so what comes next:

    written     input file on disk (`batches/<name>.jsonl`, its ids in `<name>.ids.json`, its sha256)  upload
    uploading   the upload was started (it may have reached the provider)                 look up, upload
    uploaded    file_id                                                                                 create
    creating    the create was started (it may have reached the provider)                 look up, create
    submitted   batch_id (and the last status seen: validating, in_progress, finalizing)                poll
    ended       the final status (completed, expired, failed, cancelled), output and error file ids   download
    downloaded  the answers on disk (`<name>.output.jsonl`, `<name>.errors.jsonl`)                      commit
    committed   every id settled: written, failed, or `again` (into a later batch, with what it cost)

A run killed anywhere resumes from the latest rows. A step that was started but not recorded as done
(`uploading`, `creating`: killed during or right after the call) is looked up at the provider by name before
it is tried again: the uploaded file's name and the batch's metadata carry the folder's token and the batch
name. Only then is the account's list read, newest first, and only until the name is found. So a planned
id goes into a new batch only when it is in no uncommitted batch, and nothing is submitted or paid twice.
An expired, failed or cancelled batch's unanswered ids go into the next batch, as do answers that fail
validation, until `answer_retries` extra submissions are spent; then the id is recorded as failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

from mme5.files import AtomicFile, atomic_write
from mme5.synthesis.answers import SampleInputs, commit_answer, record_failed
from mme5.synthesis.client import (
    SERVICE_STATUSES,
    ChatError,
    ClientConfig,
    ServiceError,
    Usage,
    _describe,
    chat_body,
    content_and_usage,
)
from mme5.synthesis.config import SynthesisConfig
from mme5.synthesis.plan import PlannedSample
from mme5.synthesis.validation import InvalidAnswer, parse_answer
from mme5.synthesis.workdir import append_row, failed_rows, jsonl_rows, repair_tail

LEDGER = "batches.jsonl"
FOLDER = "batches"
ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "expired", "failed", "cancelled")
UNANSWERED_ERRORS = {"batch_expired", "batch_cancelled"}
"""Error codes of requests the batch did not get to: resubmitted, not failed."""

log = logging.getLogger(__name__)


class Ledger:
    """The batches of one work folder (`batches.jsonl` and `batches/`)."""

    def __init__(self, work: Path):
        self.work, self.folder = work, work / FOLDER
        self.folder.mkdir(exist_ok=True)
        repair_tail(work / LEDGER)
        self.rows: dict[str, dict[str, Any]] = {row["name"]: row for row in jsonl_rows(work / LEDGER)}
        token = self.folder / "token"
        if not token.exists():  # names this folder's files and batches at the provider
            with atomic_write(token) as f:
                f.write(secrets.token_hex(8))
        self.token = token.read_text().strip()

    def record(self, name: str, state: str, **fields: Any) -> dict[str, Any]:
        """Append the batch's new row (its previous fields kept) and return it."""
        row = {**self.rows.get(name, {}), **fields, "name": name, "state": state}
        append_row(self.work / LEDGER, row)
        self.rows[name] = row
        return row

    def path(self, name: str, kind: str) -> Path:
        """`kind`: ".jsonl" (input), ".ids.json", ".output.jsonl" or ".errors.jsonl"."""
        return self.folder / f"{name}{kind}"

    def ids(self, name: str) -> list[str]:
        return json.loads(self.path(name, ".ids.json").read_text(encoding="utf-8"))

    def unsettled(self) -> list[str]:
        """Batches not committed yet, in the order they were written."""
        return [name for name, row in self.rows.items() if row["state"] != "committed"]

    def in_flight(self) -> set[str]:
        return {sample_id for name in self.unsettled() for sample_id in self.ids(name)}

    def carried(self) -> dict[str, dict[str, Any]]:
        """Per id to be submitted again, its `again` entry (attempts, calls, usage so far) from the last
        committed batch that held it; an id that batch settled (written or failed) has none."""
        carried: dict[str, dict[str, Any]] = {}
        for name, row in self.rows.items():
            if row["state"] == "committed":
                for sample_id in self.ids(name):
                    carried.pop(sample_id, None)
                carried.update(row.get("again") or {})
        return carried

    def filename(self, name: str) -> str:
        """The input file's name at the provider: unique to this folder and batch."""
        return f"mme5-{self.token}-{name}.jsonl"

    def metadata(self, name: str) -> dict[str, str]:
        return {"mme5_folder": self.token, "mme5_batch": name}


def request_line(planned: PlannedSample, body: dict[str, Any]) -> bytes:
    """One Batch-API input line: the plan id as `custom_id`, the online call's body."""
    return (json.dumps({"custom_id": planned.id, "method": "POST", "url": ENDPOINT, "body": body},
                       ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def write_batches(ledger: Ledger, lines: Iterator[tuple[str, bytes]], max_requests: int,
                  max_bytes: int) -> list[str]:
    """Write (id, line) pairs into input files of at most `max_requests` lines and `max_bytes` bytes, each
    recorded as `written` once it is complete on disk; returns the new batch names."""
    names: list[str] = []
    current: tuple[str, AtomicFile, Any, list[str]] | None = None
    size = 0

    def finish() -> None:
        name, file, digest, ids = current
        with atomic_write(ledger.path(name, ".ids.json")) as f:
            json.dump(ids, f)
        file.commit()
        ledger.record(name, "written", sha256=digest.hexdigest(), requests=len(ids), bytes=size)
        names.append(name)

    try:
        for sample_id, line in lines:
            if len(line) > max_bytes:
                raise ValueError(f"the request of {sample_id} is {len(line)} bytes, more than "
                                 f"client.batch_max_bytes={max_bytes}")
            if current is not None and (len(current[3]) == max_requests or size + len(line) > max_bytes):
                finish()
                current = None
            if current is None:
                name = f"batch-{len(ledger.rows):05d}"
                current, size = (name, AtomicFile(ledger.path(name, ".jsonl")), hashlib.sha256(), []), 0
            current[1].file.write(line)
            current[2].update(line)
            current[3].append(sample_id)
            size += len(line)
        if current is not None:
            finish()
    except BaseException:
        if current is not None and not current[1].file.closed:
            current[1].discard()
        raise
    return names


class BatchAPI:
    """The Batch API's files and batches endpoints through the openai client (its own retries for 429,
    5xx and dropped connections). Any error that is left stops the run (`ServiceError`): it concerns the
    whole batch, and the ledger already says where to resume."""

    def __init__(self, config: ClientConfig):
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ChatError(f"environment variable {config.api_key_env} (ClientConfig.api_key_env) is "
                            "not set")
        self.where = config.base_url or "the default endpoint"
        self._client = openai.OpenAI(api_key=api_key, base_url=config.base_url, timeout=config.timeout_s,
                                     max_retries=config.max_attempts - 1)

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except openai.APIStatusError as error:
            why = SERVICE_STATUSES.get(error.status_code, "refused")
            raise ServiceError(f"batch API at {self.where}, {what}: {why} ({_describe(error)})",
                               status_code=error.status_code) from error
        except openai.APIConnectionError as error:
            raise ServiceError(f"batch API at {self.where}, {what}: server unreachable "
                               f"({_describe(error)})") from error

    def find_file(self, filename: str) -> str | None:
        """The id of this account's batch file named `filename`, reading the (paginated) list only until it
        is found."""
        return self._call("listing files", lambda: next(
            (f.id for f in self._client.files.list(purpose="batch") if f.filename == filename), None))

    def upload(self, path: Path, filename: str) -> str:
        with open(path, "rb") as f:
            return self._call(f"uploading {filename}",
                              lambda: self._client.files.create(file=(filename, f), purpose="batch").id)

    def find_batch(self, metadata: dict[str, str]) -> str | None:
        """The id of this account's batch with `metadata`, reading the (paginated) list only until found."""
        return self._call("listing batches", lambda: next(
            (b.id for b in self._client.batches.list() if (b.metadata or {}) == metadata), None))

    def create(self, file_id: str, metadata: dict[str, str]) -> str:
        return self._call(f"creating the batch of {file_id}", lambda: self._client.batches.create(
            completion_window="24h", endpoint=ENDPOINT, input_file_id=file_id, metadata=metadata).id)

    def status(self, batch_id: str) -> dict[str, Any]:
        batch = self._call(f"polling {batch_id}", lambda: self._client.batches.retrieve(batch_id))
        counts = batch.request_counts.model_dump() if batch.request_counts else None
        return {"status": batch.status, "output_file_id": batch.output_file_id,
                "error_file_id": batch.error_file_id, "request_counts": counts}

    def download(self, file_id: str, path: Path) -> None:
        content = self._call(f"downloading {file_id}", lambda: self._client.files.content(file_id).content)
        with atomic_write(path, "wb") as f:
            f.write(content)


def drive_remote(ledger: Ledger, api: BatchAPI, names: list[str], poll_s: float) -> int:
    """Bring each batch of `names` to `downloaded` through the API; returns how many batches were created."""
    created = 0
    for name in names:
        row = ledger.rows[name]
        if row["state"] in ("written", "uploading"):
            filename = ledger.filename(name)
            # an upload started before a kill may have reached the provider: look for it first
            file_id = api.find_file(filename) if row["state"] == "uploading" else None
            if file_id is None:
                ledger.record(name, "uploading")
                file_id = api.upload(ledger.path(name, ".jsonl"), filename)
            row = ledger.record(name, "uploaded", file_id=file_id)
        if row["state"] in ("uploaded", "creating"):  # likewise the create
            batch_id = api.find_batch(ledger.metadata(name)) if row["state"] == "creating" else None
            if batch_id is None:
                ledger.record(name, "creating")
                batch_id, created = api.create(row["file_id"], ledger.metadata(name)), created + 1
            ledger.record(name, "submitted", batch_id=batch_id)
    waiting = [name for name in names if ledger.rows[name]["state"] == "submitted"]
    while waiting:
        for name in list(waiting):
            row = ledger.rows[name]
            info = api.status(row["batch_id"])
            if info["status"] in TERMINAL:
                ledger.record(name, "ended", **info)
                waiting.remove(name)
            elif info["status"] != row.get("status"):
                ledger.record(name, "submitted", **info)
        if waiting:
            time.sleep(poll_s)
    for name in names:
        row = ledger.rows[name]
        if row["state"] == "ended":
            for key, kind in (("output_file_id", ".output.jsonl"), ("error_file_id", ".errors.jsonl")):
                if row.get(key):
                    api.download(row[key], ledger.path(name, kind))
            ledger.record(name, "downloaded")
    return created


def drive_local(ledger: Ledger, command: str, names: list[str]) -> int:
    """Answer each written batch of `names` with the local command; returns how many it ran. A killed
    command is simply run again: nothing was paid, and only a complete output file is taken."""
    ran = 0
    for name in names:
        if ledger.rows[name]["state"] != "written":
            continue
        output = ledger.path(name, ".output.jsonl")
        partial = output.with_name(output.name + ".partial")
        args = [part.format(input=ledger.path(name, ".jsonl"), output=partial)
                for part in shlex.split(command)]
        log.info("batch %s: %s", name, shlex.join(args))
        try:
            result = subprocess.run(args, check=False)
        except OSError as error:
            raise ServiceError(f"local batch command {args[0]!r} cannot run: {error}") from None
        if result.returncode != 0 or not partial.exists():
            raise ServiceError(f"local batch command exited with status {result.returncode}"
                               f"{'' if partial.exists() else ' without writing ' + str(partial)}: "
                               f"{shlex.join(args)}")
        os.replace(partial, output)
        ledger.record(name, "downloaded", status="completed")
        ran += 1
    return ran


def read_results(ledger: Ledger, name: str) -> dict[str, dict[str, Any]]:
    """The output and error lines of a downloaded batch by `custom_id`."""
    results = {}
    for kind in (".output.jsonl", ".errors.jsonl"):
        path = ledger.path(name, kind)
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                    results[line["custom_id"]] = line
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{number}: not a batch output line with a custom_id") from None
    return results


@dataclass
class BatchOutcome:
    """What committing batches did in this run (for `summary.json`'s `this_run`)."""

    written: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)
    calls: int = 0
    usage: Usage = field(default_factory=Usage)
    batches: int = 0


@dataclass(frozen=True)
class LineResult:
    """One id's line of a batch's output: the answer, or why there is none and whether to submit again."""

    content: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    reason: str = ""
    detail: str = ""
    retryable: bool = True


def line_result(line: dict[str, Any] | None, batch_status: str) -> LineResult:
    """Read one output or error line (None: the id has none, the batch ended before it)."""
    if line is None:
        return LineResult(reason=f"batch_{batch_status}", detail=f"no answer: the batch ended {batch_status}")
    response, error = line.get("response") or {}, line.get("error") or {}
    status, body = response.get("status_code"), response.get("body")
    if status == 200:
        try:
            content, usage = content_and_usage(body)
        except (ValueError, LookupError, TypeError):
            return LineResult(reason="bad_response", detail="status 200 without a chat completion")
        return LineResult(content, int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))
    body_error = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    detail = str(error.get("message") or body_error.get("message") or "no detail")[:500]
    if error.get("code") in UNANSWERED_ERRORS:
        return LineResult(reason=error["code"], detail=detail)
    if status is None:
        return LineResult(reason=str(error.get("code") or "batch_error"), detail=detail, retryable=False)
    return LineResult(reason=f"chat_http_{status}", detail=detail, retryable=status == 429 or status >= 500)


def commit_batch(ledger: Ledger, name: str, config: SynthesisConfig, plan: dict[str, PlannedSample],
                 inputs_of: Callable[[PlannedSample], SampleInputs], done: set[str],
                 outcome: BatchOutcome) -> None:
    """Settle every id of a downloaded batch: commit its valid answer, record it as failed, or put it into
    `again` (no answer, a retryable error, or an invalid answer with submissions left). Ids settled before a
    kill (staged or packed: `done`; failed by this batch) are skipped, so a resumed commit repeats none."""
    client, row = config.client_config(), ledger.rows[name]
    results, carried = read_results(ledger, name), ledger.carried()
    failed_here = {i for i, failure in failed_rows(ledger.work).items() if failure.get("batch") == name}
    again: dict[str, dict[str, Any]] = {}
    for sample_id in ledger.ids(name):
        if sample_id in done or sample_id in failed_here:
            continue
        planned, before = plan[sample_id], carried.get(sample_id, {})
        attempts, calls = before.get("attempts", 0) + 1, before.get("calls", 0)
        usage = Usage(**before.get("usage", {}))
        result = line_result(results.get(sample_id), row.get("status", "completed"))
        reason, detail, retryable = result.reason, result.detail, result.retryable
        if result.content is not None:
            tokens = (result.input_tokens, result.output_tokens)
            spent = Usage(*tokens, client.price(*tokens))
            calls, usage = calls + 1, usage + spent
            outcome.calls, outcome.usage = outcome.calls + 1, outcome.usage + spent
            try:
                inputs = inputs_of(planned)
                parsed = parse_answer(planned, result.content, inputs.images)
            except InvalidAnswer as error:
                reason, detail = error.reason, error.detail
            except Exception as error:  # one bad sample (an unreadable image) must not stop the run
                reason, detail, retryable = type(error).__name__, str(error)[:500], False
            else:  # a failed commit (a full disk) is the run's failure: it propagates and stops the run
                commit_answer(ledger.work, planned, parsed, inputs.keys, attempts, calls, usage, client.model,
                              batch=name)
                done.add(sample_id)
                outcome.written.append(sample_id)
                continue
        if retryable and attempts <= config.answer_retries:
            again[sample_id] = {"attempts": attempts, "calls": calls, "usage": asdict(usage),
                                "reason": reason}
        else:
            record_failed(ledger.work, planned, reason, detail, attempts, calls, usage, client.model,
                          batch=name)
            outcome.failed.append(sample_id)
            outcome.failed_reasons.append(reason)
    ledger.record(name, "committed", again=again)
    for kind in (".jsonl", ".output.jsonl", ".errors.jsonl"):  # the large files; the ids stay
        ledger.path(name, kind).unlink(missing_ok=True)


def run_batches(config: SynthesisConfig, work: Path, plan: list[PlannedSample], todo: list[PlannedSample],
                inputs_of: Callable[[PlannedSample], SampleInputs], done: set[str],
                outcome: BatchOutcome) -> None:
    """Batch mode for `todo` (and the batches a killed run left open): write, submit or run, commit, and
    again for the ids that need another submission, until every id is settled. Counts into `outcome`
    (kept when a service or disk error stops the run)."""
    client = config.client_config()
    ledger, by_id = Ledger(work), {s.id: s for s in plan}
    api = None if client.local_batch_command else BatchAPI(client)
    names = ledger.unsettled()
    in_flight = ledger.in_flight()
    new = [s for s in todo if s.id not in in_flight]
    while names or new:
        names += write_batches(ledger, _lines(config, work, new, inputs_of, outcome),
                               client.batch_max_requests, client.batch_max_bytes)
        if api is None:
            outcome.batches += drive_local(ledger, client.local_batch_command, names)
        else:
            outcome.batches += drive_remote(ledger, api, names, client.batch_poll_s)
        for name in names:
            commit_batch(ledger, name, config, by_id, inputs_of, done, outcome)
        again = {sample_id for name in names for sample_id in ledger.rows[name]["again"]}
        names, new = [], [s for s in plan if s.id in again]


def _lines(config: SynthesisConfig, work: Path, todo: list[PlannedSample],
           inputs_of: Callable[[PlannedSample], SampleInputs],
           outcome: BatchOutcome) -> Iterator[tuple[str, bytes]]:
    """(id, input line) per sample; a sample whose request cannot be made (an unreadable image) is recorded
    as failed here, as online."""
    client = config.client_config()
    for planned in todo:
        try:
            body = chat_body(client, **inputs_of(planned).chat_arguments(config))
        except Exception as error:  # as online: the sample fails, the run goes on
            record_failed(work, planned, type(error).__name__, str(error)[:500], 1, 0, Usage(), client.model)
            outcome.failed.append(planned.id)
            outcome.failed_reasons.append(type(error).__name__)
            continue
        yield planned.id, request_line(planned, body)
