"""The one sample schema used everywhere: training shards, synthesis output and converters.

A sample is a query side, a positive side and 0..k hard-negative sides. A side is an instruction plus
optional text plus an optional image or video (not both); a side converted from the published data also
keeps its published string verbatim (`prompt`), which is what the model is fed (see `mme5.published`).
Images and video frames travel as the encoded bytes they were given (JPEG, PNG, ...); an image is decoded
when a batch is collated, a video's frames by the adapter, which decodes only the `num_frames` it keeps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from PIL import Image

from mme5 import published
from mme5.images import format_suffix, load


class SchemaError(ValueError):
    """A record does not follow the sample schema; the message names the field."""


class Task(StrEnum):
    CLASSIFICATION = "classification"
    VQA = "vqa"
    RETRIEVAL = "retrieval"
    GROUNDING = "grounding"


class Modality(StrEnum):
    """Query→target modality combination, spelled as in mmE5-synthetic's `modality` field; V is a video.

    The video ones are those of VLM2Vec-V2's video training sets (`src/data/dataset/llavahound_dataset_*.py`):
    caption retrieval V2T (the video with "Describe ..." → its caption), question answering VT2T, video
    retrieval T2V (a caption → the video under "Understand the content of the provided video:"), and T2VT
    for pairs whose video side also has a text."""

    I2T = "I2T"
    IT2T = "IT2T"
    T2I = "T2I"
    T2IT = "T2IT"
    I2I = "I2I"
    IT2I = "IT2I"
    IT2IT = "IT2IT"
    V2T = "V2T"
    VT2T = "VT2T"
    T2V = "T2V"
    T2VT = "T2VT"

    @property
    def query(self) -> str:
        """The query's part: "I", "V", "T", "IT" or "VT"."""
        return self.value.split("2")[0]

    @property
    def target(self) -> str:
        """The target's part: "I", "V", "T", "IT" or "VT"."""
        return self.value.split("2")[1]

    @classmethod
    def of(cls, query: Side, target: Side) -> Modality:
        """The combination two sides actually have (text-and-image counts as IT, text-and-video as VT)."""
        return cls(f"{query.kind}2{target.kind}")


@dataclass
class Side:
    """One side of a sample: what the encoder embeds as one item."""

    instruction: str = ""
    text: str | None = None
    image: bytes | None = None  # encoded image file bytes, never a decoded array
    video: list[bytes] | None = None
    """Every frame of a video, in order, each as its encoded file bytes (a side holds an image or a video)."""
    prompt: str | None = None
    """The published string verbatim (placeholder and trailing newline kept); None: written from
    instruction and text by the published rule (`mme5.published.render`)."""
    _decoded: Image.Image | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.text == "":
            self.text = None
        if self.video is not None:
            self._check_video()
        if not self.text and self.image is None and self.video is None:
            raise SchemaError("a side needs text, an image or a video, or text and one of them")

    def _check_video(self) -> None:
        if self.image is not None:
            raise SchemaError("a side holds an image or a video, not both (found an image and a video)")
        if not isinstance(self.video, list) or not self.video:
            raise SchemaError(f"a video is a non-empty list of frames, found {_describe(self.video)}")
        for index, frame in enumerate(self.video):
            if not isinstance(frame, bytes) or not frame:
                raise SchemaError(f"video frame {index} must be its encoded file bytes, found "
                                  f"{_describe(frame)}")

    @property
    def visual(self) -> bool:
        """Whether the side has an image or a video (what the published placeholder stands for)."""
        return self.image is not None or self.video is not None

    @property
    def kind(self) -> str:
        """ "I", "V", "T", "IT" or "VT": which content the side holds."""
        medium = "I" if self.image is not None else "V" if self.video is not None else ""
        return medium + ("T" if self.text else "")

    def content_key(self) -> int:
        """A 63-bit hash of what the model is fed for this side (its published string and image bytes or
        video frames): equal keys, equal inputs (e.g. the label text "dog" of many classification samples)."""
        prompt = self.prompt if self.prompt is not None else published.render(self.instruction, self.text,
                                                                              self.visual)
        digest = hashlib.blake2b(published.normalize(prompt, self.visual).encode("utf-8"), digest_size=8)
        digest.update(b"\0" + (self.image or b""))
        for frame in self.video or ():  # tagged and length-prefixed: frame boundaries and order count
            digest.update(b"\1" + len(frame).to_bytes(8, "big") + frame)
        return int.from_bytes(digest.digest(), "big") >> 1

    def pil(self) -> Image.Image | None:
        """The image decoded in its own mode (`mme5.images.load`; decoded once, then cached); None for a
        video side, whose frames the adapter decodes."""
        if self.image is None:
            return None
        if self._decoded is None:
            self._decoded = load(self.image)
        return self._decoded


@dataclass
class Sample:
    """A training sample: query, positive and hard negatives, with metadata for mixing and reporting."""

    id: str
    task: Task
    modality: Modality
    language: str
    source: str
    query: Side
    positive: Side
    negatives: list[Side] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.task = Task(self.task)
        self.modality = Modality(self.modality)
        if not self.id or "." in self.id or "/" in self.id:
            raise SchemaError(f"id {self.id!r} must be non-empty and contain no '.' or '/' (shard keys)")
        if not self.language:
            raise SchemaError(f"sample {self.id}: language is empty")
        if self.query.kind != self.modality.query:
            raise SchemaError(
                f"sample {self.id}: modality {self.modality} expects a {self.modality.query} query, "
                f"found {self.query.kind}"
            )
        for name, side in [("positive", self.positive)] + [(f"negative {i}", n) for i, n in
                                                            enumerate(self.negatives)]:
            if side.kind != self.modality.target:
                raise SchemaError(
                    f"sample {self.id}: modality {self.modality} expects a {self.modality.target} "
                    f"{name}, found {side.kind}"
                )

    @property
    def sides(self) -> list[tuple[str, Side]]:
        """(role, side) pairs in a fixed order: query, positive, negative 0, 1, ..."""
        return [("qry", self.query), ("pos", self.positive)] + [
            (f"neg{i}", side) for i, side in enumerate(self.negatives)
        ]

    def metadata(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": str(self.task),
            "modality": str(self.modality),
            "language": self.language,
            "source": self.source,
        }


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.40}"


def image_extension(data: bytes) -> str:
    """The file extension that matches encoded image bytes: from their magic number for the common formats,
    else from the format PIL identifies (TIFF, ICO, ...)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    suffix = format_suffix(data)
    if suffix is None:
        raise SchemaError("image bytes are in no format PIL reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)")
    return suffix[1:]


IMAGE_EXTENSIONS = ("jpg", "png", "webp", "gif", "bmp")
