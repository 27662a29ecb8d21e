"""Your own pairs or triplets as published rows: a query, a positive and optional negatives, each a text, an
image path or both, written in the published format the converter reads (`mme5.data.convert --format pairs`).

Columns (renamed with `--map NAME=COLUMN`): `query`, `query_image`, `positive`, `positive_image`, and
optionally `negatives` / `negative_images` (lists, or JSON / Python list strings in CSV cells), `query_video`,
`positive_video` and `negative_videos` (a folder of a video's frames each, read in the reference's natural
order; a side holds an image or a video),
`query_instruction` and `positive_instruction` (per row, else the `--query-instruction` /
`--positive-instruction` defaults) and `language` (per row, else `--language`). Each side is rendered by the
published rule (`mme5.published.render`), so a model trained on them sees the format the released models see.
Any other column is refused (a misspelt `negative_image` would otherwise leave every sample without its
negatives), unless the converter is told to ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mme5 import published

FIELDS = ("query", "query_image", "query_video", "positive", "positive_image", "positive_video", "negatives",
          "negative_images", "negative_videos", "query_instruction", "positive_instruction", "language")

# The published row's field made from each pair field (PairFormat.row).
PUBLISHED_FIELDS = {"qry": "query", "qry_image_path": "query_image", "pos_text": "positive",
                    "pos_image_path": "positive_image", "neg_text": "negatives",
                    "neg_image_path": "negative_images", "qry_video_path": "query_video",
                    "pos_video_path": "positive_video", "neg_video_path": "negative_videos"}


@dataclass(frozen=True)
class PairFormat:
    """Which column holds each field, and the default instructions (a `mme5.data.layouts.RowLayout`)."""

    columns: Mapping[str, str] = field(default_factory=dict)  # field → column (default: the field's name)
    query_instruction: str = ""
    positive_instruction: str = ""
    name: ClassVar[str] = "pairs"
    task: ClassVar[None] = None  # from --task or the source name
    source: ClassVar[None] = None  # from --source or each file's folder
    ignored_columns: ClassVar[tuple[str, ...]] = ()
    refuses_unread: ClassVar[bool] = True  # every column is the user's own: an unread one is a mistake

    @classmethod
    def parse(cls, mappings: Sequence[str], query_instruction: str = "", positive_instruction: str = ""
              ) -> PairFormat:
        """From `NAME=COLUMN` strings (the command line's --map)."""
        columns = {}
        for mapping in mappings:
            name, sep, column = mapping.partition("=")
            if not sep or name not in FIELDS or not column:
                raise ValueError(f"--map {mapping!r}: expected NAME=COLUMN, NAME one of {', '.join(FIELDS)}")
            columns[name] = column
        return cls(columns, query_instruction, positive_instruction)

    def description(self) -> dict[str, Any]:
        """What a manifest records of the format."""
        return {"pairs": dict(self.columns), "query_instruction": self.query_instruction,
                "positive_instruction": self.positive_instruction}

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def known_columns(self) -> list[str]:
        """The columns this format reads: each field's (mapped) column."""
        return [self.column(name) for name in FIELDS]

    def alternatives(self, side: str) -> tuple[str, ...]:
        """The columns of which a row needs one for a side ("query" or "positive"): its text, image, video."""
        return tuple(self.column(f"{side}{suffix}") for suffix in ("", "_image", "_video"))

    def missing(self, names: Collection[str]) -> list[str]:
        """The query's and the positive's column where `names` hold none of its text, image or video."""
        return [self.column(side) for side in ("query", "positive")
                if not any(column in names for column in self.alternatives(side))]

    def row(self, row: Mapping[str, Any], parse_list: Callable[..., list[Any]]) -> dict[str, Any]:
        """The published row (qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path, and
        qry_/pos_/neg_video_path) of a pair row; `parse_list(value, column, images=False)` reads a list cell
        (the converter's: it names bad ones). An image is a path, or the value of a `datasets` image column;
        a video the path of its frames folder."""
        def get(name: str) -> Any:
            value = row.get(self.column(name))
            return None if value == "" else value

        query_instruction = get("query_instruction") or self.query_instruction
        positive_instruction = get("positive_instruction") or self.positive_instruction
        negatives = parse_list(get("negatives"), self.column("negatives"))
        negative_images = parse_list(get("negative_images"), self.column("negative_images"), images=True)
        negative_videos = parse_list(get("negative_videos"), self.column("negative_videos"))
        count = max(len(negatives), len(negative_images), len(negative_videos))
        negatives = negatives or [""] * count  # visual negatives: the converter gives them a text
        negative_images, negative_videos = negative_images or [""] * count, negative_videos or [""] * count
        return {
            "qry": self._render(query_instruction, get("query"), get("query_image") or get("query_video")),
            "qry_image_path": get("query_image") or "",
            "qry_video_path": get("query_video") or "",
            "pos_text": self._render(positive_instruction, get("positive"),
                                     get("positive_image") or get("positive_video")),
            "pos_image_path": get("positive_image") or "",
            "pos_video_path": get("positive_video") or "",
            "neg_text": [self._render(positive_instruction, text, image or video) if text else ""
                         for text, image, video in zip(negatives, negative_images, negative_videos,
                                                       strict=False)],
            "neg_image_path": negative_images,
            "neg_video_path": negative_videos,
            "language": get("language"),
        }

    def user_field(self, published_field: str) -> str:
        """The column behind a published row's field (`neg_text[1]` → `negatives[1]`, mapped): what a
        message about a bad pair row names."""
        name, bracket, index = published_field.partition("[")
        pair_field = PUBLISHED_FIELDS.get(name)
        return self.column(pair_field) + bracket + index if pair_field else published_field

    @staticmethod
    def _render(instruction: str, text: Any, image: Any) -> Any:
        if text is not None and not isinstance(text, str):
            return text  # the converter names the field and its type
        if not text and not image:
            return ""
        return published.render(instruction, text, has_image=bool(image))
