"""Evaluate a model on MMEB, MMEB-V2 and/or XTD and write scores.json, results.md and per-query predictions.

    python -m mme5.eval --model runs/demo/checkpoints/last.ckpt --data runs/demo/world --out runs/demo/eval
    python -m mme5.eval --model meta-llama-folder --benchmark mmeb --mmeb MMEB-eval --out eval/zero-shot \\
        --device cuda --dtype bfloat16 --batch-size 32
    python -m mme5.eval --model ckpt --benchmark mmeb-v2 --mmeb-v2 MMEB-V2 --modalities visdoc --out eval/v2
    torchrun --nproc-per-node 8 -m mme5.eval ...      (each GPU encodes a share; rank 0 writes)

Data: `--data DIR` is the parent of `mmeb/`, `xtd/` and, when present, `mmeb-v2/` (as the demo world
writes); `--mmeb DIR`, `--xtd DIR` and `--mmeb-v2 DIR` name a folder directly and win over `--data`.
MMEB-V2 runs from `--mmeb-v2 DIR` (what `mme5.data.fetch --dataset mmeb-v2` writes, or a folder with its own
registry, `sets.json`); `--benchmark all` includes it when `--mmeb-v2` is given or found under `--data`.
Embeddings are cached under `<out>/cache/<model fingerprint>/` (or --cache), so a rerun or an interrupted
run does not recompute.

`--out` belongs to one evaluation (`mme5.files.claim_folder`; its identity: `identity` below): a rerun of
the same model, data and settings resumes from the cache; another model or other settings are refused
before the model loads (`--overwrite` replaces the folder's content once the new scores are complete); a
second process on the same `--out` is refused at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mme5.backbones import DTYPES
from mme5.backbones.base import video_families
from mme5.backbones.presets import PRESETS
from mme5.checkpoint import checkpoint_backbone, load_encoder, trained_dims
from mme5.distributed import from_all_ranks, rank_and_world
from mme5.eval.encode import EmbeddingCache
from mme5.eval.metrics import TIE_RULES
from mme5.eval.mmeb import MMEB
from mme5.eval.mmeb_v2.benchmark import MMEBV2, input_record
from mme5.eval.mmeb_v2.registry import MODALITIES
from mme5.eval.registry import mean_over_sets
from mme5.eval.report import write_outputs
from mme5.eval.run import Benchmark, Summary, evaluate
from mme5.eval.xtd import IMAGE_INSTRUCTION, TEXT_INSTRUCTION, XTD, paper_mean_label
from mme5.files import OutputFolder, OutputFolderError, claim_folder, path_fingerprint
from mme5.hub import is_hub_id
from mme5.settings import command_parser
from mme5.terminate import sigterm_as_exit

COMMAND = "mme5.eval"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser(prog="python -m mme5.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="EmbeddingModule .ckpt, or a backbone folder")
    parser.add_argument("--backbone", help="backbone folder of a .ckpt whose recorded backbone has moved")
    parser.add_argument("--benchmark", choices=["mmeb", "mmeb-v2", "xtd", "all"], default="all",
                        help="default: all (MMEB and XTD, and MMEB-V2 when --mmeb-v2 is given)")
    parser.add_argument("--data", type=Path, help="parent folder of mmeb/ and xtd/ (and mmeb-v2/, when "
                        "present: then --benchmark all includes MMEB-V2)")
    parser.add_argument("--mmeb", type=Path, help="MMEB-eval folder (default: DATA/mmeb)")
    parser.add_argument("--xtd", type=Path, help="XTD folder (default: DATA/xtd)")
    parser.add_argument("--mmeb-v2", type=Path, help="MMEB-V2 folder, as `mme5.data.fetch --dataset mmeb-v2` "
                        "writes it (default: DATA/mmeb-v2 when present)")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES,
                        help="MMEB-V2 modalities (default: all three)")
    parser.add_argument("--mmeb-images", type=Path, nargs="+", help="image folders or .zip files "
                        "(default: the MMEB folder and its .zip files)")
    parser.add_argument("--xtd-images", type=Path, nargs="+", help="image folders or .zip files "
                        "(default: the XTD folder and its .zip files)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder; a rerun with the same model, data and settings resumes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (another model's or other settings' scores, or this "
                             "run's own, recomputed); the old content stays until the new one is complete")
    parser.add_argument("--subsets", nargs="+", help="MMEB (or, with --benchmark mmeb-v2, MMEB-V2) data sets "
                        "(default: all of the registry; with fewer, no Overall: a mean over the sets "
                        "evaluated)")
    parser.add_argument("--languages", nargs="+", help="XTD languages (default: all present)")
    parser.add_argument("--max-queries", type=int, help="first N queries of each data set")
    parser.add_argument("--batch-size", type=int, default=16, help="items per forward (default: 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: the checkpoint's)")
    parser.add_argument("--max-length", type=int,
                        help="text tokens per item (default: the model's recorded input format's)")
    parser.add_argument("--num-frames", type=int,
                        help="frames kept of each video (default: the model's recorded input format, else 8; "
                        "Qwen3-VL-Embedding and WeMM report video with 64)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="input format of a released embedder (default: the model's recorded one, else "
                             "what its files say, else mme5)")
    parser.add_argument("--ties", choices=TIE_RULES, default="pessimistic",
                        help="a candidate scoring exactly as the gold: 'pessimistic' ranks it above the gold "
                             "(default); 'reference' breaks it as the reference code does: MMEB's argmax "
                             "lets the first in list order win (gold first: a tie is a hit), XTD's "
                             "np.argsort(scores)[-k:] leaves it to numpy's sort order")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle a .ckpt holding more than tensors and plain types (runs code from the "
                             "file; the project's own checkpoints never need it)")
    parser.add_argument("--dim", type=int, help="rank by the first DIM dimensions of the embeddings, "
                        "L2-normalised again (a Matryoshka model's smaller size; default: all)")
    parser.add_argument("--top-k", type=int, default=10, help="candidates kept per prediction (default: 10)")
    parser.add_argument("--cache", type=Path, help="embedding cache folder (default: OUT/cache)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every embedding")
    parser.add_argument("--text-instruction", default=TEXT_INSTRUCTION,
                        help="XTD caption instruction (default: %(default)r)")
    parser.add_argument("--image-instruction", default=IMAGE_INSTRUCTION,
                        help="XTD image instruction (default: %(default)r)")
    args = parser.parse_args(argv)
    for name in ("max_queries", "batch_size", "top_k", "max_length", "dim", "num_frames"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not Path(args.model).exists() and not is_hub_id(args.model):
        parser.error(f"--model {args.model}: no such file or folder (nor a hub id namespace/name)")
    if args.mmeb_v2 is None and args.data is not None and (args.data / "mmeb-v2").is_dir():
        args.mmeb_v2 = args.data / "mmeb-v2"  # the demo world's V2 sets, with their own registry
    if args.benchmark == "mmeb-v2" and args.mmeb_v2 is None:
        parser.error("--benchmark mmeb-v2 needs --mmeb-v2 (or --data holding mmeb-v2/)")
    if args.modalities and not (args.mmeb_v2 and args.benchmark in ("mmeb-v2", "all")):
        parser.error("--modalities selects MMEB-V2 sets: it needs --mmeb-v2 and --benchmark mmeb-v2 or all")
    for name in ("mmeb", "xtd"):
        if args.benchmark in (name, "all") and getattr(args, name) is None:
            if args.data is None:
                parser.error(f"--benchmark {args.benchmark} needs --data or --{name}")
            setattr(args, name, args.data / name)
    return args


def benchmarks(args: argparse.Namespace) -> list[Benchmark]:
    out: list[Benchmark] = []
    if args.benchmark in ("mmeb", "all"):
        out.append(MMEB(args.mmeb, args.subsets, args.mmeb_images, args.max_queries))
    if args.benchmark == "mmeb-v2" or args.benchmark == "all" and args.mmeb_v2:
        # --subsets names MMEB's sets under "all", MMEB-V2's under "mmeb-v2"
        subsets = args.subsets if args.benchmark == "mmeb-v2" else None
        out.append(MMEBV2(args.mmeb_v2, subsets, args.modalities, args.max_queries))
    if args.benchmark in ("xtd", "all"):
        out.append(XTD(args.xtd, args.languages, args.xtd_images, args.max_queries, args.text_instruction,
                       args.image_instruction))
    return out


def local_reference(model: str | Path) -> str:
    """A model as the identity names it: a local path resolved, a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def identity(args: argparse.Namespace, chosen: list[Benchmark]) -> dict[str, Any]:
    """What `--out` holds the scores of: the model's files, the data evaluated and the settings that change
    scores or predictions. Batch size, device and the cache change neither (the cache is keyed by model)."""
    keys: dict[str, Any] = {
        "model": local_reference(args.model), "model_files": path_fingerprint(args.model),
        "backbone": args.backbone and local_reference(args.backbone),
        "backbone_files": args.backbone and path_fingerprint(args.backbone),
        **{name: getattr(args, name) for name in ("max_queries", "dtype", "max_length", "ties", "top_k")},
        **({"preset": args.preset} if args.preset else {}),  # absent when not given: older folders agree
        **({"dim": args.dim} if args.dim else {}),
        **({"num_frames": args.num_frames} if args.num_frames else {})}
    for benchmark in chosen:
        keys |= {f"{benchmark.name}.{key}": value for key, value in benchmark.identity().items()}
        images = {"mmeb": args.mmeb_images, "xtd": args.xtd_images}.get(benchmark.name)
        keys[f"{benchmark.name}.images"] = images and [str(Path(p).resolve()) for p in images]
    if any(benchmark.name == "xtd" for benchmark in chosen):
        keys["xtd.instructions"] = [args.text_instruction, args.image_instruction]
    return keys


def claim_out(args: argparse.Namespace, chosen: list[Benchmark]) -> tuple[OutputFolder | None, Path]:
    """Rank 0 claims `--out`; every rank learns the folder to write into (a replacement's sibling under
    --overwrite). A refusal ends every rank with rank 0's message (exit 2)."""
    folder, problem = None, None
    if rank_and_world()[0] == 0:
        try:
            read = (args.model, args.backbone or checkpoint_backbone(args.model), *(b.root for b in chosen),
                    *(args.mmeb_images or []), *(args.xtd_images or []))
            inputs = [p for p in read if p and Path(p).exists()]  # never replaced, even with --overwrite
            folder = claim_folder(args.out, COMMAND, identity(args, chosen), overwrite=args.overwrite,
                                  ways_out="pass --overwrite to replace it, or choose another --out",
                                  inputs=inputs)
        except OutputFolderError as error:
            problem = str(error)
    shared = [folder.work if folder else None, problem]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    if shared[1]:
        fail(shared[1])
    return folder, shared[0]


def fail(message: str, any_rank: bool = False) -> None:
    """End the command on bad input: `error: <message>` on stderr (once, from rank 0; `any_rank`: from the
    rank that met it, e.g. an unreadable image in its share of the batches), exit status 2, no traceback."""
    rank, world = rank_and_world()
    if rank == 0 or any_rank:
        print(f"error: {message}" if world == 1 else f"error (rank {rank}): {message}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


def headline(name: str, summary: Summary) -> str:
    """The line printed at the end of a run: MMEB's Overall (or a partial run's labelled mean), MMEB-V2's
    modality means and All (or its labelled mean), XTD's R@10 means."""
    if name in ("mmeb", "mmeb-v2"):
        label, mean = mean_over_sets(summary.scores)
        modalities = [f"{modality} {summary.scores[modality]:.1f}" for modality in MODALITIES
                      if summary.scores.get(modality) is not None] if name == "mmeb-v2" else []
        return ", ".join([*modalities, f"{label} {mean:.1f}"])
    paper, every = summary.scalars.get("mean_r10"), summary.scalars.get("mean_all_r10")
    means = [f"{paper_mean_label(summary.scores)} R@10 {paper:.1f}"] if paper is not None else []
    return ", ".join([*means, f"mean ({len(summary.scores['languages'])} languages) R@10 {every:.1f}"])


def init_distributed(device: str) -> str:
    """Join the process group that torchrun describes (if any); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def without_video(benchmark: MMEBV2, args: argparse.Namespace) -> MMEBV2:
    """The MMEB-V2 sets a model that reads no video can take: its image and page sets, said on stderr (their
    mean is then a partial one, labelled so). Video sets named on purpose (`--modalities`, `--subsets`) are
    refused instead, naming the families that read video."""
    video = [s.name for s in benchmark.registry if s.modality == "video"]
    if not video:
        return benchmark
    if args.modalities or (args.subsets and args.benchmark == "mmeb-v2"):
        fail(f"{args.model} reads no video (families that do: {', '.join(video_families())}); leave out the "
             f"video set(s) {video[:5]}{' ...' if len(video) > 5 else ''}")
    print(f"note: {args.model} reads no video: MMEB-V2's {len(video)} video set(s) are left out; the image "
          "and page sets are scored (a partial mean)", file=sys.stderr)
    return MMEBV2(benchmark.root, None, [m for m in MODALITIES if m != "video"], args.max_queries)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        chosen = benchmarks(args)  # reads registries and finds files: fails before the model loads
    except (OSError, ValueError) as error:  # a misspelled set or language, a missing or unreadable file
        fail(str(error))
    with sigterm_as_exit():  # a kill keeps what was encoded (`mme5.terminate`)
        run(args, chosen)


def run(args: argparse.Namespace, chosen: list[Benchmark]) -> None:
    """Score the model on the chosen benchmarks into `--out` (every rank; rank 0 writes)."""
    device = init_distributed(args.device)
    folder, work = claim_out(args, chosen)  # before the model loads: a refusal costs nothing
    try:
        loaded = load_encoder(args.model, device, args.dtype, args.max_length, args.backbone,
                              trust_checkpoint=args.trust_checkpoint, preset=args.preset,
                              num_frames=args.num_frames)
        if args.dim and args.dim > loaded.encoder.dim:
            fail(f"--dim {args.dim}: {args.model} embeds in {loaded.encoder.dim} dimensions")
        chosen = [without_video(b, args) if isinstance(b, MMEBV2) and not loaded.encoder.adapter.reads_video
                  else b for b in chosen]
        cache = None if args.no_cache else EmbeddingCache(args.cache or work / "cache", loaded.fingerprint)
        summaries, results = {}, {}
        for benchmark in chosen:
            try:
                summaries[benchmark.name], results[benchmark.name] = evaluate(
                    benchmark, loaded.encoder.embed, batch_size=args.batch_size, cache=cache,
                    top_k=args.top_k, progress=True, ties=args.ties, dim=args.dim)
            except (OSError, ValueError) as error:  # bad data, met reading or encoding a set: the message
                fail(str(error), any_rank=True)  # names the file, row and field; what was encoded is cached
        if "mmeb-v2" in summaries:  # what the video sets were fed: recorded beside their scores
            summaries["mmeb-v2"].scores |= input_record(loaded.encoder.adapter.input_format)
        # Every rank's items cut to max_length (embeddings read from the cache were counted when computed).
        truncated = sum(from_all_ranks(loaded.encoder.adapter.truncated_count()))
        if folder is not None:  # rank 0
            # "files": what `mme5.export --scores` compares with the checkpoint it exports
            model = loaded.description | {"fingerprint": loaded.fingerprint,
                                          "files": folder.identity["model_files"],
                                          "dim": args.dim or loaded.encoder.dim,
                                          "matryoshka_dims": trained_dims(loaded.recipe)}
            write_outputs(work, model, summaries, results, truncated)
            folder.complete()
            for name, summary in summaries.items():
                print(f"{name}: {headline(name, summary)}")
            print(f"wrote {args.out / 'scores.json'}, {args.out / 'results.md'} and "
                  f"{args.out / 'predictions'}/")
    finally:
        if folder is not None:
            folder.release()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
