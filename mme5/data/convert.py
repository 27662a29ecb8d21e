"""Convert the public training rows (MMEB-train, mmE5-MMEB-hardneg, mmE5-synthetic) into shards.

    python -m mme5.data.convert --input DIR_OR_FILES --images IMAGE_ROOT --out SHARD_DIR

Input rows, from parquet, JSONL or CSV files or a Hugging Face `datasets` dataset (a `save_to_disk` folder or
a hub id, see `mme5.data.inputs`), have `qry`, `qry_image_path`, `pos_text`, `pos_image_path` and optionally
`neg_text`, `neg_image_path` (lists, or lists stringified by the reference pipeline) and `modality`
(mmE5-synthetic), with image paths relative to the image root; an image may also be the image value of a
`datasets` image column (its bytes). A side may instead hold a video: `qry_video_path`, `pos_video_path`,
`neg_video_path` name a folder of its frames under the image root (JPEG/PNG files in the reference's
natural order, `mme5.eval.mmeb_v2.frames.frame_order`; every frame is stored). Video files are refused:
no video decoder is installed, so frames must be extracted first. `--format pairs` reads your own pairs
(`mme5.data.pairs`); `--format vlm2vec-video-caption` (`-video-retrieval`, `-video-qa`, `vlm2vec-colpali`,
`vlm2vec-visrag`) reads VLM2Vec-V2's video and visual-document training sets (`mme5.data.layouts`).
Prompts in these rows carry the instruction and the content in one string with a `<|image_1|>` placeholder
(standing for the image or the video): each side keeps that string verbatim (what the model is fed, see
`mme5.published`) and its split into instruction and text.

Split: Hugging Face folders name their files `<split>-00000-of-00001.parquet`; `TIGER-Lab/MMEB-train` subsets
hold `original`, `diverse_instruction` and `train` files, of which the reference trains on `train`. Only the
`--split` (default `train`) of such folders and of `datasets` is read (`--split all`: every one); files
without a split in their name are always read. Order: the rows of all inputs are written in a seeded global
permutation (`--seed`, default 0; `--no-shuffle` keeps file order and streams with constant memory), so that
an ordered file (by class, five captions per image) does not fill batches with near-duplicates through a
training shuffle buffer; permuting loads a file's rows (text and image paths) into memory, while a `datasets`
dataset is read in place.

Columns: a column the format does not read is refused when it is likely a misspelling (`neg_texts`,
`qry_img_path`), since its content would be lost without a word; other extra columns of published files
(the published sets carry some of their own, which the reference ignores too) are left unread and listed
in the manifest and the summary. In `--format pairs` every column is the user's own, so any column the
format does not read is refused, naming the ones it reads; `--ignore-columns` leaves named columns unread.

Known quirks are repaired and counted, bad rows are skipped and named (file, row, field), and everything
is summarised in a conversion report stored in the manifest (with the files read, the split and the
order).

The output folder has one owner (`mme5.files.claim_folder`): its identity is the conversion's options and
its inputs (`conversion_identity`). The same conversion resumes after the last finished shard when
interrupted, and a complete one is left as it is; a folder holding another conversion's shards is refused,
naming what differs, unless `--overwrite`, whose shards are written beside it and swapped in when complete;
a second conversion into a folder being written is refused at once, naming the first.
"""

from __future__ import annotations

import ast
import difflib
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme5 import published
from mme5.data.inputs import DEFAULT_SPLIT, BadRow, Row, Table, encodable, find_tables, printable
from mme5.data.layouts import LAYOUTS, RowLayout
from mme5.data.pairs import PairFormat
from mme5.data.schema import Modality, Sample, SchemaError, Side, Task, image_extension
from mme5.data.shards import MANIFEST, ShardWriter, SkipLog, read_manifest
from mme5.eval.mmeb_v2.frames import FRAME_EXTENSIONS, frame_order
from mme5.files import OutputFolderError, claim_folder
from mme5.images import ImageDecodeError, check_image
from mme5.settings import command_parser, number_at_least

COMMAND = "mme5.data.convert"
REQUIRED_COLUMNS = ("qry", "pos_text")  # image paths and negatives are optional
PUBLISHED_COLUMNS = (*REQUIRED_COLUMNS, "qry_image_path", "pos_image_path", "neg_text", "neg_image_path",
                     "qry_video_path", "pos_video_path", "neg_video_path", "modality", "language")
NEAR_MISS = 0.66  # difflib ratio above which an unknown column is taken for a misspelt known one

# MMEB-train / mmE5-MMEB-hardneg subsets and their meta-task (mme5.md §4).
SUBSET_TASKS: dict[str, Task] = {
    **dict.fromkeys(["ImageNet_1K", "N24News", "HatefulMemes", "SUN397", "VOC2007"], Task.CLASSIFICATION),
    **dict.fromkeys(
        ["InfographicsVQA", "ChartQA", "A-OKVQA", "DocVQA", "OK-VQA", "Visual7W", "TAT-DQA", "ArxivQA"],
        Task.VQA,
    ),
    **dict.fromkeys(
        ["VisDial", "CIRR", "NIGHTS", "WebQA", "VisualNews_i2t", "VisualNews_t2i", "MSCOCO_i2t", "MSCOCO_t2i",
         "InfoSeek_it2t", "InfoSeek_it2it"],
        Task.RETRIEVAL,
    ),
    "MSCOCO": Task.GROUNDING,
}


@dataclass
class ConversionReport(SkipLog):
    """Counts of rows read, written, repaired quirks and skipped rows (first messages kept)."""

    rows: int = 0
    written: int = 0
    quirks: Counter = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {"rows": self.rows, "written": self.written, "quirks": dict(self.quirks),
                "skipped": dict(self.skipped), "errors": list(self.errors)}

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> ConversionReport:
        return cls(rows=data["rows"], written=data["written"], quirks=Counter(data["quirks"]),
                   skipped=Counter(data["skipped"]), errors=list(data["errors"]))


# ----------------------------------------------------------------------------- row parsing


def parse_list(value: Any, field_name: str, images: bool = False) -> list[Any]:
    """Negatives as a real list, or as the reference pipeline's stringified list (parsed safely, no eval):
    strings, or with `images` also image values (`datasets` image dicts, bytes)."""
    if value is None:
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise BadRow(field_name, f"not a list literal: {value[:80]!r}", "bad_list") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    allowed = (str, dict, bytes) if images else str
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, allowed) or v is None for v in value):
        what = "strings or images" if images else "strings"
        raise BadRow(field_name, f"expected a list of {what}, found {_describe(value)}", "bad_list")
    return [v or "" for v in value]


def _medium(kind: str) -> str:
    """A side kind's image or video part: "I", "V" or "" (text only)."""
    return kind.removesuffix("T")


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {sorted({type(v).__name__ for v in value})}"
    return type(value).__name__


class RowConverter:
    """Turns one public row into a Sample, reading its images from the image root (None: rows must carry
    their images, as `datasets` image columns do)."""

    def __init__(self, image_root: Path | None, report: ConversionReport, max_negatives: int | None = None,
                 language: str = "en", verify_images: bool = True, allow_outside_images: bool = False):
        self.image_root = image_root
        self.allow_outside_images = allow_outside_images
        self.report = report
        self.max_negatives = max_negatives
        self.language = language
        self.verify_images = verify_images

    def convert(self, row: dict[str, Any], sample_id: str, task: Task, source: str) -> Sample:
        missing = [name for name in REQUIRED_COLUMNS if name not in row]
        if missing:
            raise BadRow(missing[0], f"column missing (the row has {sorted(row)})", "missing_column")
        query = self.side(row.get("qry"), row.get("qry_image_path"), row.get("qry_video_path"), "qry")
        positive = self.side(row.get("pos_text"), row.get("pos_image_path"), row.get("pos_video_path"),
                             "pos")
        negatives = self.drop_positive_copies(self.negatives(row, positive.prompt, sample_id), positive)
        modality = self.row_modality(row.get("modality"), query, positive)
        query = self.fit(query, modality.query, "qry")
        positive = self.fit(positive, modality.target, "pos_text")
        negatives = [self.fit(n, modality.target, "neg_text") for n in negatives]
        if row.get("language"):
            language = str(row["language"])
        else:
            language = self.language
        try:
            return Sample(id=sample_id, task=task, modality=modality, language=language, source=source,
                          query=query, positive=positive, negatives=negatives)
        except SchemaError as error:
            raise BadRow("modality", str(error), "modality_mismatch") from None

    def row_modality(self, declared: Any, query: Side, positive: Side) -> Modality:
        """The `modality` field where the sides' images and videos agree with it, else the sides' own: the
        reference ignores the field and trains the sides as they are (counted as `modality_field_ignored`).
        The field still decides whether a visual side's words are its instruction or its text."""
        if not declared:
            return self.modality_of(query, positive)
        modality = self.declared_modality(declared)
        sides = (_medium(query.kind), _medium(positive.kind))
        if (_medium(modality.query), _medium(modality.target)) == sides:
            return modality
        self.report.quirks["modality_field_ignored"] += 1
        return self.modality_of(query, positive)

    def modality_of(self, query: Side, positive: Side) -> Modality:
        try:
            return Modality.of(query, positive)
        except ValueError:
            raise BadRow("qry_image_path", f"{query.kind}2{positive.kind} is not a multimodal combination "
                         f"({', '.join(m.value for m in Modality)})", "bad_modality") from None

    def declared_modality(self, value: Any) -> Modality:
        try:
            return Modality(str(value).upper().replace("->", "2"))
        except ValueError:
            raise BadRow("modality", f"unknown modality {value!r}", "bad_modality") from None

    def side(self, prompt: Any, image_path: Any, video_path: Any, role: str, index: str = "") -> Side:
        """A side from its published string (kept verbatim) and image path or frames folder; repairs are
        counted. `role` names its fields: "qry" (qry, qry_image_path, ...), "pos" (pos_text, ...) or "neg"
        with `index` "[i]"."""
        text_field = ("qry" if role == "qry" else f"{role}_text") + index
        image_field, video_field = f"{role}_image_path{index}", f"{role}_video_path{index}"
        prompt = "" if prompt is None else prompt
        if not isinstance(prompt, str):
            raise BadRow(text_field, f"expected a string, found {type(prompt).__name__} {prompt!r:.40}",
                         "bad_type")
        if image_path and video_path:
            raise BadRow(video_field, f"a side holds an image or a video, not both ({image_field} is "
                         f"{image_path!r:.60})", "image_and_video")
        instruction, text, had_placeholder = published.split(prompt)
        image = self.image(image_path, image_field) if image_path else None
        video = self.frames(video_path, video_field) if video_path else None
        visual = image is not None or video is not None
        if had_placeholder and not visual:
            self.report.quirks["stray_image_token"] += 1
        if visual and not had_placeholder:
            self.report.quirks["missing_image_token"] += 1
        if not text and not visual and not instruction:
            kind = "empty_positive" if role == "pos" else "empty_side"
            raise BadRow(text_field, "empty text and no image or video", kind)
        if not text and not visual:  # an instruction alone is the content of a text-only side
            instruction, text = "", instruction
        if visual and not text and not instruction:  # an image or video without any instruction
            self.report.quirks["image_instruction_added" if video is None else "video_instruction_added"] += 1
            instruction = published.IMAGE_INSTRUCTION if video is None else published.VIDEO_INSTRUCTION
            prompt = published.render(instruction, None, has_image=True)
        return Side(instruction=instruction, text=text, image=image, video=video, prompt=prompt)

    def fit(self, side: Side, kind: str, field_name: str) -> Side:
        """Reconcile the prompt split with the declared side kind (text expected, or not expected); the
        published string stays as it is."""
        if "T" in kind and not side.text and side.instruction:
            self.report.quirks["instruction_as_text"] += 1
            return replace(side, instruction="", text=side.instruction)
        if "T" not in kind and side.text and side.visual:
            return replace(side, instruction=f"{side.instruction} {side.text}".strip(), text=None)
        expected, found = _medium(kind), _medium(side.kind)
        if expected != found:
            media = {"I": "an image", "V": "a video", "": "no image or video"}
            raise BadRow(field_name, f"the declared modality {kind} expects {media[expected]}, found "
                         f"{media[found]}", "modality_mismatch")
        return side

    def negatives(self, row: dict[str, Any], positive_prompt: str, sample_id: str) -> list[Side]:
        """The row's hard negatives. An image negative without text gets a text by the reference rule: the
        positive's string when all negative texts are equal (typically all empty), else one of the non-empty
        negative texts (chosen by a generator seeded with the sample id, so conversion is reproducible)."""
        texts = parse_list(row.get("neg_text"), "neg_text")
        paths = parse_list(row.get("neg_image_path"), "neg_image_path", images=True)
        videos = parse_list(row.get("neg_video_path"), "neg_video_path")
        if isinstance(row.get("neg_text"), str) or isinstance(row.get("neg_image_path"), str):
            self.report.quirks["stringified_negatives"] += 1
        for name, given, what in (("neg_image_path", paths, "image paths"), ("neg_video_path", videos,
                                                                             "frames folders")):
            if texts and given and len(texts) != len(given):
                raise BadRow(name, f"{len(given)} {what} for {len(texts)} negative texts",
                             "negative_length_mismatch")
        count = max(len(texts), len(paths), len(videos))
        texts, paths, videos = texts or [""] * count, paths or [""] * count, videos or [""] * count
        if len(paths) != len(videos):
            raise BadRow("neg_video_path", f"{len(videos)} frames folders for {len(paths)} negative image "
                         "paths", "negative_length_mismatch")
        non_empty = [text for text in texts if text.strip()]
        choose = random.Random(sample_id).choice
        sides = []
        for i, (text, path, video) in enumerate(zip(texts, paths, videos, strict=True)):
            if not text.strip() and not path and not video:
                self.report.quirks["empty_negative_dropped"] += 1
                continue
            if not text.strip():
                self.report.quirks["negative_text_inherited"] += 1
                text = positive_prompt if len(set(texts)) == 1 or not non_empty else choose(non_empty)
            sides.append(self.side(text, path, video, "neg", f"[{i}]"))
        return sides

    def drop_positive_copies(self, negatives: list[Side], positive: Side) -> list[Side]:
        """The negatives without copies of the positive (same string and image), at most `max_negatives`."""
        kept = []
        for side in negatives:
            if side == positive:
                self.report.quirks["negative_equals_positive_dropped"] += 1
            else:
                kept.append(side)
        return kept[: self.max_negatives] if self.max_negatives is not None else kept

    def image(self, value: Any, field_name: str) -> bytes:
        """An image's bytes, checked: from a path under the image root, or from a `datasets` image value
        (its bytes, or the file it names, as `datasets` itself would open it)."""
        if isinstance(value, str):
            return self.read(self.under_root(value, field_name), field_name)
        if isinstance(value, bytes):
            return self.checked(value, field_name, f"the image in {field_name}")
        if isinstance(value, dict) and value.get("bytes"):
            return self.checked(value["bytes"], field_name, f"the image in {field_name}")
        if isinstance(value, dict) and value.get("path"):
            return self.read(Path(value["path"]), field_name)
        raise BadRow(field_name, f"expected an image path or image, found {_describe(value)}", "bad_type")

    def frames(self, value: Any, field_name: str) -> list[bytes]:
        """A video's frames, each checked: the image files of a folder under the image root, in the
        reference's natural order (frame_2 before frame_10)."""
        if not isinstance(value, str):
            raise BadRow(field_name, f"expected the path of a folder of frames, found {_describe(value)}",
                         "bad_type")
        folder = self.under_root(value, field_name)
        if folder.is_file():
            raise BadRow(field_name, f"{folder} is a file: a video is read as a folder of its frames, and no "
                         "video decoder is installed to extract them (extract them first, e.g. ffmpeg -i "
                         f"{folder.name} FOLDER/%05d.jpg)", "video_file")
        if not folder.is_dir():
            raise BadRow(field_name, f"frames folder {folder} is missing", "missing_video")
        names = frame_order(entry.name for entry in folder.iterdir() if entry.is_file())
        if not names:
            raise BadRow(field_name, f"frames folder {folder} holds no frames ({', '.join(FRAME_EXTENSIONS)} "
                         "files)", "missing_video")
        return [self.read(folder / name, field_name) for name in names]

    def under_root(self, relative: str, field_name: str) -> Path:
        if self.image_root is None:
            raise BadRow(field_name, f"image path {relative!r} but no image root (pass --images)",
                         "missing_image")
        path = self.image_root / relative
        if not self.allow_outside_images and not _inside(path, self.image_root):
            raise BadRow(field_name, f"image path {relative!r} leaves the image root {self.image_root} "
                         "(pass --allow-images-outside-root to follow it)", "path_escape")
        return path

    def read(self, path: Path, field_name: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError:
            raise BadRow(field_name, f"image file {path} is missing or unreadable", "missing_image") from None
        return self.checked(data, field_name, f"image file {path}")

    def checked(self, data: bytes, field_name: str, what: str) -> bytes:
        try:
            image_extension(data)
            if self.verify_images:
                check_image(data, where=what)
        except (SchemaError, ImageDecodeError) as error:
            raise BadRow(field_name, f"{what} is corrupt: {error}", "corrupt_image") from None
        return data


# ----------------------------------------------------------------------------- input files


def check_columns(table: Table, layout: RowLayout | None = None, ignore: Sequence[str] = ()) -> list[str]:
    """Refuse a table that lacks the layout's required columns, or holds a column the layout does not read
    (pairs: any not in `ignore`; published rows and VLM2Vec-V2 sets: a near miss of a read name, unless the
    reference leaves it unread); returns the columns left unread."""
    names = table.columns()
    format_name = "published" if layout is None else layout.name
    missing = missing_columns(names, layout)
    if missing:
        raise ValueError(f"{table.name}: missing column(s) {missing} of the {format_name} format; it has "
                         f"{names}")
    known = PUBLISHED_COLUMNS if layout is None else layout.known_columns()
    ignore = (*ignore, *(() if layout is None else layout.ignored_columns))
    unread = [name for name in names if name not in known]
    near = {name: difflib.get_close_matches(name, known, 1, NEAR_MISS) for name in unread}
    refused = [name for name in unread
               if name not in ignore and ((layout is not None and layout.refuses_unread) or near[name])]
    if refused:
        named = ", ".join(repr(name) + (f" (did you mean {near[name][0]!r}?)" if near[name] else "")
                          for name in refused)
        way = "name the field a column holds with --map FIELD=COLUMN" if isinstance(layout, PairFormat) else (
            "rename the column (or read the file with --format pairs and --map)")
        raise ValueError(f"{table.name}: unknown column(s) {named}; the {format_name} format reads {known}: "
                         f"{way}, or leave a column unread with --ignore-columns")
    return unread


def missing_columns(names: Any, layout: RowLayout | None) -> list[str]:
    """Required columns absent from `names`: the published row's, or the layout's (a pair's: a text, image
    or video column for the query and for the positive)."""
    if layout is None:
        return [name for name in REQUIRED_COLUMNS if name not in names]
    return layout.missing(names)


def ordered_rows(tables: list[Table], seed: int | None, start: int) -> Iterator[tuple[int, int, int, Row]]:
    """(position, table index, row index, row) from `start`: every row of `tables` once, in their order
    (`seed` None, streamed) or in the permutation that `seed` draws (a table loaded when first met)."""
    totals = [len(table) for table in tables]
    if seed is None:
        position = 0
        for table_index, table in enumerate(tables):
            skip = min(max(start - position, 0), totals[table_index])
            position += skip
            if skip == totals[table_index]:
                continue
            for row_index, row in table.rows(skip):
                yield position, table_index, row_index, row
                position += 1
        return
    order = [(t, r) for t, n in enumerate(totals) for r in range(n)]
    random.Random(seed).shuffle(order)
    loaded: dict[int, Sequence[Row]] = {}
    for position in range(start, len(order)):
        table_index, row_index = order[position]
        if table_index not in loaded:
            loaded[table_index] = tables[table_index].load()
        yield position, table_index, row_index, loaded[table_index][row_index]


def _inside(path: Path, root: Path) -> bool:
    """Whether `path` stays under `root` once `..` and symbolic links are resolved."""
    return path.resolve().is_relative_to(root.resolve())


def task_for(table: Table, source: str, task: str | None) -> Task:
    if task:
        return Task(task.lower())
    if source in SUBSET_TASKS:
        return SUBSET_TASKS[source]
    for name in (source, *table.task_hints):
        if name.lower() in {t.value for t in Task}:
            return Task(name.lower())
    raise ValueError(f"{table.name}: cannot tell the task of source '{source}'; pass --task "
                     f"({', '.join(t.value for t in Task)})")


def conversion_identity(tables: list[Table], options: dict[str, Any], image_root: str | os.PathLike | None
                        ) -> dict[str, Any]:
    """What defines a conversion's output, the identity its folder is claimed with: the options, the
    inputs (files by path, size and modification time; `datasets` by their fingerprint) and the image root
    (the rows' images are read from it: another root is another conversion, not a complete one)."""
    return {**options, "images": None if image_root is None else str(Path(image_root).resolve()),
            "inputs": [table.identity() for table in tables]}


def converted_before(folder: Path, tables: list[Table], options: dict[str, Any]) -> bool:
    """Shards of this conversion written before the converter recorded its owner: the manifest names the
    same inputs and options (the files' sizes and times were kept in a hash only: not compared)."""
    try:
        extra = read_manifest(folder).get("extra", {})
    except (OSError, ValueError):
        return False
    return extra.get("inputs") == [t.name for t in tables] and extra.get("options") == options


def check_split(tables: list[Table], split: str | None) -> None:
    """A `--split` given explicitly must be held by some input (files without one are read whatever it is, so
    a misspelt `--split tset` would otherwise convert them all without a word)."""
    if split not in (None, "all") and not any(table.split == split for table in tables):
        held = sorted({table.split for table in tables if table.split})
        raise FileNotFoundError(f"--split {split}: no input holds that split (the inputs hold "
                                f"{held or 'no named split'}); leave --split out to read every file given")


# ----------------------------------------------------------------------------- driver


def convert(
    inputs: list[str],
    image_root: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    source: str | None = None,
    task: str | None = None,
    language: str = "en",
    max_negatives: int | None = None,
    shard_size: int = 1000,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_outside_images: bool = False,
    split: str | None = None,
    seed: int | None = 0,
    layout: RowLayout | None = None,
    ignore_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """Convert input files into shards under `out_dir`; returns the manifest (report under 'extra').

    Everything that can be checked before a row is converted is checked before `out_dir` is claimed: the
    inputs, their encoding and columns, the split. A complete conversion of the same inputs and options is
    left as it is (its manifest returned); an interrupted one resumes.

    progress: show a progress bar and say what happens to `out_dir` (resumed, replaced, already complete).
    allow_outside_images: follow image paths that leave `image_root` (`..`, absolute, symbolic links out).
    split: which split of folders that name their files by split ("all": every file; None: the default,
    `train`, without requiring that any input holds it).
    seed: the seed of the rows' global permutation; None keeps file order.
    layout: read rows of another layout instead of the published one: your pairs/triplets (`PairFormat`),
    a VLM2Vec-V2 set (`mme5.data.layouts.LAYOUTS`); its default task and source apply where `task` and
    `source` are None.
    ignore_columns: columns to leave unread instead of refusing them as unknown.
    """
    tables = find_tables(inputs, split or DEFAULT_SPLIT)
    check_split(tables, split)
    unread = {table.name: names for table in tables
              if (names := check_columns(table, layout, ignore_columns))}
    if layout is not None:
        source, task = source or layout.source, task or (layout.task and str(layout.task))
    options = {"source": source, "task": task, "language": language, "max_negatives": max_negatives,
               "shard_size": shard_size, "allow_outside_images": allow_outside_images,
               "split": split or DEFAULT_SPLIT,
               "order": "file order" if seed is None else f"permuted, seed {seed}",
               "format": "published" if layout is None else layout.description()}
    say = print if progress else _quiet
    with claim_folder(out_dir, COMMAND, conversion_identity(tables, options, image_root), overwrite=overwrite,
                      adopt=lambda folder: converted_before(folder, tables, options),
                      inputs=[*inputs, *([image_root] if image_root is not None else [])],
                      ways_out="pass --overwrite to replace them (the new shards are written beside and "
                               "swapped in when complete), or choose another --out") as folder:
        done = read_manifest(folder.work) if (folder.work / MANIFEST).exists() else None
        if done is not None and done["complete"] and done["num_samples"] == 0:
            done = None  # it wrote nothing (images not there yet?): converted again, not "complete"
        if done is not None and done["complete"]:
            folder.complete(num_samples=done["num_samples"])  # a run stopped just before this
            say(f"{out_dir}: already holds this conversion, complete; nothing to do")
            return read_manifest(out_dir)
        if folder.state == "replace":
            say(f"{out_dir}: replacing what it holds (--overwrite): the conversion is written beside it "
                f"({folder.work}) and swapped in when complete")
        writer = ShardWriter(folder.work, max_count=shard_size, resume=done is not None,
                             extra={"inputs": [t.name for t in tables], "options": options,
                                    "unread_columns": unread})
        _write(writer, tables, image_root, options, seed=seed, layout=layout, strict=strict,
               progress=progress, say=say)
        folder.complete(num_samples=writer.num_written)
    return read_manifest(out_dir)


def _quiet(*_: Any) -> None:
    """`print` for a conversion asked to say nothing."""


def _write(writer: ShardWriter, tables: list[Table], image_root: str | os.PathLike | None,
           options: dict[str, Any], *, seed: int | None, layout: RowLayout | None, strict: bool,
           progress: bool, say: Callable[[str], Any]) -> None:
    """Convert the rows of `tables` into `writer`, from where its last finished shard ends."""
    source, task, max_negatives = options["source"], options["task"], options["max_negatives"]
    cursor = writer.resume_cursor or {"position": 0, "report": ConversionReport().snapshot()}
    report = ConversionReport.from_snapshot(cursor["report"])
    converter = RowConverter(None if image_root is None else Path(image_root), report, max_negatives,
                             options["language"], allow_outside_images=options["allow_outside_images"])
    if "position" in cursor:
        start = cursor["position"]
    else:  # a cursor of a file-order conversion before positions existed: the rows before (file, row)
        start = sum(len(t) for t in tables[: cursor.get("file", 0)]) + cursor.get("row", 0)
    if start:
        say(f"{writer.out_dir}: resuming an interrupted conversion after row {start} ({writer.num_written} "
            f"samples in {len(writer.shards)} shards)")
    bar = tqdm(total=sum(len(t) for t in tables), initial=start, unit="row", desc="convert",
               disable=not progress)
    with writer:
        for position, table_index, row_index, row in ordered_rows(tables, seed, start):
            table = tables[table_index]
            name = source or table.source
            bar.update(1)
            report.rows += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                if layout is not None:
                    if missing := missing_columns(row, layout):
                        raise BadRow(missing[0], f"column missing (the row has {sorted(row)})",
                                     "missing_column")
                    row = layout.row(row, parse_list)
                sample = converter.convert(row, f"{_slug(name)}-{table_index:03d}-{row_index:08d}",
                                           task_for(table, name, task), name)
            except BadRow as error:
                if layout is not None:
                    error = error.renamed(layout.user_field(error.field))
                message = f"{table.name}: row {row_index}: {error}"
                if strict:
                    raise ValueError(message) from None
                report.skip(error.kind, message)
                continue
            report.written += 1
            writer.write(sample, cursor={"position": position + 1, "report": report.snapshot()})
        writer.extra["report"] = report.snapshot()
    bar.close()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def layout_of(args: Any) -> RowLayout | None:
    """The row layout the command line names; pair options with another format are refused, not ignored."""
    if args.format == "pairs":
        return PairFormat.parse(args.map, args.query_instruction, args.positive_instruction)
    pair_options = {"--map": args.map, "--query-instruction": args.query_instruction,
                    "--positive-instruction": args.positive_instruction}
    if given := [name for name, value in pair_options.items() if value]:
        raise ValueError(f"{', '.join(given)}: options of --format pairs, not of --format {args.format}")
    return LAYOUTS.get(args.format)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="parquet/JSONL/CSV files or folders of them, `datasets` folders (save_to_disk), "
                             "hub dataset ids (namespace/name[@revision][:config])")
    parser.add_argument("--images", help="root that the rows' image paths are relative to (not needed when "
                                         "images come in a `datasets` image column)")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--source", help="source data set name (default: each file's parent directory)")
    parser.add_argument("--task", choices=[t.value for t in Task],
                        help="task (default: from the MMEB subset name or the parent directory)")
    parser.add_argument("--language", default="en", help="language of rows without a 'language' column")
    parser.add_argument("--max-negatives", type=number_at_least(0),
                        help="keep at most this many hard negatives a sample")
    parser.add_argument("--shard-size", type=number_at_least(1), default=1000, help="samples per shard")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards of another conversion in --out (written beside them, "
                             "swapped in when complete)")
    parser.add_argument("--split",
                        help="split of folders naming their files <split>-00000-of-00001 (default: "
                             f"{DEFAULT_SPLIT}, as the reference trains; 'all': every file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rows' global permutation")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="keep the inputs' row order (streams with constant memory)")
    parser.add_argument("--format", choices=["published", "pairs", *LAYOUTS], default="published",
                        help="published rows (qry, pos_text, ...), your own pairs/triplets (query, "
                             "query_image, query_video, positive, positive_image, positive_video, "
                             "negatives, ...: see mme5.data.pairs), or a VLM2Vec-V2 training set, read by "
                             "the reference's rule (see mme5.data.layouts)")
    parser.add_argument("--map", nargs="+", default=[], metavar="NAME=COLUMN",
                        help="pairs: the column holding a field, e.g. query=caption positive_image=file")
    parser.add_argument("--ignore-columns", nargs="+", default=[], metavar="COLUMN",
                        help="columns to leave unread (an unknown column is refused otherwise: in pairs any, "
                             "in published rows one that looks like a misspelt known column)")
    parser.add_argument("--query-instruction", default="", help="pairs: instruction of every query")
    parser.add_argument("--positive-instruction", default="", help="pairs: instruction of every positive")
    parser.add_argument("--allow-images-outside-root", action="store_true",
                        help="follow image paths that leave --images (.., absolute paths, symbolic links)")
    argv = sys.argv[1:] if argv is None else argv
    if undecodable := [printable(arg) for arg in argv if not encodable(arg)]:
        print(f"error: {undecodable} not UTF-8 (a path in another encoding?): shards and reports name their "
              "inputs in UTF-8; rename the file or folder (e.g. with convmv)", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        manifest = convert(args.input, args.images, args.out, args.source, args.task, args.language,
                           args.max_negatives, args.shard_size, args.strict, args.overwrite,
                           allow_outside_images=args.allow_images_outside_root, split=args.split,
                           seed=None if args.no_shuffle else args.seed,
                           layout=layout_of(args), ignore_columns=args.ignore_columns)
    except (OSError, ValueError, ImportError, OutputFolderError) as error:  # missing inputs, offline hub, bad
        print(f"error: {error}", file=sys.stderr)  # columns or encoding, --strict, --out held or not ours
        return 2
    report = manifest["extra"]["report"]
    print(f"{args.out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
          f"from {report['rows']} rows")
    print(f"  repaired: {report['quirks'] or 'nothing'}")
    print(f"  skipped:  {report['skipped'] or 'nothing'}")
    for table, names in manifest["extra"].get("unread_columns", {}).items():
        print(f"  unread columns of {table}: {names}")
    for message in report["errors"][:10]:
        print(f"    {message}", file=sys.stderr)
    if manifest["num_samples"] == 0:
        print(f"error: no sample written from {report['rows']} rows (is --images the right folder? see the "
              "skipped rows above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
