"""Retrieval throughput of hard-negative mining (`mme5.retrieval.nearest`, shared with the synthesis image
index): queries ranked per second against 100K candidates on CPU, and the process's peak memory.

    python benchmarks/mining.py [--candidates 100000] [--queries 4096] [--dim 1024] [--k 50] [--chunk 256]

Embeddings are random unit vectors (the model's encoding time is the evaluation benchmark's business); the
figures are the median of `--repeats` runs. Memory: peak resident set size of the process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from mme5.retrieval import nearest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=50, help="the rank band's upper end")
    parser.add_argument("--chunk", type=int, default=256, help="queries scored at a time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)

    def unit(rows: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(rows, args.dim, generator=generator), dim=-1)

    candidates, queries = unit(args.candidates), unit(args.queries)
    excluded = [[i] for i in range(args.queries)]  # each query's own positive
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        nearest(queries, candidates, args.k, excluded, args.chunk)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = ["candidates", "queries", "dim", "k", "chunk", "threads", f"s (median of {args.repeats})",
              "queries/s", "peak RSS MiB"]
    row = [args.candidates, args.queries, args.dim, args.k, args.chunk, torch.get_num_threads(),
           f"{median:.2f}", f"{args.queries / median:.0f}", f"{peak_mib:.0f}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
