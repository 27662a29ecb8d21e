"""MMEB-V2's 36 image and 18 video sets read into `RetrievalSet`s, as VLM2Vec's loaders
(`src/data/eval_dataset/*.py`, commit 6e1e1d4) and `eval.py` build them.

Layout under the root (what `python -m mme5.data.fetch --dataset mmeb-v2` writes):
    annotations/<owner>/<name>/<config>/<split>-*.parquet   each hub annotation repo of the registry
                              (`Annotations`), files as published; `<config>` is `data` for the default one
    image-tasks/<paths of the rows>                         TIGER-Lab/MMEB-V2 image-tasks/mmeb_v1.tar.gz, its
                              MMEB/ folder moved up (download_data.sh)
    video-tasks/frames/<frames_folder(set)>/<video>/<frame files>  the frames tarballs of TIGER-Lab/MMEB-V2,
                              unpacked as download_data.sh does; moment retrieval: `<video>/query/` and one
                              folder per clip (the positive's name starts with "positive"); MomentSeeker:
                              `video_frames/<clip or query video>/` and `query_<image>` files
A video is every frame of its folder (`frames.frame_refs`); the model keeps `num_frames` of them.

As the reference:
- image sets: rows of ziyjiang/MMEB_Test_Instruct (`qry_inst`, `qry_text`, `qry_img_path`, `tgt_inst`,
  `tgt_text`, `tgt_img_path`), each query against its own list, gold first; the `<|image_1|>` placeholder
  dropped from the instructions; a candidate with an image gets `tgt_inst`, a text-only one (labels,
  answers, captions) is encoded bare, as the cls / qa / i2t loaders do.
- video classification: query = the instruction + the video; candidates = label texts, global (every
  distinct label); SmthSmthV2 local over the row's `neg_text` (which holds the answer), its first 1000
  rows only (`num_sample_per_subset` in video.yaml).
- video QA: the loaders' query texts (question plus options, each loader's own way) after the common
  instruction; candidates = the options, cleaned as each loader cleans them; local.
- video retrieval: caption -> the videos, global, deduplicated by video name (`global_candidates`).
- moment retrieval: query = the instruction + text + the full video's frames (`query/`); candidates = that
  video's clip folders; local. MomentSeeker: the instruction by query kind (`.mp4`: video, `.jpg`: image,
  else text), candidates = positive then negative clips, every positive relevant.
- `max_queries` keeps the first N rows (`sample_dataset`); a global set's candidates are those of the kept
  rows plus its label set.
Where it differs:
- A global classification set's label set is the distinct labels of ALL its annotation rows (the reference
  adds a label list kept in its code, `VIDEOCLS_LABEL_MAPPING`; the published test sets hold every class).
- Moment-retrieval clip folders are taken in `frame_order` (the reference takes `os.listdir`'s order, which
  only changes which of two exactly tied clips comes first).
- A missing frames folder is an error naming the set, row and field (the reference extracts frames from
  the raw video, which is not fetched).
- Query / candidate strings: the item carries instruction and text; the family's published format writes
  the string (the reference writes `<video token> <instruction> <text>`, for image sets with its own
  newline rules).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mme5.eval.images import ImageStore
from mme5.eval.mmeb_v2.frames import natural_key
from mme5.eval.mmeb_v2.registry import MOMENTSEEKER_QUERY_INSTRUCTIONS, Annotations, V2Set
from mme5.eval.mmeb_v2.visdoc import global_candidates, read_table
from mme5.eval.retrieval import RetrievalSet, SetBuilder

IMAGE_PLACEHOLDER = "<|image_1|>"
SSV2_ROWS = 1000  # video.yaml: num_sample_per_subset of SmthSmthV2
MVBENCH_CONFIGS = (  # mvbench_dataset.subset_meta, in its order: the rows are concatenated in it
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle", "moving_direction",
    "action_localization", "scene_transition", "action_count", "moving_count", "moving_attribute",
    "state_change", "fine_grained_pose", "character_order", "egocentric_navigation",
    "counterfactual_inference")
FRAMES = {  # video.yaml frame_root of each set, under video-tasks/frames/
    "K700": "video_cls/K700", "SmthSmthV2": "video_cls/SSv2", "HMDB51": "video_cls/HMDB51",
    "UCF101": "video_cls/UCF101", "Breakfast": "video_cls/Breakfast",
    "MVBench": "video_qa/MVBench", "Video-MME": "video_qa/Video-MME", "NExTQA": "video_qa/NExTQA",
    "EgoSchema": "video_qa/EgoSchema", "ActivityNetQA": "video_qa/ActivityNetQA",
    "DiDeMo": "video_ret/DiDeMo", "MSR-VTT": "video_ret/MSR-VTT", "MSVD": "video_ret/MSVD",
    "VATEX": "video_ret/VATEX", "YouCook2": "video_ret/YouCook2",
    "QVHighlight": "video_mret/QVHighlight", "Charades-STA": "video_mret/Charades_STA",
    "MomentSeeker": "video_mret/MomentSeeker",
}


@dataclass(frozen=True)
class Side:
    """What one item is made of (`SetBuilder.item`'s arguments) and the row field it comes from."""

    field: str
    instruction: str
    text: str | None = None
    image: str | None = None
    video: Path | None = None


@dataclass
class Row:
    """One query row: its query, its candidates (name, side) in the loader's order, the relevant names."""

    where: str
    query: Side
    candidates: list[tuple[str, Side]]
    positives: tuple[str, ...]


# --- where the rows are ---

def annotation_rows(root: Path, annotations: Annotations, columns: Sequence[str],
                    config: str | None = None) -> Iterator[tuple[str, dict]]:
    """("<file> row <i>", row) of a hub annotation repo's split as fetch saved it (layout above)."""
    folder = root / "annotations" / annotations.repo
    yield from read_table(folder, config or annotations.config or "data", annotations.split, columns)


# --- image sets ---

IMAGE_COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")


def image_row(where: str, row: dict) -> Row:
    """A MMEB_Test_Instruct row: the query and its own candidates, gold first."""
    texts, images = row["tgt_text"] or [], row["tgt_img_path"] or []
    if not texts or len(texts) != len(images):
        raise ValueError(f"{where}: tgt_text has {len(texts)} entries and tgt_img_path {len(images)}; "
                         "expected the same number, at least 1 (gold first)")
    query = Side("qry_text", _drop_placeholder(row["qry_inst"]), row["qry_text"], row["qry_img_path"] or None)
    target = _drop_placeholder(row["tgt_inst"])
    candidates = [(f"{image}:{text}", Side(f"tgt_img_path[{j}]", target if image else "", text,
                                           image or None))
                  for j, (text, image) in enumerate(zip(texts, images, strict=True))]
    return Row(where, query, candidates, (candidates[0][0],))


def _drop_placeholder(instruction: str) -> str:
    return instruction.replace(IMAGE_PLACEHOLDER, "").strip()


def read_image(root: str | Path, spec: V2Set, max_queries: int | None = None) -> RetrievalSet:
    """An image set of MMEB-V2 (layout above) as one local ranking named after it."""
    root = Path(root)
    rows = [image_row(where, row) for where, row in
            list(annotation_rows(root, spec.annotations, IMAGE_COLUMNS))[:max_queries]]
    return build(spec, rows, ImageStore([root / "image-tasks"]))


# --- video sets: one row parser per loader ---

def _cls(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    """The video against its label (global: the label set joins in `read_video`); SmthSmthV2 (local)
    against the row's own `neg_text` list, which holds the label."""
    video, label = str(row["video_id"]), row["pos_text"]
    column = "neg_text" if spec.eval_type == "local" else "pos_text"
    options = row["neg_text"] if spec.eval_type == "local" else [label]
    return Row(where, Side("video_id", spec.query_instruction, None, video=frames / video),
               [(option, Side(column, "", option)) for option in options], (label,))


def _retrieval(video_field: str, text_field: str, video_name: Callable[[str], str] = str,
               first: bool = False) -> Callable[[V2Set, Path, str, dict], Row]:
    """Caption -> video rows: the frames folder is `video_name(row[video_field])`; `first`: the text field
    is a list, its first entry the query (MSVD, VATEX)."""
    def parse(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
        name, text = video_name(str(row[video_field])), row[text_field]
        video = Side(video_field, spec.target_instruction, None, video=frames / name)
        query = Side(text_field, spec.query_instruction, text[0] if first else text)
        return Row(where, query, [(name, video)], (name,))
    return parse


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _qa(spec: V2Set, where: str, video: tuple[str, Path], text: str, options: Sequence[str], answer: int
        ) -> Row:
    """The question (with its options) + the video (field, frames folder) against the options."""
    if not 0 <= answer < len(options):
        raise ValueError(f"{spec.name}, {where}, field answer: not one of the {len(options)} options")
    return Row(where, Side(video[0], spec.query_instruction, text, video=video[1]),
               [(option, Side("options", "", option)) for option in options], (options[answer],))


def _answer_index(spec: V2Set, where: str, row: dict) -> int:
    """The row's `answer` as an option's index (EgoSchema, NExTQA)."""
    try:
        return int(row["answer"])
    except (TypeError, ValueError):
        raise ValueError(f"{spec.name}, {where}, field answer: {row['answer']!r} is not an option's index "
                         "(0, 1, ...)") from None


def _position(options: Sequence[str], answer: str) -> int:
    """The answer's place among the options (or letters), -1 when it is none of them."""
    return list(options).index(answer) if answer in list(options) else -1


def _letter_stripped(option: str) -> str:
    """An option "B. text" as the Video-MME and EgoSchema loaders clean it:
    `o[o.find('. '):].strip('. ')`, quirks kept (no ". " in it: its last character)."""
    return option[option.find(". "):].strip(". ")


def _options_block(question: str, options: Sequence[str]) -> str:
    """The question followed by "Options:" and "(A) ..." lines (`vision_utils.qa_template`)."""
    return "\n".join([question, "Options:", *(f"({chr(ord('A') + i)}) {o}" for i, o in enumerate(options))])


def _videomme(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    options = list(row["options"])
    return _qa(spec, where, ("videoID", frames / str(row["videoID"])),
               row["question"] + "\n" + "\n".join(options), [_letter_stripped(o) for o in options],
               _position("ABCD", row["answer"]))


def _egoschema(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    options = list(row["option"])  # the question and options run together, as the loader joins them
    return _qa(spec, where, ("video_idx", frames / str(row["video_idx"])),
               row["question"] + " ".join(options), [_letter_stripped(o) for o in options],
               _answer_index(spec, where, row))


def _nextqa(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    options = [row[f"a{i}"] for i in range(5)]
    return _qa(spec, where, ("video", frames / str(row["video"])), _options_block(row["question"], options),
               options, _answer_index(spec, where, row))


def _mvbench(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    options = list(row["candidates"])
    lettered = [f"({chr(ord('A') + i)}) {o}" for i, o in enumerate(options)]
    return _qa(spec, where, ("video", frames / row["subset"] / str(row["video"])),
               _options_block(row["question"], options), lettered, _position(options, row["answer"]))


def _activitynetqa(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    options = ["yes", "no"]
    return _qa(spec, where, ("video_name", frames / f"v_{row['video_name']}"),
               row["question"] + "? (A) yes; (B) no.", options, _position(options, row["answer"]))


def _moment(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    """QVHighlight / Charades-STA: the video's `query/` frames + text against its clip folders."""
    folder = frames / _stem(row["video_path"])
    clips = clip_folders(folder, where)
    positives = tuple(str(folder / c) for c in clips if c.startswith("positive"))
    if len(positives) != 1:
        raise ValueError(f"{spec.name}, {where}, field video_path: {folder} holds {len(positives)} clip "
                         "folders named positive*; expected 1")
    query = Side("video_path", spec.query_instruction, row["query"], video=folder / "query")
    return Row(where, query, [(str(folder / clip), Side("video_path", spec.target_instruction,
                                                        video=folder / clip)) for clip in clips], positives)


def clip_folders(folder: Path, where: str) -> list[str]:
    """The clip folders of a moment-retrieval video (every sub-folder but `query`), natural order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}, field video_path: frames folder {str(folder)!r} not found")
    return sorted((entry.name for entry in os.scandir(folder) if entry.is_dir() and entry.name != "query"),
                  key=natural_key)


def _momentseeker(spec: V2Set, frames: Path, where: str, row: dict) -> Row:
    source = row["input_frames"]
    kind = "video" if source.endswith(".mp4") else "image" if source.endswith(".jpg") else "text"
    query = Side("input_frames", MOMENTSEEKER_QUERY_INSTRUCTIONS[kind], row["query"],
                 image=f"query_{source}" if kind == "image" else None,
                 video=frames / "video_frames" / source.split(".mp4")[0].replace("/", "_")
                 if kind == "video" else None)

    def clips(field_name: str) -> list[tuple[str, Side]]:
        out = []
        for j, entry in enumerate(row[field_name]):
            folder = frames / "video_frames" / entry["output_path"].replace("/", "_").split(".mp4")[0]
            out.append((str(folder), Side(f"{field_name}[{j}]", spec.target_instruction, video=folder)))
        return out

    positive = clips("positive_frames")
    return Row(where, query, positive + clips("negative_frames"), tuple(name for name, _ in positive))


VIDEO_READERS: dict[str, tuple[tuple[str, ...], Callable[[V2Set, Path, str, dict], Row]]] = {
    # set -> (columns it reads, row parser)
    **{name: (("video_id", "pos_text"), _cls) for name in ("K700", "HMDB51", "UCF101", "Breakfast")},
    "SmthSmthV2": (("video_id", "pos_text", "neg_text"), _cls),
    "MVBench": (("question", "video", "candidates", "answer"), _mvbench),
    "Video-MME": (("question", "videoID", "options", "answer"), _videomme),
    "NExTQA": (("video", "question", "answer", "a0", "a1", "a2", "a3", "a4"), _nextqa),
    "EgoSchema": (("video_idx", "question", "answer", "option"), _egoschema),
    "ActivityNetQA": (("video_name", "question", "answer"), _activitynetqa),
    "DiDeMo": (("video", "caption"), _retrieval("video", "caption", _stem)),
    "MSR-VTT": (("video_id", "caption"), _retrieval("video_id", "caption")),
    "MSVD": (("video_id", "caption"), _retrieval("video_id", "caption", first=True)),
    "VATEX": (("videoID", "enCap"), _retrieval("videoID", "enCap", first=True)),
    "YouCook2": (("id", "sentence"), _retrieval("id", "sentence")),
    "QVHighlight": (("query", "video_path"), _moment),
    "Charades-STA": (("query", "video_path"), _moment),
    "MomentSeeker": (("query", "input_frames", "positive_frames", "negative_frames"), _momentseeker),
}


def frames_folder(spec: V2Set) -> str:
    """The set's folder under video-tasks/frames/: FRAMES for the 78; a set of a registry of one's own
    sits beside the set it reads as (`video_cls/<name>`, ...)."""
    if spec.name in FRAMES:
        return FRAMES[spec.name]
    return f"{FRAMES[spec.loader].split('/')[0]}/{spec.name}"


def video_rows(root: Path, spec: V2Set, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """The set's annotation rows; MVBench's configs concatenated in the reference's order, each row
    tagged with its config as `subset`."""
    if spec.loader != "MVBench":
        yield from annotation_rows(root, spec.annotations, columns)
        return
    for config in MVBENCH_CONFIGS:
        for where, row in annotation_rows(root, spec.annotations, columns, config):
            yield where, row | {"subset": config}


def read_video(root: str | Path, spec: V2Set, max_queries: int | None = None) -> RetrievalSet:
    """A video set of MMEB-V2 (layout above) as one ranking named after it."""
    root = Path(root)
    columns, parse = VIDEO_READERS[spec.loader]
    frames = root / "video-tasks" / "frames" / frames_folder(spec)
    if spec.loader == "SmthSmthV2":
        max_queries = min(SSV2_ROWS, max_queries or SSV2_ROWS)
    raw = list(video_rows(root, spec, columns))
    labels = {}  # a global classification set's label set: every row's label, kept rows or not
    if spec.meta_task == "Video CLS" and spec.eval_type == "global":
        labels = {row["pos_text"]: Side("pos_text", "", row["pos_text"]) for _, row in raw}
    rows = [parse(spec, frames, where, row) for where, row in raw[:max_queries]]
    return build(spec, rows, ImageStore([frames]), labels)


# --- rows -> RetrievalSet ---

def build(spec: V2Set, rows: Sequence[Row], images: ImageStore, corpus: dict[str, Side] | None = None
          ) -> RetrievalSet:
    """The rows as one ranking: local, each against its own candidates; global, all against every
    distinct candidate name of the rows, then of `corpus`. Every column named among a row's positives
    is relevant (a repeated name in a local list, MomentSeeker's several positives); gold is the first."""
    builder = SetBuilder(spec.name, images)

    def item(where: str, side: Side) -> int:
        return builder.item(side.instruction, side.text, side.image, f"{where}, field {side.field}",
                            video=side.video)

    queries = [item(row.where, row.query) for row in rows]
    if spec.eval_type == "local":
        names = [[name for name, _ in row.candidates] for row in rows]
        columns = [[item(row.where, side) for _, side in row.candidates] for row in rows]
    else:
        # a name's item from the first row naming it (reversed: earlier rows overwrite later ones)
        sides = {name: (row.where, side) for row in reversed(rows) for name, side in row.candidates}
        sides |= {name: ("label set", side) for name, side in (corpus or {}).items() if name not in sides}
        shared = global_candidates([[name for name, _ in row.candidates] for row in rows], list(corpus or ()))
        names = [shared] * len(rows)
        shared_columns = torch.tensor([item(*sides[name]) for name in shared], dtype=torch.long)
        columns = shared_columns.expand(len(rows), -1)  # (Q, C), one list for all
    relevance = torch.zeros(len(rows), max(map(len, names), default=0))
    for i, (row, row_names) in enumerate(zip(rows, names, strict=True)):
        for j, name in enumerate(row_names):
            relevance[i, j] = float(name in row.positives)
        if not relevance[i].any():
            raise ValueError(f"{spec.name}, {row.where}: the answer {row.positives} is not among the "
                             f"candidates {row_names[:10]}")
    several = bool((relevance.sum(dim=1) > 1).any())
    builder.rank(spec.name, queries, columns, relevance.argmax(dim=1), relevance if several else None)
    return builder.build()

