"""The demo world's evaluation set in MMEB-eval's on-disk layout, so the MMEB evaluator reads it unchanged.

Layout under the output folder (image paths in the parquet files are relative to it):
    <Subset>/test-00000-of-00001.parquet    qry_text, qry_img_path, tgt_text (list), tgt_img_path (list)
    eval_images/<Subset>/<nnnnn>.png
    subsets.json                            per subset: meta_task, split (IND/OOD), instruction, ...
As in MMEB, each side is one published string (`mme5.published.render`: the instruction inside, the
`<|image_1|>\\n` placeholder first when the side has an image, the trailing newline kept), the gold
candidate is index 0, classification candidates are the whole label set, and other candidate lists are
drawn from a pool of the subset's scenes. Queries are English, like MMEB's.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mme5 import published
from mme5.data.schema import Side, Task, image_extension
from mme5.demo.render import Painter
from mme5.demo.scenes import Scene, scenes_in, variants
from mme5.demo.tasks import RECIPES, Context, draw_episode

PARQUET = "test-00000-of-00001.parquet"
REGISTRY = "subsets.json"
SCHEMA = pa.schema([
    ("qry_text", pa.string()),
    ("qry_img_path", pa.string()),
    ("tgt_text", pa.list_(pa.string())),
    ("tgt_img_path", pa.list_(pa.string())),
])
META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")


@dataclass(frozen=True)
class SubsetSpec:
    name: str
    meta_task: str
    recipe: str  # a key of tasks.RECIPES
    split: str  # the scene split its queries and candidates come from; "eval" is IND, the others OOD
    attribute: str | None = None  # what every query is about (None: drawn per query)

    @property
    def distribution(self) -> str:
        return "IND" if self.split == "eval" else "OOD"


SUBSETS = (
    SubsetSpec("Shape", "Classification", "classification_i2t", "eval", "shape"),
    SubsetSpec("Colour", "Classification", "classification_i2t", "eval", "colour"),
    SubsetSpec("Count", "Classification", "classification_i2t", "eval", "count"),
    SubsetSpec("Shape-NewBackground", "Classification", "classification_i2t", "new_background", "shape"),
    SubsetSpec("Colour-NewPairs", "Classification", "classification_i2t", "new_pairs", "colour"),
    SubsetSpec("AttributeVQA", "VQA", "vqa_it2t", "eval"),
    SubsetSpec("PositionVQA", "VQA", "vqa_it2t", "eval", "position"),
    SubsetSpec("AttributeVQA-NewPairs", "VQA", "vqa_it2t", "new_pairs"),
    SubsetSpec("Scene_t2i", "Retrieval", "retrieval_t2i", "eval"),
    SubsetSpec("Scene_i2t", "Retrieval", "retrieval_i2t", "eval"),
    SubsetSpec("Scene_i2i", "Retrieval", "retrieval_i2i", "eval"),
    SubsetSpec("SceneEdit_it2i", "Retrieval", "retrieval_it2i", "eval"),
    SubsetSpec("Scene_t2i-NewBackground", "Retrieval", "retrieval_t2i", "new_background"),
    SubsetSpec("Grounding", "Grounding", "grounding_it2i", "eval"),
    SubsetSpec("Grounding-NewBackground", "Grounding", "grounding_it2i", "new_background"),
)


@dataclass(frozen=True)
class EvalQuery:
    query: Side
    candidates: list[Side]  # gold first
    scenes: tuple[Scene, ...]  # every scene drawn in this query's images (to check train/eval disjointness)


@dataclass(frozen=True)
class EvalSubset:
    spec: SubsetSpec
    queries: list[EvalQuery]


def build_subset(spec: SubsetSpec, seed: int, num_queries: int, num_candidates: int, image_size: int = 64
                 ) -> EvalSubset:
    """Queries on the subset's scenes; each scene has one picture per role, shared by all its queries."""
    rng = random.Random(f"{seed}/mmeb/{spec.name}")
    recipe = RECIPES[spec.recipe]
    ctx = Context(rng, Painter(image_size, f"{seed}/mmeb/{spec.name}", per_scene=True), spec.split)
    scenes = scenes_in(spec.split)
    labels = recipe.task in (Task.CLASSIFICATION, Task.VQA)
    if not labels and num_candidates > len(scenes):
        raise ValueError(f"subset {spec.name}: {num_candidates} candidates per query asked, but split "
                         f"{spec.split!r} has only {len(scenes)} scenes")
    pool = rng.sample(scenes, min(len(scenes), max(num_queries, num_candidates)))
    stream = itertools.cycle(pool)
    queries = []
    for _ in range(num_queries):
        episode = draw_episode(recipe, ctx, stream, "en", spec.attribute)
        gold = episode.scene
        if labels:  # the whole label set of the asked attribute
            others = variants(gold, episode.attributes[0])
            shown: tuple[Scene, ...] = (episode.query_scene,)
        else:
            others = rng.sample([s for s in pool if s != gold], num_candidates - 1)
            shown = (episode.query_scene, gold, *others)
        candidates = [episode.target(s) for s in [gold, *others]]
        queries.append(EvalQuery(episode.query, candidates, shown))
    return EvalSubset(spec, queries)


def build_mmeb(seed: int, num_queries: int, num_candidates: int, image_size: int = 64) -> list[EvalSubset]:
    return [build_subset(spec, seed, num_queries, num_candidates, image_size) for spec in SUBSETS]


def mmeb_text(side: Side) -> str:
    """A side as MMEB writes it (the published rule)."""
    return published.render(side.instruction, side.text, side.image is not None)


def write_subset(root: Path, subset: EvalSubset) -> None:
    """Write one subset's parquet file and its images (each distinct image once)."""
    name = subset.spec.name
    paths: dict[bytes, str] = {}

    def path_of(side: Side) -> str:
        if side.image is None:
            return ""
        if side.image not in paths:
            path = f"eval_images/{name}/{len(paths):05d}.{image_extension(side.image)}"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(side.image)
            paths[side.image] = path
        return paths[side.image]

    rows = [
        {
            "qry_text": mmeb_text(q.query),
            "qry_img_path": path_of(q.query),
            "tgt_text": [mmeb_text(c) for c in q.candidates],
            "tgt_img_path": [path_of(c) for c in q.candidates],
        }
        for q in subset.queries
    ]
    (root / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / name / PARQUET)


def registry(subsets: list[EvalSubset]) -> dict[str, dict]:
    """What the evaluator needs beyond the parquet files: how to group and report each subset."""
    return {
        s.spec.name: {
            "meta_task": s.spec.meta_task,
            "split": s.spec.distribution,
            "instruction": s.queries[0].query.instruction,
            "modality": str(RECIPES[s.spec.recipe].modality),
            "num_queries": len(s.queries),
        }
        for s in subsets
    }


def write_mmeb(root: Path, subsets: list[EvalSubset]) -> None:
    for subset in subsets:
        write_subset(root, subset)
    (root / REGISTRY).write_text(json.dumps(registry(subsets), indent=2) + "\n", encoding="utf-8")
