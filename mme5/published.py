"""The published data's prompt format: how MMEB and mmE5 rows write one side (instruction, text, image) as
one string, which the released models were trained and evaluated on.

    "<|image_1|>\\nRepresent the given image for classification\\n"       image, instruction only
    "<|image_1|>\\nRepresent the given image with the following question: Why?\\n"   image + instruction: text
    "Find me an everyday image that matches the given caption: A dog.\\n"    text, instruction: text
    "<|image_1|>\\nRepresent the given image.\\n"                            image target
    "tench"                                                                bare text target

A side with an image starts with the Phi-3-style placeholder and its newline; an instruction-bearing or image
side ends with "\\n" (the token the released models pool); a bare text is written as it is. Rows converted
from the published sets keep their string verbatim (`Item.prompt`, `Side.prompt`); sides made here
(synthesis, the demo world, API calls) are written by `render`, so a model trained here and the released
ones see one format. A family adapter then replaces only the placeholder (`mme5.backbones`).
"""

from __future__ import annotations

import re

PLACEHOLDER = "<|image_1|>"
"""The published rows' image token, replaced by each family's own."""
VIDEO_PLACEHOLDER = "<|video_1|>"
"""A video side's placeholder, written and replaced by the image rule (where the image placeholder goes, with
its newline) by each video-reading family's video token. mme5's own: the published (MMEB V1) rows hold no
video; VLM2Vec-V2 writes its video token where it writes its image token (`presets.vlm2vec_v2`)."""
IMAGE_INSTRUCTION = "Represent the given image."
"""The published instruction of an image side without a task of its own (MMEB image targets, XTD
candidates, synthetic image targets)."""
VIDEO_INSTRUCTION = "Understand the content of the provided video."
"""The instruction of a video side without a task of its own: VLM2Vec-V2's video target prompt
(`VRET_TGT_PROMPT` in `src/data/dataset/llavahound_dataset_caption.py`), ending in a full stop as
`IMAGE_INSTRUCTION` does."""

_ANY_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")
_ANY_MEDIUM = re.compile(r"<\|(?:image|video)_\d+\|>")  # an image or a video placeholder
_PLACEHOLDER_AND_SPACE = re.compile(_ANY_MEDIUM.pattern + r"\s*")


def strip_placeholders(part: str) -> str:
    """A part of a side (instruction or text) without image or video placeholders and surrounding
    whitespace."""
    return _PLACEHOLDER_AND_SPACE.sub("", part).strip()


def render(instruction: str, text: str | None, has_image: bool, has_video: bool = False) -> str:
    """The published string of a side made of its parts (placeholders inside the parts are dropped); a
    video side is written as an image side, with the video placeholder."""
    parts = [strip_placeholders(part) for part in (instruction, text or "")]
    body = " ".join(part for part in parts if part)
    if not parts[0] and not (has_image or has_video):
        return body  # a bare text target
    lead = PLACEHOLDER if has_image else VIDEO_PLACEHOLDER if has_video else None
    return (lead + "\n" if lead else "") + body + "\n"


def normalize(prompt: str, has_image: bool, has_video: bool = False) -> str:
    """`prompt` with its placeholders agreeing with the side: a placeholder is added in front (with its
    newline) when the side has that medium and the string does not say so; removed (with the newline that
    follows it) when the side has not, as the mmE5 collator does by turning `"<|image_1|>\\n"` into nothing
    but the bos token. On a video side without an image, an image placeholder stands for the video and is
    turned into the video placeholder where it is: published rows know only `<|image_1|>`, and the converter
    writes VLM2Vec-V2's video rows so (its video token where the row's `<video>` was)."""
    if has_video and not has_image and VIDEO_PLACEHOLDER not in prompt:
        prompt = prompt.replace(PLACEHOLDER, VIDEO_PLACEHOLDER)
    for placeholder, present in ((PLACEHOLDER, has_image), (VIDEO_PLACEHOLDER, has_video)):
        if not present:
            prompt = prompt.replace(placeholder + "\n", "").replace(placeholder, "")
        elif placeholder not in prompt:
            prompt = placeholder + "\n" + prompt
    return prompt


def has_placeholder(prompt: str) -> bool:
    return bool(_ANY_PLACEHOLDER.search(prompt))


def split(prompt: str) -> tuple[str, str | None, bool]:
    """Split a published string into (instruction, content text, had an image placeholder).

    The inverse of `render` up to whitespace, for the converter's bookkeeping (side kinds, reports); the
    string itself is kept verbatim for the model. Rule: the placeholder is removed; the first line up to
    its first colon is the instruction and the rest the content; a first line without a colon followed by
    more lines is the instruction; a single line without a colon is the instruction when it came with an
    image placeholder, and content otherwise. Video placeholders are removed too (not reported).
    """
    had_placeholder = has_placeholder(prompt)
    stripped = _ANY_MEDIUM.sub("", prompt).strip()
    first, _, rest = stripped.partition("\n")
    head, colon, tail = first.partition(":")
    if colon and head.strip():
        instruction, content = head.strip() + ":", (tail + "\n" + rest).strip()
    elif rest.strip():
        instruction, content = first.strip(), rest.strip()
    elif had_placeholder:
        instruction, content = stripped, ""
    else:
        instruction, content = "", stripped
    return instruction, content or None, had_placeholder
