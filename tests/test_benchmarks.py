"""Benchmarks stay runnable: a CPU smoke run of benchmarks/gpu_step.py at the tiny "test" size."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

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
