"""Benchmarks stay runnable: a CPU smoke run of benchmarks/gpu_step.py at the tiny "test" size."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_step_smoke_reports_consistent_figures_for_both_modes(tmp_path, capsys):
    gpu_step = load_benchmark("gpu_step")
    out = tmp_path / "gpu_step.json"
    argv = ["--size", "test", "--device", "cpu", "--batch", "4", "--chunk", "2", "--negatives", "1",
            "--text-tokens", "16", "--steps", "2", "--warmup", "1", "--threads", "1", "--in-process",
            "--out", str(out)]
    results = gpu_step.main(argv)

    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == json.loads(out.read_text()) == results
    assert [r["mode"] for r in results] == ["plain", "cached"]
    for r in results:
        assert r["benchmark"] == "gpu_step" and r["device"] == "cpu"
        assert len(r["step_times_s"]) == 2 and all(t > 0 for t in r["step_times_s"])
        assert r["step_s"] > 0 and r["samples_per_s"] == pytest.approx(4 / r["step_s"])
        assert r["peak_mb"] > 0 and r["peak_rise_mb"] >= 0
        assert r["items"] == 4 + 4 + 4 * 1 and r["tokens"] >= 12 * 16 and r["image_tiles"] == 6
        assert r["forward_flops"] > 0 and r["model_flops"] == 2 * r["forward_flops"]  # LoRA: 4NT convention
        assert r["forward_flops_with_adapters"] > r["forward_flops"]  # DoRA's extra work is not model FLOPs
        assert r["model_tflops_per_s"] == pytest.approx(r["model_flops"] / r["step_s"] / 1e12)
        assert r["mfu"] is None and r["peak_tflops"] is None  # CPU without --peak-tflops
        assert 0 < r["trainable_m"] < r["params_m"] and math.isfinite(r["loss"])
    plain, cached = results
    # Same inputs, same gradient: both modes count the same model FLOPs and see the same loss.
    assert plain["model_flops"] == cached["model_flops"]
    assert plain["loss"] == pytest.approx(cached["loss"], rel=0.05)
    assert plain["chunk"] == 4 and cached["chunk"] == 2


def test_gpu_step_mfu_uses_the_peak_of_the_device():
    gpu_step = load_benchmark("gpu_step")
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_step.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_step.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_step.peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_step.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_step.peak_tflops("Some Future GPU") is None


def test_gpu_step_counts_text_flops_as_2nt_plus_attention():
    gpu_step = load_benchmark("gpu_step")
    argv = ["--size", "test", "--device", "cpu", "--batch", "4", "--chunk", "2", "--negatives", "1",
            "--text-tokens", "16", "--image-fraction", "0", "--full", "--dtype", "float32",
            "--autocast", "none", "--steps", "1", "--warmup", "0", "--threads", "1", "--in-process",
            "--modes", "chunked"]
    (result,) = gpu_step.main(argv)
    # Text-only items skip Mllama's cross-attention layers: only the "test" preset's self-attention layer 0
    # runs (hidden 32, 2 heads, 1 kv head of 16, MLP 64): q, k, v, o, gate, up, down weights.
    params = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    items, tokens, chunks = 12, 12 * 16, 6  # 4 queries + 4 positives + 4 negatives, 16 tokens, chunks of 2
    attention = chunks * 4 * 2 * 16 * 16 * 32  # QK^T and AV per chunk: 4 · rows · T² · hidden
    assert result["items"] == items and result["tokens"] == tokens and result["image_tiles"] == 0
    assert result["forward_flops"] == 2 * params * tokens + attention
    assert result["model_flops"] == 3 * result["forward_flops"]  # full fine-tuning: 6NT


@pytest.fixture
def techniques(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its shared module, benchmarks/arms.py
    return load_benchmark("techniques")


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory, tiny):
    """A `make demo-data` folder at test size: a small world and a tiny Qwen2-VL (it reads the clips)."""
    from mme5.demo.world import WorldConfig, build_world

    demo = tmp_path_factory.mktemp("demo")
    build_world(demo / "world", WorldConfig(train_samples=64, eval_queries=3, eval_candidates=4, xtd_images=5,
                                            v2_queries=3, languages=("en", "es")), progress=False)
    (demo / "backbone").symlink_to(tiny("qwen2_vl"))
    return demo


def test_techniques_candidate_cosines_equal_a_brute_force(techniques, small_demo):
    from mme5.checkpoint import load_encoder
    from mme5.data.collate import side_item
    from mme5.data.shards import read_samples, shard_urls

    samples = list(read_samples(shard_urls(small_demo / "world" / "train")))[:10]
    found = techniques.candidate_cosines(small_demo / "backbone", small_demo / "world" / "train", 10)
    encoder = load_encoder(str(small_demo / "backbone")).encoder

    def unit(side):  # one side alone, in float64
        return torch.nn.functional.normalize(encoder.embed([side_item(side)])[0].double(), dim=0)

    positives = [unit(sample.positive) for sample in samples]
    expected = []  # row by row: the other samples' positives, then the sample's own negatives
    for i, sample in enumerate(samples):
        for j, other in enumerate(samples):
            if j != i and other.positive.content_key() != sample.positive.content_key():
                expected.append(float(positives[i] @ positives[j]))
    for i, sample in enumerate(samples):
        expected += [float(unit(n) @ positives[i]) for n in sample.negatives
                     if n.content_key() != sample.positive.content_key()]
    assert any(s.negatives for s in samples) and len(found) == len(expected)
    assert torch.allclose(found.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_techniques_splits_the_demo_by_task_once(techniques, small_demo, tmp_path):
    from mme5.data.shards import read_manifest, read_samples, shard_urls

    sources = techniques.task_sources(small_demo, tmp_path)
    original = list(read_samples(shard_urls(small_demo / "world" / "train"), decode_images=False))
    by_task = {path.name: [s.id for s in read_samples(shard_urls(path), decode_images=False)]
               for path in sources}
    assert by_task == {task: [s.id for s in original if str(s.task) == task]
                       for task in {str(s.task) for s in original}}
    assert all(read_manifest(path)["complete"] for path in sources)
    assert techniques.task_sources(small_demo, tmp_path) == sources  # done: not written again


@pytest.mark.slow
def test_techniques_refined_source_drops_the_lowest_positives_and_keeps_the_negatives(techniques, small_demo,
                                                                                     tmp_path):
    """positive-refinement's shards: the samples at or below the quantile of the mining model's positive
    scores are gone (as `mine` lists them), every other sample is there with its own negatives (nothing
    mined)."""
    from test_export import perturbed_checkpoint

    from mme5.data.shards import read_samples, shard_urls

    start = perturbed_checkpoint(str(small_demo / "backbone"), tmp_path / "start.ckpt", None)
    shards = techniques.refined_source(start, small_demo, tmp_path / "refined", 0.25)
    recorded = json.loads((tmp_path / "refined" / "threshold.json").read_text())
    reported = [json.loads(line) for line in (tmp_path / "refined" / "report" / "positive_refinement.jsonl")
                .open()]
    assert len(reported) == recorded["samples"] == 64  # report-only at t⁺ 1.0: every sample and its score
    low = {r["id"] for r in reported if r["positive_score"] <= recorded["min_positive_score"]}
    assert len(low) == recorded["dropped"] and 0 < len(low) < 32  # about a quarter (ties aside)
    world = {s.id: s for s in read_samples(shard_urls(small_demo / "world" / "train"))}
    kept = {s.id: s for s in read_samples(shard_urls(shards))}
    assert set(kept) == set(world) - low
    for sample_id, sample in kept.items():
        assert sample.negatives == world[sample_id].negatives
    assert techniques.refined_source(start, small_demo, tmp_path / "refined", 0.25) == shards  # done: kept


def test_techniques_merges_each_seed_with_the_next(techniques):
    assert techniques.merge_pairs([0, 1, 2]) == [(0, 1), (1, 2), (2, 0)]
    assert techniques.merge_pairs([3, 5]) == [(3, 5)]
    assert techniques.merge_pairs([0]) == []


@pytest.mark.slow
def test_techniques_smoke_trains_scores_merges_and_resumes(small_demo, tmp_path):
    """Two seeds of two steps from a trained start: the baseline, the measured fn-threshold and merge; a
    rerun only reports."""
    import os
    import subprocess
    import sys

    from test_export import perturbed_checkpoint

    start = perturbed_checkpoint(str(small_demo / "backbone"), tmp_path / "start.ckpt", None)
    command = [sys.executable, str(BENCHMARKS / "techniques.py"), "--demo", str(small_demo), "--out",
               str(tmp_path), "--seeds", "0", "1", "--steps", "2", "--arms", "fn-threshold", "merge",
               "--fn-samples", "16", "--init-from", str(start), "--lr", "1e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    for seed in (0, 1):
        for arm in ("baseline", "fn-threshold"):
            assert (tmp_path / "scores" / f"{arm}-s{seed}" / "scores.json").exists()
        recorded = json.loads((tmp_path / f"fn-threshold-s{seed}.json").read_text())
        overrides = json.loads((tmp_path / f"fn-threshold-s{seed}" / "trained").read_text())["overrides"]
        assert overrides[-2:] == ["--model.false_negative_threshold", f"{recorded['delta']:.6f}"]
        assert overrides[4:8] == ["--model.lr", "0.0001", "--model.init_from", str(start)]
        trained = tmp_path / f"baseline-s{seed}" / "checkpoints" / "last.ckpt"
        assert torch.load(trained, weights_only=True)["initialised_from"]["checkpoint"] == str(start)
    assert (tmp_path / "scores" / "start" / "scores.json").exists()
    assert (tmp_path / "scores" / "merge-s0-s1" / "scores.json").exists()
    assert "fn-threshold − baseline over seeds ['s0', 's1']" in first
    assert "merge − mean of the two baselines over seeds ['s0+s1']" in first
    again = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    assert "train.py" not in again and "mme5.merge" not in again  # every step was done: only the tables
    assert again.split("| Run |")[1] == first.split("| Run |")[1]


def test_paired_gain_is_the_mean_sd_and_count_of_the_per_seed_differences(techniques, tmp_path):
    import statistics

    from arms import paired_gain

    def scores(name, overall, v2_all=None):
        found = {"mmeb": {"Overall": overall}} | ({"mmeb-v2": {"Overall": v2_all}} if v2_all else {})
        (tmp_path / name).mkdir()
        (tmp_path / name / "scores.json").write_text(json.dumps(found))
        return tmp_path / name

    pairs = {"s0": ([scores("b0", 20.0, 10.0)], scores("a0", 23.0, 9.0)),
             "s1": ([scores("b1", 30.0, 12.0)], scores("a1", 29.0, 13.5)),
             "s2": ([scores("b2", 24.0), scores("b3", 26.0)], scores("a2", 27.5))}  # base: the mean of two
    cells = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in paired_gain(pairs, "arm", "base").splitlines() if line.startswith("| ")]
    rows = {row[0]: row[1:] for row in cells[1:]}
    overall = [3.0, -1.0, 2.5]  # the third against (24 + 26) / 2
    mean, sd = f"{statistics.mean(overall):+.1f}", f"{statistics.stdev(overall):.1f}"
    assert rows == {"Overall": [mean, sd, "2/3"],
                    "V2 All": ["+0.2", f"{statistics.stdev([-1.0, 1.5]):.1f}", "1/2"]}  # s2 has no V2
