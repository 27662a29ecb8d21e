"""The demo world: a procedural, multilingual image+text world, the project's embedded default data.

    python -m mme5.demo --out data/demo --seed 0 [--train-samples N --eval-queries N ...]

writes, under --out:
    train/       training shards (mme5.data.shards): 4 tasks, 11 modality combinations (images, clips of
                 moving scenes, document pages), 11 languages, up to --max-negatives hard negatives that
                 each change exactly one scene attribute
    mmeb/        an evaluation set in the MMEB-eval layout, with subsets.json (see mme5.demo.mmeb)
    mmeb-v2/     image, video and visual-document sets in MMEB-V2's layouts, with sets.json
                 (see mme5.demo.mmeb_v2)
    xtd/         multilingual text→image retrieval in the XTD10 layout (see mme5.demo.xtd)
    corpus.txt   every distinct text of the world, one a line (for training a tiny tokenizer)
    world.json   seed, sizes, languages and counts
The same seed and sizes give byte-identical files. Training and evaluation scenes are disjoint for every
seed (mme5.demo.scenes). `mmeb/` and `xtd/` are rewritten from scratch; `train/` is replaced. The command
claims --out (mme5.files.claim_folder): the same settings again say the world is there (a world whose build
was stopped is built again), other settings are refused unless --overwrite (built beside, swapped in).
The scenes are simple on purpose (big shapes, strong colours, 64 px): a ~1M-parameter model trained for a
few minutes on CPU must beat chance clearly.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tqdm import tqdm

from mme5.data.schema import Side
from mme5.data.shards import ShardWriter, read_manifest
from mme5.demo.language import DEFAULT_LANGUAGES, LANGUAGES
from mme5.demo.mmeb import SUBSETS, build_subset, write_mmeb
from mme5.demo.mmeb_v2 import V2Config, registry, write_mmeb_v2
from mme5.demo.scenes import VALUES
from mme5.demo.tasks import generate_training
from mme5.demo.xtd import build_xtd, write_xtd
from mme5.files import OutputFolderError, claim_folder
from mme5.settings import command_parser, utf8_path

FORMAT = "mme5-demo-world/1"
COMMAND = "mme5.demo"


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    train_samples: int = 10000
    """Training samples, cycling over the (task, modality) recipes of mme5.demo.tasks."""
    max_negatives: int = 3
    """Hard negatives per training sample (a fifth of the samples get fewer, to exercise masking)."""
    eval_queries: int = 200
    """Queries per MMEB subset."""
    eval_candidates: int = 50
    """Candidates per query in retrieval and grounding subsets (classification and VQA use the label set)."""
    xtd_images: int = 150
    v2_queries: int = 40
    """Queries per MMEB-V2 set (mme5.demo.mmeb_v2)."""
    image_size: int = 64
    video_frames: int = 4
    """Frames of a clip (a moving scene: its objects travel into the half their position names)."""
    page_size: int = 128
    """Side of a document page in pixels."""
    languages: tuple[str, ...] = DEFAULT_LANGUAGES

    def __post_init__(self) -> None:
        unknown = [code for code in self.languages if code not in LANGUAGES]
        if unknown or not self.languages:
            raise ValueError(f"languages {list(self.languages)}: unknown {unknown}; "
                             f"known: {', '.join(LANGUAGES)}")
        minimum = {"train_samples": 0, "max_negatives": 0, "eval_queries": 1, "eval_candidates": 2,
                   "xtd_images": 1, "v2_queries": 1, "image_size": 16, "video_frames": 2, "page_size": 32}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, found {getattr(self, name)}")


def _texts(sides: list[Side]) -> set[str]:
    return {part for side in sides for part in (side.instruction, side.text) if part}


def build_world(out: str | Path, config: WorldConfig = WorldConfig(), progress: bool = True) -> dict:
    """Write the whole world under `out`; returns what world.json holds."""
    out = Path(out)
    texts: set[str] = set()

    languages = list(config.languages)
    examples = generate_training(config.seed, config.train_samples, languages, config.max_negatives,
                                 config.image_size, config.video_frames, config.page_size)
    with ShardWriter(out / "train", extra={"world": FORMAT, "seed": config.seed}) as writer:
        progress_bar = tqdm(examples, desc="train", total=config.train_samples, disable=not progress)
        for i, example in enumerate(progress_bar):
            writer.write(example.sample, cursor=i + 1)
            texts |= _texts([side for _, side in example.sample.sides])
    manifest = read_manifest(out / "train")

    shutil.rmtree(out / "mmeb", ignore_errors=True)
    subsets = [build_subset(spec, config.seed, config.eval_queries, config.eval_candidates, config.image_size)
               for spec in tqdm(SUBSETS, desc="mmeb", disable=not progress)]
    write_mmeb(out / "mmeb", subsets)
    for subset in subsets:
        texts |= _texts([side for q in subset.queries for side in [q.query, *q.candidates]])

    shutil.rmtree(out / "mmeb-v2", ignore_errors=True)
    v2 = write_mmeb_v2(out / "mmeb-v2", V2Config(config.seed, config.v2_queries, config.eval_candidates,
                                                  config.image_size, config.video_frames, config.page_size))
    texts |= {part for s in registry() for part in (s.query_instruction, s.target_instruction) if part}

    shutil.rmtree(out / "xtd", ignore_errors=True)
    captions = write_xtd(out / "xtd", build_xtd(config.seed, config.xtd_images, config.image_size), languages)
    texts |= {line for lines in captions.values() for line in lines}

    (out / "corpus.txt").write_text("".join(f"{t}\n" for t in sorted(texts)), encoding="utf-8", newline="\n")
    sizes = {name: value for name, value in asdict(config).items() if name not in ("seed", "languages")}
    world = {
        "format": FORMAT,
        "seed": config.seed,
        "sizes": sizes,
        "languages": languages,
        "attributes": {name: list(values) for name, values in VALUES.items()},
        "counts": {
            "train": manifest["counts"] | {"samples": manifest["num_samples"]},
            "mmeb": {s.spec.name: len(s.queries) for s in subsets},
            "mmeb_v2": v2,
            "xtd_images": config.xtd_images,
            "corpus_texts": len(texts),
        },
    }
    (out / "world.json").write_text(json.dumps(world, ensure_ascii=False, indent=2) + "\n", encoding="utf-8",
                                    newline="\n")
    return world


def _summary(world: dict, seconds: float) -> str:
    counts = world["counts"]
    lines = [f"demo world (seed {world['seed']}) written in {seconds:.1f} s",
             f"  train: {counts['train']['samples']} samples"]
    lines += [f"    {key}: " + ", ".join(f"{k} {v}" for k, v in counts["train"][key].items())
              for key in ("task", "modality", "language")]
    lines.append(f"  mmeb: {len(counts['mmeb'])} subsets, {sum(counts['mmeb'].values())} queries")
    lines.append(f"  mmeb-v2: {len(counts['mmeb_v2'])} sets, {sum(counts['mmeb_v2'].values())} queries")
    lines.append(f"  xtd: {counts['xtd_images']} images, captions in {', '.join(world['languages'])}")
    lines.append(f"  corpus: {counts['corpus_texts']} distinct texts")
    return "\n".join(lines)


def world_identity(config: WorldConfig) -> dict:
    """What defines a demo world folder: the format and every setting (the same give byte-identical files)."""
    return {"format": FORMAT, **asdict(config)}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(prog="python -m mme5.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=utf8_path, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a world of other settings in --out")
    for field in fields(WorldConfig):
        if field.name != "languages":
            flag = "--" + field.name.replace("_", "-")
            parser.add_argument(flag, type=int, default=field.default, help=f"default {field.default}")
    parser.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES),
                        help=f"comma-separated codes among {', '.join(LANGUAGES)}")
    args = vars(parser.parse_args(argv))
    out, overwrite = args.pop("out"), args.pop("overwrite")
    args["languages"] = tuple(code.strip() for code in args["languages"].split(",") if code.strip())
    try:
        config = WorldConfig(**args)
    except ValueError as error:
        parser.error(str(error))
    try:
        with claim_folder(out, COMMAND, world_identity(config), overwrite=overwrite,
                          ways_out="pass --overwrite to build it with these settings, or another --out"
                          ) as folder:
            if folder.was_complete:
                folder.complete()
                print(f"{out} already holds the demo world of these settings (seed {config.seed})")
                return 0
            start = time.perf_counter()
            world = build_world(folder.work, config)
            folder.complete()
    except OutputFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_summary(world, time.perf_counter() - start))
    return 0
