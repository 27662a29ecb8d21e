"""The one synthesis request per planned sample (mmE5 §3.1): prompt, system text and answer schema.

One MLLM call does the whole mmE5 "deep thinking" pass: multi-grained visual interpretation, the draft
(instruction, query, positive, hard negative) in the sampled language, a self-evaluation and the revised
data. The prose lives in `prompts/*.txt` (shipped as package data) so it can be read and tuned without
touching code; this module only fills in what differs per sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template
from typing import Any

from mme5.data.schema import Modality, Task
from mme5.synthesis.languages import language_name
from mme5.synthesis.plan import PlannedSample

SCHEMA_NAME = "mme5_synthetic_sample"
SIDE_FIELDS = ("instruction", "query", "positive", "hard_negative")
INTERPRETATION_FIELDS = ("general_description", "object_details", "context", "task_brainstorm")
SCORE_FIELDS = ("relevance", "plausibility", "clarity", "diversity")

# The few per-sample phrases, kept together: what a side holds, what each attached image is, and what
# each text field must contain given its side's content ("I", "T" or "IT").
_CONTENT = {"T": "text only (no image)", "I": "an image only (no text)",
            "IT": "an image together with a text"}
_IMAGE_ROLE = {
    "query": "the query image: it belongs to the query side.",
    "positive": "the positive image: it belongs to the positive side and is the correct target.",
    "negative": "the hard-negative image: it belongs to the hard-negative side; it looks similar to the "
                "positive image but must be a wrong target for the query.",
}
_FIELD_RULE = {
    "T": "the $role text, in $language.",
    "I": 'an empty string "": the $role is its image alone.',
    "IT": "the text that goes with the $role image, in $language.",
}


@dataclass(frozen=True)
class Request:
    """Everything one `ChatClient.complete` call needs, images aside.

    Attach the images in `image_roles` order (roles "query", "positive", "negative"). With a server that
    supports `response_format`, send `prompt` with `schema`; otherwise send `fallback_prompt` with
    `use_response_format=False`.
    """

    system: str
    prompt: str
    image_roles: tuple[str, ...]
    schema: dict[str, Any]
    schema_name: str = SCHEMA_NAME

    @property
    def fallback_prompt(self) -> str:
        return f"{self.prompt}\n\n{json_instruction(self.schema)}"


@cache
def template(name: str) -> str:
    """A template file from the installed package (`mme5/synthesis/prompts/<name>.txt`)."""
    return resources.files("mme5.synthesis").joinpath("prompts", f"{name}.txt").read_text("utf-8").strip()


def image_roles(modality: Modality) -> tuple[str, ...]:
    """Which images the call attaches, in order: the query image if the query holds one; the positive and
    hard-negative images if the targets hold images (as in mmE5, where they are retrieved for the query)."""
    roles = ("query",) if "I" in modality.query else ()
    return roles + (("positive", "negative") if "I" in modality.target else ())


def field_rules(planned: PlannedSample) -> dict[str, str]:
    """What each revised/draft field must hold for this sample; used in the prompt and the schema."""
    language, modality = language_name(planned.language), Modality(planned.modality)
    parts = {"query": modality.query, "positive": modality.target, "hard_negative": modality.target}
    rules = {"instruction": "one short English sentence: the task instruction for the query side."}
    for field, part in parts.items():
        role = field.replace("_", "-")
        rules[field] = Template(_FIELD_RULE[part]).substitute(role=role, language=language)
    return rules


def build_request(planned: PlannedSample, n_images: int) -> Request:
    """The request for `planned`; `n_images` must match the images the modality needs (see `image_roles`)."""
    modality = Modality(planned.modality)
    roles = image_roles(modality)
    if n_images != len(roles):
        raise ValueError(f"sample {planned.id}: modality {modality} needs {len(roles)} image(s) "
                         f"({', '.join(roles)}), found {n_images}")
    return _request(Task(planned.task), modality, planned.language)


@cache
def _request(task: Task, modality: Modality, language: str) -> Request:
    """The request depends on (task, modality, language) only, a few thousand combinations at most: built
    once each rather than per sample."""
    planned = PlannedSample("", task, modality, language)
    rules = field_rules(planned)
    roles = image_roles(modality)
    prompt = Template(template("synthesize")).substitute(
        task=str(task),
        task_guidance=template(f"task_{task}"),
        modality=str(modality),
        query_content=_CONTENT[modality.query],
        target_content=_CONTENT[modality.target],
        image_list="\n".join(f"- Image {i}: {_IMAGE_ROLE[role]}" for i, role in enumerate(roles, start=1)),
        language_name=language_name(language),
        language_code=language,
        field_rules="\n".join(f"- {field}: {rule}" for field, rule in rules.items()),
    )
    return Request(system=template("system"), prompt=prompt, image_roles=roles,
                   schema=response_schema(planned))


def response_schema(planned: PlannedSample) -> dict[str, Any]:
    """The strict JSON schema of the answer (structured-output compatible: every property required, no
    extra properties, no length bounds); field descriptions carry this sample's per-field rules.

    Built once per (task, modality, language) and shared: do not modify the returned dict."""
    return _schema(Task(planned.task), Modality(planned.modality), planned.language)


@cache
def _schema(task: Task, modality: Modality, language: str) -> dict[str, Any]:
    rules = field_rules(PlannedSample("", task, modality, language))
    sides = _object({field: {"type": "string", "description": rules[field]} for field in SIDE_FIELDS})
    scores = {name: {"type": "integer", "enum": [1, 2, 3, 4, 5]} for name in SCORE_FIELDS}
    return _object({
        "interpretation": _object({name: {"type": "string"} for name in INTERPRETATION_FIELDS}),
        "draft": sides,
        "evaluation": _object({**scores, "comments": {"type": "string"}}),
        "improvements": {"type": "string"},
        "revised": sides,
    })


def json_instruction(schema: dict[str, Any]) -> str:
    """The plain-text stand-in for `response_format`, appended to the prompt for servers without it."""
    return Template(template("json_instruction")).substitute(
        schema=json.dumps(schema, indent=2, ensure_ascii=False))


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}
