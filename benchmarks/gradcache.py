"""Gradient cache vs. plain step: peak memory and step time by batch size, for the demo backbone on CPU.

    python benchmarks/gradcache.py                          # builds a world and the tiny demo Mllama
    python benchmarks/gradcache.py --world runs/demo/world --backbone runs/demo/backbone --batches 16 64 256

Two memory figures per (mode, batch size), each configuration in a fresh process:
- activations: the peak of the bytes that autograd holds for the backward (saved tensors, counted once
  per storage while alive) — exact and repeatable, and what the gradient cache bounds;
- RSS: the rise of the process's peak resident memory above its level just before the first step (model
  and collated batch already loaded) — the real footprint, noisier.
The batch repeats the first `--chunk` samples of the world, so all chunks are alike at every batch size.
Step time is the median of `--steps` steps after one warm-up step. Modes: `plain` encodes each group
(queries, positives, negatives) in one forward; `chunked` is the plain step fed the same chunks as the
cache (what the training module's plain path does), so cached/chunked isolates the cache's extra forward;
`cached` is the gradient cache. Targets (issue): cached peak flat in batch size (≤ 1.25× from 16 to 256)
and cached step ≤ 1.5× the plain step at the same batch size (theory: about 4/3).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

from mme5.backbones import load_backbone
from mme5.backbones.tiny import build_tiny
from mme5.contrastive import contrastive_step
from mme5.data.collate import ContrastiveCollator
from mme5.data.shards import read_samples, shard_urls
from mme5.data.stream import StreamBatch
from mme5.demo.world import WorldConfig, build_world
from mme5.encoder import Encoder
from mme5.gradcache import GradCache
from mme5.losses import InfoNCE


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for the backward (each storage counted once)."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.total = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> Held:
        key = tensor.untyped_storage().data_ptr()
        entry = self.live.setdefault(key, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.total += entry[1]
            self.peak = max(self.peak, self.total)
        entry[0] += 1
        held = Held(tensor)
        weakref.finalize(held, self.release, key)
        return held

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.total -= entry[1]
            del self.live[key]

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor)


class Held:
    """A saved tensor's box: autograd drops it with the graph, which releases it from the meter."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


MODES = ("plain", "chunked", "cached")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure(world: str, backbone: str, batch_size: int, mode: str, chunk: int, negatives: int,
            steps: int) -> dict:
    """One configuration, in this process: peak memory rise and median step time."""
    torch.manual_seed(0)
    adapter = load_backbone(backbone)
    encoder = Encoder(adapter).train()
    loss_fn = InfoNCE(temperature=0.05, gather=False)
    chunk_size = batch_size if mode == "plain" else chunk
    # The same 16 samples repeated: every chunk then has the same content and padding at every batch size,
    # so memory and time differences come from the batch size and the mode, not from longer texts.
    distinct = list(itertools.islice(read_samples(shard_urls(Path(world) / "train")), chunk))
    samples = [distinct[i % len(distinct)] for i in range(batch_size)]
    batch = ContrastiveCollator(adapter.collate, negatives, chunk_size)(StreamBatch(samples, 0, {}))
    cache = GradCache(chunk) if mode == "cached" else None

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        contrastive_step(encoder.encode_chunk, batch.query, batch.positive, batch.negatives,
                         batch.negative_mask, loss_fn, cache)

    before = rss_bytes()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    meter = SavedTensorMeter()
    with meter.hooks():
        step()
    return {"activations_mb": meter.peak / 2**20, "rss_mb": max(peak - before, 0) / 2**20,
            "step_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", help="a demo world (default: build one)")
    parser.add_argument("--backbone", help="a backbone folder (default: build the tiny demo Mllama)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = measure(args.world, args.backbone, int(args.child[1]), args.child[0], args.chunk,
                         args.negatives, args.steps)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        world = args.world or str(Path(tmp) / "world")
        if args.world is None:
            build_world(Path(world), WorldConfig(train_samples=max(args.batches) + 50, eval_queries=2,
                                                 xtd_images=2), progress=False)
        backbone = args.backbone or str(build_tiny("mllama", Path(tmp) / "backbone", preset="demo",
                                                   corpus=Path(world) / "corpus.txt"))
        results = {}
        for batch_size in args.batches:
            for mode in MODES:
                command = [sys.executable, __file__, "--world", world, "--backbone", backbone,
                           "--chunk", str(args.chunk), "--negatives", str(args.negatives),
                           "--steps", str(args.steps), "--child", mode, str(batch_size)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[mode, batch_size] = json.loads(output.strip().splitlines()[-1])

    print(f"demo backbone, chunk {args.chunk}, {args.negatives} hard negatives a sample; "
          f"time = median of {args.steps} steps")
    header = ["batch", "plain act MB", "cached act MB", "plain RSS MB", "cached RSS MB", "plain s",
              "chunked s", "cached s", "cached/plain", "cached/chunked"]
    print(" | ".join(header))
    for batch_size in args.batches:
        plain, chunked, cached = (results[mode, batch_size] for mode in MODES)
        row = [f"{batch_size}", f"{plain['activations_mb']:.1f}", f"{cached['activations_mb']:.1f}",
               f"{plain['rss_mb']:.1f}", f"{cached['rss_mb']:.1f}", f"{plain['step_s']:.3f}",
               f"{chunked['step_s']:.3f}", f"{cached['step_s']:.3f}",
               f"{cached['step_s'] / plain['step_s']:.2f}x", f"{cached['step_s'] / chunked['step_s']:.2f}x"]
        print(" | ".join(value.rjust(len(name)) for value, name in zip(row, header, strict=True)))
    small, large = results["cached", args.batches[0]], results["cached", args.batches[-1]]
    for key, label in (("activations_mb", "activations"), ("rss_mb", "RSS rise")):
        ratio = large[key] / max(small[key], 1e-9)
        print(f"cached peak {label}, batch {args.batches[-1]} vs {args.batches[0]}: {ratio:.2f}x "
              "(target <= 1.25x)")


if __name__ == "__main__":
    main()
