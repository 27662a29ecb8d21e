"""The demo world's evaluation set in MMEB-V2's published layouts, so `mme5.eval.mmeb_v2` reads it unchanged.

Layout under the output folder (`mme5.eval.mmeb_v2.readers` / `visdoc` describe the published one):
    sets.json                                   the registry of these sets (`load_v2_registry`): each
                                                reads as one of the 78 (`reads_as`), whose loader reads it
    annotations/mme5-demo/<repo>/<config>/test-00000-of-00001.parquet   the rows of each image and video set
    image-tasks/<Set>/<nnnnn>.png               the images of the image sets' rows
    video-tasks/frames/video_cls/Motion/<video>/frame_<k>.png           classification (global, as K700)
    video-tasks/frames/video_ret/MotionRetrieval/<video>/...            caption -> video (global, as MSR-VTT)
    video-tasks/frames/video_mret/MotionMoment/<video>/{query,positive,negative_<j>}/...
                                                moment retrieval (local, as QVHighlight): `query/` is the
                                                whole video, each clip folder one of its segments
    visdoc-tasks/ScenePages/{queries,corpus,qrels}/test-00000-of-00001.parquet, <corpus-id>.png
                                                text -> page (BEIR, as ViDoRe): the query's scene's page
                                                at grade 2, a page whose scene differs in position or
                                                background only at grade 1
Queries and labels are English (as MMEB-V2's); scenes come from the evaluation split (never trained on).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mme5.data.schema import Side
from mme5.demo import language as lang
from mme5.demo.mmeb import SubsetSpec, build_subset
from mme5.demo.render import Painter
from mme5.demo.scenes import POSITIONS, Scene, scenes_in, variants
from mme5.demo.tasks import CLASSIFY_MOTION, FIND_PAGE, FIND_VIDEO, PAGE, VIDEO
from mme5.eval.mmeb_v2.readers import IMAGE_PLACEHOLDER, frames_folder
from mme5.eval.mmeb_v2.registry import REGISTRY_FILE, Annotations, V2Set, save_v2_registry, sets_of

PARQUET = "test-00000-of-00001.parquet"
REPO = "mme5-demo"
MOMENT = next(s for s in sets_of("video") if s.name == "QVHighlight").query_instruction
CLIPS_PER_VIDEO = 4  # moment retrieval: a video's segments, one the positive
NEAR = ("position", "background")  # a page of a scene differing only in one of these: grade 1

IMAGE_SETS = (  # (demo subset of mme5.demo.mmeb, meta-task, the published set it reads as)
    (SubsetSpec("Shape", "Classification", "classification_i2t", "eval", "shape"), "Image CLS",
     "ImageNet-1K"),
    (SubsetSpec("AttributeVQA", "VQA", "vqa_it2t", "eval"), "Image QA", "OK-VQA"),
    (SubsetSpec("Scene_t2i", "Retrieval", "retrieval_t2i", "eval"), "Image RET", "MSCOCO_t2i"),
    (SubsetSpec("Grounding", "Grounding", "grounding_it2i", "eval"), "Image GD", "MSCOCO"),
)
VIDEO_SETS = (  # (name, meta-task, eval_type, reads as, query instruction, target instruction)
    ("Motion", "Video CLS", "global", "K700", CLASSIFY_MOTION, ""),
    ("MotionRetrieval", "Video RET", "global", "MSR-VTT", FIND_VIDEO, VIDEO),
    ("MotionMoment", "Video MRET", "local", "QVHighlight", MOMENT, VIDEO),
)
PAGES = V2Set("ScenePages", "visdoc", "VisDoc VDRv1", "global", FIND_PAGE, PAGE,
              Annotations(f"{REPO}/ScenePages"), "ViDoRe_docvqa")


@dataclass(frozen=True)
class V2Config:
    """What the set is drawn with (WorldConfig's values)."""

    seed: int
    queries: int  # per set
    candidates: int  # image retrieval and grounding candidates per query
    image_size: int
    frames: int
    page_size: int


def registry() -> tuple[V2Set, ...]:
    """The demo's sets, each reading as a published one (its loader and folder layout)."""
    images = tuple(V2Set(spec.name, "image", meta, "local", "", "", Annotations(f"{REPO}/MMEB_Test_Instruct",
                                                                                config=spec.name), reads_as)
                   for spec, meta, reads_as in IMAGE_SETS)
    videos = tuple(V2Set(name, "video", meta, kind, query, target, Annotations(f"{REPO}/{name}"), reads_as)
                   for name, meta, kind, reads_as, query, target in VIDEO_SETS)
    return (*images, *videos, PAGES)


def write_rows(root: Path, annotations: Annotations, rows: list[dict]) -> None:
    """One annotation table where fetch saves a hub repo's split (`readers.annotation_rows`)."""
    folder = root / "annotations" / annotations.repo / (annotations.config or "data")
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{annotations.split}-00000-of-00001.parquet")


def write_frames(folder: Path, frames: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(frames):
        (folder / f"frame_{k:04d}.png").write_bytes(frame)


def pool(config: V2Config, name: str, size: int) -> tuple[random.Random, Painter, list[Scene]]:
    """A set's randomness, painter (one picture per scene) and `size` distinct evaluation scenes."""
    rng = random.Random(f"{config.seed}/mmeb-v2/{name}")
    painter = Painter(config.image_size, f"{config.seed}/mmeb-v2/{name}", per_scene=True)
    return rng, painter, rng.sample(scenes_in("eval"), size)


# --- image sets: MMEB_Test_Instruct rows of the demo's MMEB subsets ---

def _instruction(side: Side) -> str:
    """The row's instruction as MMEB_Test_Instruct writes it: the image placeholder first when it has one."""
    return f"{IMAGE_PLACEHOLDER} {side.instruction}" if side.image is not None else side.instruction


def write_image_set(root: Path, spec: V2Set, subset: SubsetSpec, config: V2Config) -> None:
    queries = build_subset(subset, config.seed, config.queries, config.candidates, config.image_size).queries
    paths: dict[bytes, str] = {}

    def path_of(side: Side) -> str:
        if side.image is None:
            return ""
        if side.image not in paths:
            paths[side.image] = f"{spec.name}/{len(paths):05d}.png"
            (root / "image-tasks" / paths[side.image]).parent.mkdir(parents=True, exist_ok=True)
            (root / "image-tasks" / paths[side.image]).write_bytes(side.image)
        return paths[side.image]

    rows = [{"qry_inst": _instruction(q.query), "qry_text": q.query.text or "",
             "qry_img_path": path_of(q.query), "tgt_inst": _instruction(q.candidates[0]),
             "tgt_text": [c.text or "" for c in q.candidates],
             "tgt_img_path": [path_of(c) for c in q.candidates]} for q in queries]
    write_rows(root, spec.annotations, rows)


# --- video sets ---

def write_motion(root: Path, spec: V2Set, config: V2Config) -> None:
    """Classification: each clip against the four directions (the label set of all rows: the clips cycle
    through the directions, so every one is a label from 4 queries on)."""
    _, painter, shuffled = pool(config, spec.name, len(scenes_in("eval")))
    by_direction = {p: [s for s in shuffled if s.position == p] for p in POSITIONS}
    scenes = [by_direction[POSITIONS[i % len(POSITIONS)]][i // len(POSITIONS)] for i in range(config.queries)]
    frames = root / "video-tasks" / "frames" / frames_folder(spec)
    rows = []
    for i, scene in enumerate(scenes):
        write_frames(frames / f"clip{i:05d}", painter.clip(scene, config.frames))
        rows.append({"video_id": f"clip{i:05d}", "pos_text": lang.direction(scene.position, "en")})
    write_rows(root, spec.annotations, rows)


def write_motion_retrieval(root: Path, spec: V2Set, config: V2Config) -> None:
    """Caption -> clip over every clip of the set."""
    _, painter, scenes = pool(config, spec.name, config.queries)
    frames = root / "video-tasks" / "frames" / frames_folder(spec)
    rows = []
    for i, scene in enumerate(scenes):
        write_frames(frames / f"clip{i:05d}", painter.clip(scene, config.frames))
        rows.append({"video_id": f"clip{i:05d}", "caption": lang.motion_caption(scene, "en")})
    write_rows(root, spec.annotations, rows)


def write_moment(root: Path, spec: V2Set, config: V2Config) -> None:
    """Videos of CLIPS_PER_VIDEO segments (distinct scenes, one after the other); the query names one."""
    rng, painter, scenes = pool(config, spec.name, config.queries * CLIPS_PER_VIDEO)
    frames = root / "video-tasks" / "frames" / frames_folder(spec)
    rows = []
    for i in range(config.queries):
        segments = scenes[i * CLIPS_PER_VIDEO:(i + 1) * CLIPS_PER_VIDEO]
        clips = [painter.clip(scene, config.frames) for scene in segments]
        positive = rng.randrange(CLIPS_PER_VIDEO)
        folder = frames / f"video{i:05d}"
        write_frames(folder / "query", [frame for clip in clips for frame in clip])
        negatives = iter(range(1, CLIPS_PER_VIDEO))
        for j, clip in enumerate(clips):
            write_frames(folder / ("positive" if j == positive else f"negative_{next(negatives)}"), clip)
        rows.append({"query": lang.motion_caption(segments[positive], "en"),
                     "video_path": f"videos/video{i:05d}.mp4"})
    write_rows(root, spec.annotations, rows)


# --- visual documents ---

def write_pages(root: Path, spec: V2Set, config: V2Config) -> None:
    """BEIR queries / corpus / qrels: a caption against every page; graded relevance (2 exact, 1 near)."""
    rng, painter, shuffled = pool(config, spec.name, len(scenes_in("eval")))
    near = {s: found for s in shuffled if (found := [v for a in NEAR for v in variants(s, a, "eval")])}
    scenes = list(near)[:config.queries]  # scenes with a near one among the evaluation scenes
    folder = root / "visdoc-tasks" / spec.name
    documents: dict[Scene, str] = {}
    qrels = []
    for i, scene in enumerate(scenes):
        for grade, shown in ((2, scene), (1, rng.choice(near[scene]))):
            documents.setdefault(shown, f"page{len(documents):05d}")
            qrels.append({"query-id": f"q{i:05d}", "corpus-id": documents[shown], "score": grade})
    corpus = []
    for shown, name in sorted(documents.items(), key=lambda item: item[1]):
        page = painter.page(shown, config.page_size)
        (folder / f"{name}.png").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.png").write_bytes(page)
        corpus.append({"corpus-id": name, "image": {"bytes": page, "path": f"{name}.png"}})
    queries = [{"query-id": f"q{i:05d}", "query": lang.caption(s, "en")} for i, s in enumerate(scenes)]
    tables = {"queries": queries, "corpus": corpus, "qrels": qrels}
    for config_name, rows in tables.items():
        (folder / config_name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / config_name / PARQUET)


WRITERS: dict[str, Callable[[Path, V2Set, V2Config], None]] = {
    "Motion": write_motion, "MotionRetrieval": write_motion_retrieval, "MotionMoment": write_moment,
    "ScenePages": write_pages,
}


def write_mmeb_v2(root: Path, config: V2Config) -> dict[str, int]:
    """Every set and the registry under `root`; returns the queries per set."""
    subsets = {subset.name: subset for subset, _, _ in IMAGE_SETS}
    sets = registry()
    for spec in sets:
        if spec.name in subsets:
            write_image_set(root, spec, subsets[spec.name], config)
        else:
            WRITERS[spec.name](root, spec, config)
    save_v2_registry(sets, root / REGISTRY_FILE)
    return {spec.name: config.queries for spec in sets}
