"""Training-data throughput: streaming shards + decoding images + processor collation, by worker count.

    python benchmarks/data_loader.py          # builds a small world and a tiny Mllama in a temp dir
    python benchmarks/data_loader.py --world runs/demo/world --backbone runs/demo/backbone

Runs the real `ShardDataModule` dataloader (mixing, shuffle buffer, per-worker shard split, collation into
gradient-cache chunks) and prints samples/s per worker count: the median over `--repeats` timed windows of
`--batches` batches each, after warm-up batches (worker start-up and the shuffle buffer filling).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mme5.backbones.tiny import build_tiny
from mme5.data.datamodule import ShardDataModule
from mme5.demo.world import WorldConfig, build_world


def samples_per_second(world: Path, backbone: Path, workers: int, args: argparse.Namespace) -> list[float]:
    data = ShardDataModule([{"path": str(world / "train")}], str(backbone), batch_size=args.batch_size,
                           num_negatives=args.negatives, chunk_size=args.chunk_size, num_workers=workers,
                           shuffle_buffer=args.shuffle_buffer)
    batches = iter(data.train_dataloader())
    for _ in range(args.warmup):
        next(batches)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        samples = sum(next(batches).size for _ in range(args.batches))
        rates.append(samples / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, help="a demo world (default: build a small one)")
    parser.add_argument("--backbone", type=Path, help="a backbone folder (default: build a tiny Mllama)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        world = args.world or Path(tmp) / "world"
        if args.world is None:
            build_world(world, WorldConfig(train_samples=3000, eval_queries=5, xtd_images=10), progress=False)
        backbone = args.backbone or build_tiny("mllama", Path(tmp) / "backbone", preset="demo",
                                               corpus=world / "corpus.txt")
        print(f"batch {args.batch_size} samples, {args.negatives} hard negatives, "
              f"chunks of {args.chunk_size}; median of {args.repeats} × {args.batches} batches "
              f"after {args.warmup} warm-up batches")
        print(f"{'workers':>8} | {'samples/s':>10} | {'items/s':>8} | runs")
        for workers in args.workers:
            rates = samples_per_second(world, backbone, workers, args)
            median = statistics.median(rates)
            items = median * (2 + args.negatives)  # upper bound: query + positive + K negatives a sample
            print(f"{workers:>8} | {median:>10.1f} | {items:>8.0f} | {', '.join(f'{r:.0f}' for r in rates)}")


if __name__ == "__main__":
    main()
