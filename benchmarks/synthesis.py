"""Synthesis pipeline throughput by concurrency, and its bookkeeping under injected faults.

    python benchmarks/synthesis.py
    python benchmarks/synthesis.py --latency 0.2 --samples 16 128 512 --concurrency 1 8 64 --repeats 3

Runs the real pipeline (`mme5.synthesis.pipeline.run`: plan, neighbour images, async client, validation,
staging, packing into shards) against a local OpenAI-compatible chat server on 127.0.0.1 that answers
every request with a valid sample after a fixed latency (default 200 ms). Images: a small PIL-made folder
in a temp dir; embedder: a deterministic pixel-colour fake. Samples/s = written samples / wall time of the
whole `run` call (plan, embedding, calls, packing), the median over `--repeats` runs, each in a fresh
output folder and against a fresh server process. Target (issue): >= 40x the concurrency-1 rate at
concurrency 64. Also printed: CPU time of the pipeline process per sample (all its threads; ~1000 /
this is the most samples/s one core can drive) and of the server process per request, and the most TCP
connections the server saw in a run (keep-alive: about one per concurrent slot).

Part two injects faults into ~20% of the requests (429 with Retry-After 0 or 1, 500, a 200 whose body is
not JSON, a hang the client must time out, and a well-formed completion whose answer is not JSON), runs
the plan as a 2-way job-array split, and checks: written + reported failed == planned, and no sample id
twice across all shards of both parts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

# The mock server and its answer builder are test helpers: tests/chat_server.py (the scripted server) and
# tests/test_synthesis_pipeline.py (AnswerServer, which answers with a valid sample), plus the PIL image
# folder and fake embedder of tests/test_synthesis_images.py. Import them from the tests folder rather
# than copying them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chat_server import Failure  # noqa: E402
from test_synthesis_images import FakeEmbed, make_images  # noqa: E402
from test_synthesis_pipeline import AnswerServer  # noqa: E402

from mme5.data.shards import read_samples, shard_urls  # noqa: E402
from mme5.synthesis.config import SynthesisConfig  # noqa: E402
from mme5.synthesis.pipeline import run  # noqa: E402

KEY_ENV = "MME5_BENCH_SYNTH_KEY"


class BenchServer(AnswerServer):
    """AnswerServer with a listen backlog of 512 instead of socketserver's 5, so that a burst of new
    connections (64 at the start of a run) is not dropped into the kernel's 1 s SYN retransmit. The mock
    speaks HTTP/1.1 with keep-alive (tests/chat_server.py), like real servers (vLLM, nginx), so the client
    opens about one connection per concurrent slot and reuses it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._httpd.socket.listen(512)  # Linux: listen() again on a listening socket resizes the backlog


class RandomFaults:
    """Stands in for the server's `script` deque: each request draws a fault (or None) at random.

    The server pops with `script.popleft() if script else None`, so a truthy object with `popleft` works.
    """

    def __init__(self, rng: random.Random, weights: dict[str, float]):
        self.rng, self.weights, self.drawn = rng, weights, Counter()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return True

    def popleft(self) -> Failure | None:
        with self._lock:
            x, kind = self.rng.random(), None
            for name, weight in self.weights.items():
                if x < weight:
                    kind = name
                    break
                x -= weight
            self.drawn[kind or "ok"] += 1
        return {None: None,
                "429 Retry-After 0": Failure(status=429, headers={"Retry-After": "0"}),
                "429 Retry-After 1": Failure(status=429, headers={"Retry-After": "1"}),
                "500": Failure(status=500),
                "garbled body": Failure(garbled=True),
                "hang (timeout)": Failure(hang=True)}[kind]


class RandomAnswers:
    """Stands in for AnswerServer's `contents` list: a share of the answers are not JSON."""

    def __init__(self, rng: random.Random, share: float, answer: str):
        self.rng, self.share, self.answer, self.garbled = rng, share, answer, 0

    def __bool__(self) -> bool:
        return True

    def pop(self, _index: int) -> str:  # called under the server's lock
        if self.rng.random() < self.share:
            self.garbled += 1
            return '{"interpretation": {"general_desc'
        return self.answer


def _serve(conn, latency: float, faults: dict[str, float], answer_share: float, seed: int) -> None:
    """Child process: run a BenchServer until told to stop, then send back what it saw."""
    rng = random.Random(seed)
    with BenchServer(latency_s=latency) as server:
        server.script = RandomFaults(rng, faults)
        server.contents = RandomAnswers(rng, answer_share, server.content)
        conn.send(server.base_url)
        conn.recv()
        with server._lock:
            stats = {"requests": len(server.requests), "max_in_flight": server.max_in_flight,
                     "cpu_s": time.process_time(), "connections": len(server.connections),
                     "drawn": dict(server.script.drawn), "garbled_answers": server.contents.garbled}
    conn.send(stats)


class ServerProcess:
    """The mock server in its own process, so that its request handling does not share the benchmark's
    GIL (a real MLLM server runs elsewhere too). `stats` is filled in on exit."""

    def __init__(self, latency: float, faults: dict[str, float] | None = None, answer_share: float = 0.0,
                 seed: int = 0):
        self.args = (latency, faults or {}, answer_share, seed)
        self.stats: dict = {}

    def __enter__(self) -> ServerProcess:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, *self.args), daemon=True)
        self.process.start()
        self.base_url = self.conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.send("stop")
        self.stats = self.conn.recv()
        self.process.join(timeout=60)


def config(out: Path, images: Path, base_url: str, num_samples: int, concurrency: int,
           **overrides) -> SynthesisConfig:
    values = dict(out=str(out), images=str(images), num_samples=num_samples, seed=0, english_share=1.0,
                  positive_ranks=[1, 5], negative_ranks=[10, 30], progress=False,
                  client=dict(model="bench-mllm", base_url=base_url, api_key_env=KEY_ENV,
                              max_concurrency=concurrency, timeout_s=10.0, max_attempts=6,
                              backoff_base_s=0.1, backoff_max_s=1.0,
                              input_usd_per_million=2.5, output_usd_per_million=10.0))
    return SynthesisConfig(**(values | overrides))


def quiet_run(cfg: SynthesisConfig) -> tuple[dict, float]:
    with contextlib.redirect_stdout(io.StringIO()):  # run() prints its summary
        summary = run(cfg, embed=FakeEmbed())
    return summary, summary["this_run"]["wall_s"]


def cpu_s() -> float:
    """CPU seconds of this process, all threads (the pipeline's side of the benchmark)."""
    return time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 128, 512],
                        help="samples per run at each concurrency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--fault-samples", type=int, default=512)
    parser.add_argument("--fault-concurrency", type=int, default=64)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-bench-local-mock")
    logging.getLogger("mme5.synthesis.client").setLevel(logging.ERROR)  # retry warnings: counted below

    with tempfile.TemporaryDirectory(prefix="mme5-synth-bench-") as tmp:
        tmp = Path(tmp)
        images = make_images(tmp / "images", args.images)

        print(f"# Throughput: mock server latency {args.latency * 1000:.0f} ms, {os.cpu_count()} CPU cores, "
              f"median of {args.repeats} runs")
        print("| concurrency | samples/run | wall s (median) | samples/s | speed-up vs c=1 | ideal "
              "| pipeline CPU ms/sample | server CPU ms/request | connections |")
        print("|---|---|---|---|---|---|---|---|---|")
        base = None
        for concurrency, n in zip(args.concurrency, args.samples, strict=True):
            rates, walls, cpus, server_cpus, connections = [], [], [], [], []
            for r in range(args.repeats):
                with ServerProcess(args.latency) as server:
                    cfg = config(tmp / f"c{concurrency}-r{r}", images, server.base_url, n, concurrency)
                    start = cpu_s()
                    summary, wall = quiet_run(cfg)
                    cpus.append((cpu_s() - start) / n * 1000)
                assert summary["written"] == n and summary["failed"] == 0, summary
                rates.append(n / wall)
                walls.append(wall)
                server_cpus.append(server.stats["cpu_s"] / server.stats["requests"] * 1000)
                connections.append(server.stats["connections"])
            rate = statistics.median(rates)
            base = base or rate
            print(f"| {concurrency} | {n} | {statistics.median(walls):.2f} | {rate:.1f} | {rate / base:.1f}x "
                  f"| {concurrency}x | {statistics.median(cpus):.2f} | {statistics.median(server_cpus):.2f} "
                  f"| {max(connections)} |", flush=True)

        # ------------------------------------------------------------------ faults
        rate = args.fault_rate
        # ~20% of requests: transport-level faults drawn per request, plus garbled answers among the rest
        faults = {"429 Retry-After 0": 0.25 * rate, "429 Retry-After 1": 0.15 * rate, "500": 0.2 * rate,
                  "garbled body": 0.1 * rate, "hang (timeout)": 0.05 * rate}
        answer_share = 0.25 * rate / (1 - sum(faults.values()))  # garbled answers: 25% of the faults
        parts, shards = 2, []
        n = args.fault_samples
        totals, usage = Counter(), Counter()
        with ServerProcess(args.latency, faults, answer_share) as server:
            for part in range(parts):
                cfg = config(tmp / "faults", images, server.base_url, n, args.fault_concurrency,
                             shard_index=part,
                             num_shards=parts, shard_size=50, answer_retries=2)
                cfg.client |= {"timeout_s": 2.0, "max_attempts": 4}
                summary, wall = quiet_run(cfg)
                totals.update({k: summary[k] for k in ("planned", "written", "failed")})
                usage.update(summary["total"])
                totals["wall_s"] += wall
                totals.update(Counter(summary["failed_by_reason"]))
                shards += shard_urls(cfg.work_dir)
        requests, drawn, garbled = (server.stats[k] for k in ("requests", "drawn", "garbled_answers"))
        ids = [s.id for s in read_samples(shards, strict=True)]
        duplicates = len(ids) - len(set(ids))
        injected = sum(v for k, v in drawn.items() if k != "ok") + garbled

        print()
        print(f"# Faults: {n} samples as a {parts}-way job-array split, "
              f"concurrency {args.fault_concurrency}, client max_attempts 4, timeout 2 s, answer_retries 2")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(drawn.items()) if k != "ok")
        print(f"requests {requests}, injected faults {injected} ({injected / requests:.0%}): {kinds}, "
              f"answer not JSON {garbled}")
        print("| planned | written | reported failed | written + failed == planned | ids in shards "
              "| duplicates | wall s | samples/s |")
        print("|---|---|---|---|---|---|---|---|")
        ok = totals["written"] + totals["failed"] == totals["planned"] == n
        print(f"| {totals['planned']} | {totals['written']} | {totals['failed']} | {ok} | {len(ids)} "
              f"| {duplicates} | {totals['wall_s']:.2f} | {totals['written'] / totals['wall_s']:.1f} |")
        reasons = {k: v for k, v in totals.items() if k not in ("planned", "written", "failed", "wall_s")}
        print(f"failed by reason: {reasons or 'none'}")
        print(f"accounted (summary.json `total`, both parts): {usage['calls']} calls with an answer, "
              f"{usage['input_tokens']} input + {usage['output_tokens']} output tokens, "
              f"${usage['cost_usd']:.4f}")
        assert ok and duplicates == 0 and len(ids) == totals["written"]


if __name__ == "__main__":
    main()
