"""Input-format presets: how the released embedders of a family write one item, token for token.

An embedder only works when fed what it was trained on. A preset names one such format: which families it
applies to, how an item (instruction, text, image) becomes the prompt, the image token and the image size
or pixel bounds. `mme5` (the default) is the published mmE5/MMEB string with the family's image token; the
others follow the reference code of a released embedder, cited line by line in each template's docstring.

A template writes a prompt as `Parts(head, body, tail)`: truncation to `InputFormat.max_length` cuts the body
only, so the chat frame, the image tokens and an appended end token (the pooled position) always survive.
The head ends, and the tail starts, at a special token, so the three parts tokenize independently.
How a long item is cut (`TRUNCATIONS`) is the preset's too, per family: what its reference code does.

`detect` reads which preset a model folder was trained with from its files (`mme5_embedding.json` of an
export first, then the files that mark a released embedder, see `Preset.evidence`).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mme5 import published

if TYPE_CHECKING:
    from mme5.backbones.base import Item

DEFAULT = "mme5"
EXPORT_CONFIG = "mme5_embedding.json"  # an export's settings (mme5.checkpoint.EXPORT_CONFIG)


class Parts(NamedTuple):
    """A prompt in three parts: `head` and `tail` are kept whole, `body` may be cut."""

    head: str
    body: str
    tail: str


# (item, the token of its image or video) -> parts; None: the published rule
Template = Callable[["Item", str], Parts | None]

# How an item longer than `InputFormat.max_length` is cut (`InputFormat.truncation`). "sequence": the whole
# token sequence (bos and image tokens counted) is cut at max_length, as a tokenizer's truncation=True cuts it
# (for a family whose processor keeps an image one token). "text": only the body's text tokens are counted
# and cut, never the head, the tail or image tokens. "none": never cut.
TRUNCATIONS = ("sequence", "text", "none")
# Where a preset's reference is unknown, or cuts its chat frame too (not reproduced):
KEPT_TRUNCATION = "text"


def check_truncation(rule: str) -> None:
    if rule not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {rule!r}; known: {', '.join(TRUNCATIONS)} (None: the preset's "
                         "reference rule for the family)")


@dataclass(frozen=True)
class Evidence:
    """A file of a model folder that marks a released embedder: present (`contains` None) or holding the
    text `contains`."""

    file: str
    contains: str | None = None

    def found_in(self, folder: Path) -> bool:
        path = folder / self.file
        if not path.is_file():
            return False
        return self.contains is None or self.contains in path.read_text(encoding="utf-8", errors="replace")

    def __str__(self) -> str:
        return self.file if self.contains is None else f"{self.file} mentioning {self.contains!r}"


@dataclass(frozen=True)
class Preset:
    """One released embedder's input format.

    families: the `--family` values it applies to (None: all).
    template: how an item becomes the prompt; None: the published string with the family's image token.
    image_token, min_pixels, max_pixels, image_size, max_grid_side: defaults of the `InputFormat` fields of
        the same names.
    evidence: files that mark a model folder as trained with this format (in order; the first found wins).
    keeps_small_images: the embedder's reference leaves small images to the processor, which keeps their
        aspect ratio (no family rule such as Qwen2-VL's 56x56 enlargement, `Qwen2VLAdapter.target_size`).
    truncation: family -> the `TRUNCATIONS` rule its reference code applies; a family not listed keeps
        `KEPT_TRUNCATION`.
    """

    name: str
    source: str
    families: tuple[str, ...] | None = None
    template: Template | None = None
    image_token: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    image_size: tuple[int, int] | None = None
    max_grid_side: int | None = None
    evidence: tuple[Evidence, ...] = ()
    keeps_small_images: bool = False
    truncation: Mapping[str, str] = field(default_factory=dict, hash=False)

    def truncation_for(self, family: str) -> str:
        return self.truncation.get(family, KEPT_TRUNCATION)

    def applies_to(self, family: str) -> bool:
        return self.families is None or family in self.families

    def check_family(self, family: str) -> None:
        if not self.applies_to(family):
            raise ValueError(f"input format preset {self.name!r} ({self.source}) applies to the families "
                             f"{', '.join(self.families)}, not to {family!r}; choose another preset "
                             f"(presets for {family}: {', '.join(presets_for(family))})")


def _content(part: str | None) -> str:
    """A part of an item without image placeholders or surrounding whitespace (as `published.render`)."""
    return published.strip_placeholders(part or "")


def _instruction_and_text(item: Item) -> tuple[str, str]:
    """Instruction and text of an item; a published row's string is split back into them."""
    if item.prompt is not None:
        instruction, text, _ = published.split(item.prompt)
        return instruction, text or ""
    return _content(item.instruction), _content(item.text)


# ----------------------------------------------------------------------------- VLM2Vec


def vlm2vec_v2(item: Item, image_token: str) -> Parts | None:
    """VLM2Vec-V2 (TIGER-AI-Lab/VLM2Vec, src/model/processor.py `process_input_text`, l. 650-676): the
    instruction, a space and the text when there is one; the image token and a space in front of an image
    side, the video token (`<|video_pad|>`, l. 666-668) and a space in front of a video side (its video
    sets write every video item so, e.g. src/data/eval_dataset/msrvtt_dataset.py l. 32). No trailing
    newline, no end token: the pooled token is the last one of the text
    (src/model/model.py `_pooling`, l. 105-117, `--pooling eos` = the last position).

    A published MMEB image row keeps its V1 string (src/data/eval_dataset/image_cls_dataset.py l. 17-20 and
    src/data/dataset/mmeb_dataset.py l. 70: `<|image_1|>` replaced, trailing newline kept): None, the
    published rule.
    """
    if item.prompt is not None:
        return None
    instruction, text = _content(item.instruction), _content(item.text)
    body = instruction + (" " + text if text else "")
    if item.medium is None:
        return Parts("", body, "")
    return Parts(image_token, " " + body, "")


# ----------------------------------------------------------------------------- chat-template embedders


def _chat(system: str, image: str, body: str, end: str) -> Parts:
    """A Qwen chat-template prompt: the system turn, the user turn (image first, then text), the
    assistant's opening and `end`."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{image}"
    return Parts(head, body, "<|im_end|>\n<|im_start|>assistant\n" + end)


GME_INSTRUCTION = "You are a helpful assistant."


def gme(item: Item, image_token: str) -> Parts:
    """GME (Alibaba-NLP/gme-Qwen2-VL-*-Instruct, `gme_inference.py`, read in its copy in TIGER-AI-Lab/VLM2Vec
    src/model/baseline_backbone/gme/gme_inference.py l. 115-131): the instruction is the system turn ("You
    are a helpful assistant." by default, l. 54, and always for documents: `is_query=False`); the user turn
    is `<|vision_start|><|image_pad|><|vision_end|>` then the text; `<|endoftext|>` is appended after the
    assistant's opening and is the pooled token (last position, l. 101-110)."""
    instruction, text = _instruction_and_text(item)
    return _chat(instruction or GME_INSTRUCTION, image_token if item.medium is not None else "", text,
                 "<|endoftext|>")


QWEN3_VL_EMBEDDING_INSTRUCTION = "Represent the user's input."


def _sentence(instruction: str) -> str:
    """Qwen3-VL-Embedding ends an instruction with a full stop unless it ends in punctuation."""
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


def qwen3_vl_embedding(item: Item, image_token: str) -> Parts:
    """Qwen3-VL-Embedding (QwenLM/Qwen3-VL-Embedding, src/models/qwen3_vl_embedding.py): the instruction,
    ended with a full stop if it has no punctuation (l. 230-234), is the system turn ("Represent the user's
    input." by default, l. 170, 239); the user turn holds the image, then the text (l. 302-324), or "NULL"
    when there is neither (l. 269-271); the chat template with `add_generation_prompt=True` (l. 330-331)
    closes with `<|im_start|>assistant\\n`, and the last position is pooled (l. 365-370, 387). No end token
    is appended in that code (its README says the "[EOS]" token is pooled; `PAD_TOKEN` l. 33 is unused)."""
    instruction, text = _instruction_and_text(item)
    if not text and item.medium is None:
        text = "NULL"
    image = image_token if item.medium is not None else ""
    return _chat(_sentence(instruction) or QWEN3_VL_EMBEDDING_INSTRUCTION, image, text, "")


LLAVE_SYSTEM = "You are a helpful assistant."


def llave(item: Item, image_token: str) -> Parts:
    """LLaVE (DeepLearnXMU/LLaVE on LLaVA-OneVision): the published string (`<|image_1|>` replaced by
    `<image>`, llava/train/train.py l. 1075-1081) is the user turn of the `qwen_1_5` conversation, system
    "You are a helpful assistant." (preprocess_qwen l. 567, 604); the assistant turn is "\\n" (README Quick
    Start; train.py l. 1075), closed by `<|im_end|>\\n`, whose newline is the pooled last position
    (llava/model/language_model/llava_qwen.py l. 118)."""
    text = item.published()
    image = ""
    if item.medium is not None:  # a video as an image: its token first (LLaVA-OneVision's `<video>`)
        placeholder = published.PLACEHOLDER if item.image is not None else published.VIDEO_PLACEHOLDER
        image, text = image_token, text.replace(placeholder, "", 1)
    return _chat(LLAVE_SYSTEM, image, text, "\n<|im_end|>\n")


# ----------------------------------------------------------------------------- the registry

VLM2VEC_MIN_PIXELS = 28 * 28 * 4  # VLM2Vec src/arguments.py l. 45 (`resize_min_pixels`)
VLM2VEC_MAX_PIXELS = 28 * 28 * 1280  # l. 46 (`resize_max_pixels`), passed to the processor in any case
QWEN3_VL_EMBEDDING_FACTOR = 32  # src/models/qwen3_vl_embedding.py l. 25-26: 16 px patches, 2x2 merged

# Truncation in the references. mmE5 (haon-chen/mmE5 @ 4818cdf, src/collator.py): Mllama items go through
# the processor whole with `max_length=max_len, truncation=True` (`LlamaCollator` l. 218, 232;
# `LlamaEvalCollator` l. 317, 322; --max_len 256 in scripts/), `<|image|>` one token the processor does not
# expand; its LLaVA-NeXT branches pass no max_length (`TrainCollator` l. 33-34, 42-43; `EvalCollator`
# l. 120-121, 128-129). VLM2Vec: `--max_len` defaults to None (v1.0 and V2 src/arguments.py), which leaves
# image items whole (V2 src/model/processor.py `Qwen2_VL_process_fn` l. 333: `truncation=(max_length is not
# None)`) and cuts text items at the tokenizer's model_max_length only (32768 for Qwen2-VL); its MMEB eval
# scripts set none. That is the reference of the Qwen2-VL family's published format too.
NEVER_CUT_BY_VLM2VEC = {"qwen2_vl": "none", "qwen2_5_vl": "none"}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("mme5", "the published mmE5/MMEB string, the family's image token (mme5.published)",
           truncation={"mllama": "sequence", "llava": "none", **NEVER_CUT_BY_VLM2VEC}),
    Preset("vlm2vec_v2", "VLM2Vec-V2, TIGER-AI-Lab/VLM2Vec", ("qwen2_vl", "qwen2_5_vl"), vlm2vec_v2,
           "<|image_pad|>", VLM2VEC_MIN_PIXELS, VLM2VEC_MAX_PIXELS,
           evidence=(Evidence("README.md", "VLM2Vec-V2"),), truncation=NEVER_CUT_BY_VLM2VEC),
    # V1: the published strings, every image first resized to 1344x1344 (`--image_resolution high`,
    # experiments/public/eval/eval_vlm2vecv1_8gpu.sh l. 58; src/data/dataset/mmeb_dataset.py l. 17-18).
    Preset("vlm2vec_v1", "VLM2Vec (V1) on Qwen2-VL and LLaVA-NeXT, TIGER-AI-Lab/VLM2Vec",
           ("qwen2_vl", "llava"), None, None, VLM2VEC_MIN_PIXELS, VLM2VEC_MAX_PIXELS, (1344, 1344),
           evidence=(Evidence("README.md", "VLM2Vec"),), truncation={"qwen2_vl": "none", "llava": "none"}),
    # GME, Qwen3-VL-Embedding and LLaVE keep the text rule: GME's processor call (gme_inference.py l. 134-141,
    # max_length=1800) and Qwen3-VL-Embedding's (src/models/qwen3_vl_embedding.py l. 356-358, 8192) cut the
    # whole expanded sequence, chat frame and pooled end token included; LLaVE's evaluation cut is unknown.
    Preset("gme", "GME, Alibaba-NLP/gme-Qwen2-VL-*-Instruct", ("qwen2_vl",), gme,
           "<|vision_start|><|image_pad|><|vision_end|>", 256 * 28 * 28, 1280 * 28 * 28,  # l. 23-24, 49-50
           # gme_inference.py l. 127: `fetch_image`, qwen_vl_utils' smart_resize (aspect ratio kept)
           evidence=(Evidence("gme_inference.py"),), keeps_small_images=True),
    Preset("qwen3_vl_embedding", "Qwen3-VL-Embedding, QwenLM/Qwen3-VL-Embedding", ("qwen3_vl",),
           qwen3_vl_embedding, "<|vision_start|><|image_pad|><|vision_end|>",
           4 * QWEN3_VL_EMBEDDING_FACTOR**2, 1800 * QWEN3_VL_EMBEDDING_FACTOR**2,  # l. 27-28
           evidence=(Evidence("README.md", "Qwen3-VL-Embedding"),)),
    # LLaVE's anyres grid: (1x1)..(2x2) tiles (its training command's `image_grid_pinpoints`).
    Preset("llave", "LLaVE, DeepLearnXMU/LLaVE", ("llava_onevision",), llave, "<image>", max_grid_side=2,
           evidence=(Evidence("README.md", "LLaVE"),)),
)}


def preset(name: str | None) -> Preset:
    """The preset called `name` (None: the default)."""
    try:
        return PRESETS[name or DEFAULT]
    except KeyError:
        raise ValueError(f"unknown input format preset {name!r}; known: {', '.join(PRESETS)}") from None


def presets_for(family: str) -> list[str]:
    return [name for name, p in PRESETS.items() if p.applies_to(family)]


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detected:
    name: str
    reason: str  # which file says so


def detect(folder: str | Path, family: str | None = None) -> Detected | None:
    """The preset a model folder was trained with, from its files; None when they do not say.

    An mme5 export's `mme5_embedding.json` is authoritative (its recorded preset; `mme5` for exports written
    before presets). Otherwise the first preset applying to `family` (None: any) whose evidence is found, in
    registry order (`vlm2vec_v2` before `vlm2vec_v1`, whose mark is a prefix of it): a card that names an
    embedder of another family (a comparison, a teacher) says nothing of this model's format. The hub id
    is never guessed from.
    """
    folder = Path(folder)
    config = folder / EXPORT_CONFIG
    if config.is_file():
        recorded = (json.loads(config.read_text(encoding="utf-8")).get("input_format") or {}).get("preset")
        return Detected(recorded or DEFAULT, f"{config} records it")
    if not folder.is_dir():
        return None
    for candidate in PRESETS.values():
        if family is not None and not candidate.applies_to(family):
            continue
        for evidence in candidate.evidence:
            if evidence.found_in(folder):
                return Detected(candidate.name, f"{folder} holds {evidence}")
    return None
