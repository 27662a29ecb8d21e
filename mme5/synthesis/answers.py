"""One planned sample's request and outcome, the same in online and batch mode: the neighbour images and
prompt it is asked with, and its answer committed as a sample or recorded as a failure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mme5.data.shards import sample_to_record
from mme5.synthesis.client import Usage
from mme5.synthesis.config import SynthesisConfig
from mme5.synthesis.images import ImagePool, NeighbourIndex, select_images
from mme5.synthesis.plan import PlannedSample
from mme5.synthesis.prompting import Request, build_request
from mme5.synthesis.validation import ParsedAnswer
from mme5.synthesis.workdir import STAGING, commit_sample, record_failure


@dataclass(frozen=True)
class SampleInputs:
    """What the MLLM is shown for one sample: pool keys and bytes of its images by role, and the request."""

    keys: dict[str, str]
    images: dict[str, bytes]
    request: Request

    def chat_arguments(self, config: SynthesisConfig) -> dict[str, Any]:
        """Keyword arguments of `ChatClient.complete` and `client.chat_body`."""
        request = self.request
        return {"prompt": request.prompt if config.use_response_format else request.fallback_prompt,
                "images": [self.images[role] for role in request.image_roles], "system": request.system,
                "json_schema": request.schema, "schema_name": request.schema_name,
                "use_response_format": config.use_response_format}


def sample_inputs(planned: PlannedSample, pool: ImagePool | None, index: NeighbourIndex | None,
                  read_image: Callable[[str], bytes] | None) -> SampleInputs:
    """The images (picked by the retrieval model, deterministic per id) and request of `planned`."""
    keys = select_images(planned, pool, index) if (pool is not None and index is not None) else {}
    images = {role: read_image(key) for role, key in keys.items()}
    return SampleInputs(keys, images, build_request(planned, len(keys)))


def commit_answer(work: Path, planned: PlannedSample, parsed: ParsedAnswer, keys: dict[str, str],
                  attempts: int, calls: int, usage: Usage, model: str,
                  **extra: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Commit a validated answer as `staging/<id>.tar`; returns its (record, meta). `usage`: every call the
    sample cost (invalid answers included), kept with it so the folder's total survives kill -9."""
    meta = {**parsed.metadata, "images": keys, "attempts": attempts, "calls": calls,
            "usage": asdict(usage), "model": model, **extra}
    record = sample_to_record(parsed.sample)
    commit_sample(work / STAGING, record, planned.id, meta)
    return record, meta


def record_failed(work: Path, planned: PlannedSample, reason: str, detail: str, attempts: int, calls: int,
                  usage: Usage, model: str, **extra: Any) -> None:
    """Record `planned` as failed (a row of `failed.jsonl`) with what it cost."""
    record_failure(work, {"id": planned.id, "reason": reason, "detail": detail, "attempts": attempts,
                          "calls": calls, "usage": asdict(usage), "model": model, **extra})
