"""The settings of one synthesis run, the plan they make, and what that plan would cost."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from mme5.data.schema import Modality, Task
from mme5.settings import at_least, check_types, required_settings, unknown_settings
from mme5.synthesis.client import ClientConfig
from mme5.synthesis.languages import default_language_weights
from mme5.synthesis.plan import COMBINATIONS, PlannedSample, make_plan, read_plan, write_plan
from mme5.synthesis.prompting import build_request, image_roles

PLAN = "plan.jsonl"


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

    def __post_init__(self) -> None:
        """Every setting checked now, before a run writes anything (its config.json included)."""
        self.client_config()
        at_least(self, {"num_samples": 1, "num_shards": 1, "shard_index": 0, "answer_retries": 0,
                        "shard_size": 1, "embed_batch_size": 1, "estimated_output_tokens": 0,
                        "estimated_image_tokens": 0, "english_share": 0})
        if self.english_share > 1:
            raise ValueError(f"english_share must be at most 1, got {self.english_share}")
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index must be below num_shards={self.num_shards}, got "
                             f"{self.shard_index}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SynthesisConfig:
        unknown_settings(values, {f.name for f in fields(cls)}, "synthesis settings",
                         "export it in the environment variable named by client.api_key_env (default "
                         "OPENAI_API_KEY)")
        required_settings(values, cls, "synthesis settings")
        return cls(**values)

    def client_config(self) -> ClientConfig:
        return ClientConfig.from_dict(dict(self.client))

    def output_identity(self, images: str | None, embedder: str | None) -> dict[str, Any]:
        """What defines the samples an output folder holds, the keys a resume must keep: the plan (its size,
        seed and mix, and its split into `num_shards` parts), how each sample is asked for (prompt form,
        neighbour ranks, model) and its inputs (`images`: the pool's fingerprint, `embedder`: the retrieval
        model's). How the calls are made (server, concurrency, retries, limits, prices, sampling) may change
        between runs; so may `shard_index`, which the part folder's name carries."""
        return {"num_samples": self.num_samples, "seed": self.seed, "english_share": self.english_share,
                "combination_weights": self.combination_weights, "num_shards": self.num_shards,
                "use_response_format": self.use_response_format, "positive_ranks": self.positive_ranks,
                "negative_ranks": self.negative_ranks, "model": self.client["model"], "images": images,
                "embedder": embedder}

    @property
    def work_dir(self) -> Path:
        """Where this job writes: the output folder, or a part folder of a job-array split."""
        out = Path(self.out)
        return out if self.num_shards == 1 else out / f"part-{self.shard_index:05d}-of-{self.num_shards:05d}"


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings of a synthesis YAML, checked for shape and types (top level and `client`), so that a
    list, a word where a number belongs or a mapping where a list belongs is named with the file and key."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings (key: value, as in "
                         f"configs/synthesis/default.yaml), found a {type(values).__name__}")
    check_types(values, SynthesisConfig, str(path))
    check_types(values.get("client") or {}, ClientConfig, f"{path}: client")
    return values


def planned_samples(config: SynthesisConfig) -> list[PlannedSample]:
    """The full plan from the settings."""
    combos = None
    if config.combination_weights:
        combos = {}
        for name, weight in config.combination_weights.items():
            try:
                task, modality = name.split("/")
                combos[(Task(task), Modality(modality))] = weight
            except ValueError:
                known = [f"{task}/{modality}" for task, modality in COMBINATIONS]
                raise ValueError(f"combination_weights: {name!r} is not one of {known}") from None
    return make_plan(config.num_samples, config.seed, combos, default_language_weights(config.english_share))


def load_or_write_plan(plan: list[PlannedSample], path: Path) -> list[PlannedSample]:
    """Write `plan` to `path`, or check that the plan already there is the same."""
    if path.exists():
        if read_plan(path) != plan:
            raise ValueError(f"{path} is the plan of other settings (num_samples, seed, weights); use a "
                             "new output folder or the settings it was made with")
    else:
        write_plan(plan, path)
    return plan


def estimate(config: SynthesisConfig, plan: list[PlannedSample]) -> dict[str, Any]:
    """Rough tokens and cost of synthesising `plan` (~4 characters a token, a fixed charge per image): in the
    configured mode (`cost_usd`) and in both, online prices and batch discount side by side."""
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
    by_mode = {mode: round(replace(client, mode=mode).price(input_tokens, output_tokens), 4)
               for mode in ("online", "batch")}
    return {"calls": len(plan), "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cost_usd": by_mode[client.mode], "cost_usd_by_mode": by_mode}
