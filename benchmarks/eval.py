"""Evaluation throughput on the demo world: distinct items encoded vs. the naive count, and items/s.

    python benchmarks/eval.py                          # builds a world and a tiny "demo" Mllama in a temp dir
    python benchmarks/eval.py --world runs/demo/world --backbone runs/demo/backbone --batch-size 32

Naive count: every query and every listed candidate encoded separately (queries + Σ list lengths over all
rankings of a set). Encoded: the distinct (instruction, text, image) items of the set, each encoded once.
Items/s covers image decoding, batching and the forward passes (not the ranking).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mme5.backbones.tiny import build_tiny
from mme5.checkpoint import load_encoder
from mme5.demo.world import WorldConfig, build_world
from mme5.eval.encode import encode
from mme5.eval.mmeb import MMEB
from mme5.eval.retrieval import RetrievalSet
from mme5.eval.xtd import XTD


def naive_count(retrieval_set: RetrievalSet) -> int:
    return sum(len(r.queries) + int((r.candidates >= 0).sum()) for r in retrieval_set.rankings.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, help="a demo world (default: build one)")
    parser.add_argument("--backbone", type=Path, help="a backbone folder (default: build a tiny Mllama)")
    parser.add_argument("--preset", default="demo", help="tiny preset when building the backbone")
    parser.add_argument("--eval-queries", type=int, default=50, help="queries per subset when building")
    parser.add_argument("--xtd-images", type=int, default=100, help="XTD images when building")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="mme5-eval-bench-"))
    world = args.world or scratch / "world"
    if args.world is None:
        build_world(world, WorldConfig(train_samples=0, eval_queries=args.eval_queries,
                                       xtd_images=args.xtd_images), progress=False)
    backbone = args.backbone or build_tiny("mllama", scratch / "backbone", seed=0, preset=args.preset)
    embed = load_encoder(backbone).encoder.embed

    print(f"world {world}, backbone {backbone}, batch size {args.batch_size}\n")
    print("| set | rankings | queries | naive items | encoded | saved | seconds | items/s |")
    print("|---|---|---|---|---|---|---|---|")
    totals = [0, 0, 0.0]
    for benchmark in (MMEB(world / "mmeb"), XTD(world / "xtd")):
        for retrieval_set in benchmark.sets():
            started = time.perf_counter()
            encode(retrieval_set.items, embed, batch_size=args.batch_size)
            seconds = time.perf_counter() - started
            naive, encoded = naive_count(retrieval_set), len(retrieval_set.items)
            queries = sum(len(r.queries) for r in retrieval_set.rankings.values())
            totals = [totals[0] + naive, totals[1] + encoded, totals[2] + seconds]
            name = f"{benchmark.name}/{retrieval_set.name}"
            row(name, len(retrieval_set.rankings), queries, naive, encoded, seconds)
    row("**total**", "", "", *totals)


def row(name: str, rankings: int | str, queries: int | str, naive: int, encoded: int, seconds: float) -> None:
    cells = [name, rankings, queries, naive, encoded, f"{naive / encoded:.1f}x", f"{seconds:.2f}",
             f"{encoded / seconds:.0f}"]
    print("| " + " | ".join(map(str, cells)) + " |")

if __name__ == "__main__":
    main()
