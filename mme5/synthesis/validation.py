"""Checks one MLLM answer and turns its revised data into a Sample, or says why it cannot.

Every rejection is an `InvalidAnswer` with a short machine-readable `reason` (counted by the pipeline to
see what goes wrong at scale) and a human-readable `detail`. The checks are the ones a bad synthesis run
actually needs: the answer is JSON, follows the schema, has the texts its modality requires, is written in
the planned language's script, and has a hard negative that is not the positive.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mme5.backbones.base import IMAGE_INSTRUCTION
from mme5.data.schema import Modality, Sample, SchemaError, Side
from mme5.synthesis.plan import PlannedSample
from mme5.synthesis.prompting import response_schema

SOURCE = "synthetic"
"""Targets holding an image get mmE5's fixed target instruction; text-only targets get none."""

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)

# Letters count towards a script by the first word of their Unicode name ("CYRILLIC SMALL LETTER A").
_HAN = frozenset({"CJK"})
_CYRILLIC = frozenset({"CYRILLIC"})
_ARABIC = frozenset({"ARABIC"})
_DEVANAGARI = frozenset({"DEVANAGARI"})
_LATIN = frozenset({"LATIN"})
SCRIPTS: dict[str, frozenset[str]] = {
    "zh": _HAN, "ja": _HAN | {"HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"}, "ko": frozenset({"HANGUL"}),
    **dict.fromkeys(["ru", "uk", "bg", "be", "mk", "mn", "kk", "ky", "tg"], _CYRILLIC),
    **dict.fromkeys(["ar", "fa", "ur", "ps", "sd"], _ARABIC),
    **dict.fromkeys(["hi", "mr", "ne"], _DEVANAGARI),
    "he": frozenset({"HEBREW"}), "el": frozenset({"GREEK"}), "th": frozenset({"THAI"}),
    "bn": frozenset({"BENGALI"}), "as": frozenset({"BENGALI"}), "ta": frozenset({"TAMIL"}),
    "te": frozenset({"TELUGU"}), "gu": frozenset({"GUJARATI"}), "kn": frozenset({"KANNADA"}),
    "ml": frozenset({"MALAYALAM"}), "pa": frozenset({"GURMUKHI"}), "si": frozenset({"SINHALA"}),
    "my": frozenset({"MYANMAR"}), "km": frozenset({"KHMER"}), "lo": frozenset({"LAO"}),
    "ka": frozenset({"GEORGIAN"}), "hy": frozenset({"ARMENIAN"}), "am": frozenset({"ETHIOPIC"}),
    "or": frozenset({"ORIYA"}),
    # Written in two scripts in everyday use: either is accepted.
    "sr": _LATIN | _CYRILLIC, "uz": _LATIN | _CYRILLIC, "ku": _LATIN | _ARABIC,
}
"""Accepted scripts per language; a language not listed is written in Latin script."""


class InvalidAnswer(ValueError):
    """The answer cannot become a sample; `reason` is a short stable key, `detail` says what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class ParsedAnswer:
    """The sample built from the revised data, and what led to it (kept for filtering and analysis)."""

    sample: Sample
    metadata: dict[str, Any]


def parse_answer(planned: PlannedSample, content: str, images: Mapping[str, bytes | None]) -> ParsedAnswer:
    """Validate the MLLM's answer for `planned` and build the sample from its `revised` data.

    `images` maps "query", "positive" and "negative" to the encoded images attached to the call (None or
    absent where the modality has none). A text field of an image-only side is ignored: the planned
    modality decides what each side holds.
    """
    answer = _load_json(content)
    _check(answer, response_schema(planned), "$")
    modality = Modality(planned.modality)
    revised = {name: value.strip() for name, value in answer["revised"].items()}
    if not revised["instruction"]:
        raise InvalidAnswer("empty_field", "revised.instruction is empty")
    parts = {"query": modality.query, "positive": modality.target, "hard_negative": modality.target}
    image_keys = {"query": "query", "positive": "positive", "hard_negative": "negative"}
    for field, part in parts.items():
        if "T" in part and not revised[field]:
            raise InvalidAnswer("empty_field", f"revised.{field} is empty, but the {field} side of "
                                               f"{modality} needs text")
        if "I" in part and images.get(image_keys[field]) is None:
            raise InvalidAnswer("missing_image", f"the {field} side of {modality} needs the "
                                                 f"{image_keys[field]} image, none was given")
    if "T" in modality.target and _normalised(revised["positive"]) == _normalised(revised["hard_negative"]):
        raise InvalidAnswer("identical_positive_negative", f"both are {revised['positive'][:80]!r}")
    texts = [revised[field] for field in ("query", "positive") if "T" in parts[field]]
    _check_script(planned.language, " ".join(texts))

    def side(field: str, instruction: str) -> Side:
        part = parts[field]
        return Side(instruction=instruction, text=revised[field] if "T" in part else None,
                    image=images.get(image_keys[field]) if "I" in part else None)

    target_instruction = IMAGE_INSTRUCTION if "I" in modality.target else ""
    try:
        sample = Sample(id=planned.id, task=planned.task, modality=modality, language=planned.language,
                        source=SOURCE, query=side("query", revised["instruction"]),
                        positive=side("positive", target_instruction),
                        negatives=[side("hard_negative", target_instruction)])
    except SchemaError as e:
        raise InvalidAnswer("sample", str(e)) from None
    metadata = {name: answer[name] for name in ("interpretation", "draft", "evaluation", "improvements")}
    return ParsedAnswer(sample, metadata)


def script_share(text: str, scripts: frozenset[str]) -> float | None:
    """The share of letters in `text` written in one of `scripts`; None when it has no letters."""
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    if not letters:
        return None
    inside = sum(unicodedata.name(ch, "").split(" ")[0] in scripts for ch in letters)
    return inside / len(letters)


def _check_script(language: str, text: str) -> None:
    """Most letters of the query and positive texts must be in the language's script (numbers-only or
    image-only content has nothing to check)."""
    scripts = SCRIPTS.get(language, _LATIN)
    share = script_share(text, scripts)
    if share is not None and share <= 0.5:
        raise InvalidAnswer("wrong_script", f"{language}: only {share:.0%} of the letters are "
                                            f"{'/'.join(sorted(scripts))}: {text[:80]!r}")


def _load_json(content: str) -> Any:
    """The JSON object in `content`, which may sit in a ```json fenced block."""
    fenced = _FENCE.search(content)
    text = fenced.group(1) if fenced else content
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidAnswer("not_json", f"{e.msg} at {e.pos}: {text[:80]!r}") from None


def _check(value: Any, schema: Mapping[str, Any], path: str) -> None:
    """Validate `value` against the subset of JSON schema that `response_schema` uses."""
    kind = schema["type"]
    if kind == "object":
        if not isinstance(value, dict):
            raise InvalidAnswer("schema", f"{path} is not an object")
        properties = schema["properties"]
        missing = [name for name in schema["required"] if name not in value]
        extra = [name for name in value if name not in properties]
        if missing:
            raise InvalidAnswer("schema", f"{path} lacks {missing}")
        if extra:
            raise InvalidAnswer("schema", f"{path} has unexpected {extra}")
        for name, sub in properties.items():
            _check(value[name], sub, f"{path}.{name}")
    elif kind == "string":
        if not isinstance(value, str):
            raise InvalidAnswer("schema", f"{path} is not a string")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidAnswer("schema", f"{path} is not an integer")
    else:
        raise ValueError(f"unsupported schema type {kind!r} at {path}")
    if "enum" in schema and value not in schema["enum"]:
        raise InvalidAnswer("schema", f"{path} is {value!r}, expected one of {schema['enum']}")


def _normalised(text: str) -> str:
    return " ".join(text.casefold().split())
