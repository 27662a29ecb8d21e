"""Training-step throughput: step time, samples/s, peak memory and MFU, plain vs. gradient cache, in bf16.

    python benchmarks/gpu_step.py                                   # synthetic "1b" Mllama, batch 64, on cuda
    python benchmarks/gpu_step.py --size 11b --batch 32 --chunk 4 --gradient-checkpointing
    python benchmarks/gpu_step.py --backbone /models/Llama-3.2-11B-Vision --batch 32 --chunk 4 \\
        --gradient-checkpointing --out runs/bench/gpu_step_11b.json
    python benchmarks/gpu_step.py --size test --device cpu --threads 1 --steps 2 --batch 8 --chunk 4   # smoke

One training step as `mme5.module.EmbeddingModule.training_step` runs it, without Lightning: encode query,
positive and hard-negative groups, InfoNCE (temperature 0.02) over in-batch positives + each query's own
negatives, backward, gradient clipping (norm 5) and an AdamW step (`mme5.contrastive.contrastive_step`).
Modes: `plain` encodes each group in forwards of `--batch` items (one graph for the whole batch); `chunked`
is the plain step fed `--chunk`-item forwards (the module's path with gradient_cache false); `cached` is
`mme5.gradcache.GradCache` with `--chunk`. Adapters: LoRA/DoRA with the paper's settings
(`mme5.encoder.LoraSettings()`), or `--full` fine-tuning. Weights in `--dtype` (default bfloat16) under
`--autocast` (default bfloat16, as the recipe's `precision: bf16-mixed`).

Backbone: a model folder (`--backbone`, anything `mme5.backbones.load_backbone` reads), or a synthetic
Mllama with random weights built in memory on the device by `mme5.backbones.tiny.make_tiny` (`--size`:
test, demo, 1b, 11b; the "11b" is Llama-3.2-11B-Vision's layout, except 1 image tile, see below, and a 512-
token vocabulary: the embedder never runs the LM head, so only the embedding table shrinks). Inputs are
synthetic: every item has exactly `--text-tokens` text tokens (a long random text truncated by the
adapter, as in training) and, for a `--image-fraction` of items spread evenly, an RGB noise image of
`--image-size` px (the synthetic Mllama sees one 1-tile image; a real Llama-3.2-Vision processor pads to 4
tiles and the vision tower encodes the padding too, which counts as model FLOPs below).

Figures per mode, each mode in a fresh process (`--in-process` runs them in this one, resetting the peak
statistics between modes):
- step_s: median of `--steps` step times after `--warmup` steps (CUDA synchronised around each step);
  samples_per_s = batch / step_s (one sample = query + positive + its negatives).
- peak memory: on CUDA `torch.cuda.max_memory_allocated` over the warm-up and timed steps (reset once the
  model and the collated batch are ready), `peak_mb` absolute and `peak_rise_mb` above the allocation
  before the first step (activations, gradients, optimiser state); on CPU the process's peak resident set
  (VmHWM, reset through /proc/self/clear_refs), `peak_rise_mb` above the RSS before the first step.
- MFU = model FLOPs per step / step_s / peak FLOP/s. Model FLOPs = F × m. F (`forward_flops`) is the
  forward FLOPs of the backbone alone (adapters disabled) over all the step's items (query, positive,
  negatives), counted by `torch.utils.flop_counter` on a forward of the very batch: matmuls, convolutions
  and attention as executed, so padding tokens, padded tiles, the vision tower, the projector and the
  cross-attention k/v over vision states are included; norms, activations and the loss are not. m = 3
  for full fine-tuning (forward + activation gradients + weight gradients: the usual 6NT) and m = 2 with
  adapters (frozen weights need activation gradients only: 4NT; the adapters' own FLOPs are left out).
  Not counted either: gradient checkpointing's recomputation, the gradient cache's extra no-grad forward,
  and what PEFT's DoRA adds in training (with dropout > 0 it runs each adapted module's base matmul a
  second time, plus the B·A product for the weight norm): all modes then do the same model FLOPs, and
  these costs show as a lower MFU. `forward_flops_with_adapters` is the same count with the adapters on,
  in training mode, i.e. what the forward really executes. Peak FLOP/s: dense bf16 tensor-core peak of
  the GPU from `PEAK_TFLOPS` (by `torch.cuda.get_device_name`), or `--peak-tflops`; on CPU, MFU is n/a
  unless `--peak-tflops` is given.

Output: a table, one JSON line per mode (starting with `{"benchmark": "gpu_step"`), and `--out FILE.json`
(a list of those objects). A mode that runs out of memory is reported as `"error": "out of memory"`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mme5.backbones import ADAPTERS, DTYPES, InputFormat, Item, load_backbone
from mme5.backbones.base import BackboneAdapter
from mme5.backbones.tiny import PRESETS, Sizes, make_tiny
from mme5.contrastive import contrastive_step
from mme5.encoder import Encoder, LoraSettings
from mme5.gradcache import GradCache
from mme5.losses import InfoNCE

# Synthetic Mllama sizes. "1b": Llama-3.2-1B's text model (2048 wide, 16 layers, 32/8 heads, MLP 8192) with
# cross-attention at layers 3, 7, 11, 15 and a 768-wide 12 + 2-layer vision tower at 448 px (patch 14: 1024
# patches a tile); 1.08B parameters. "11b": Llama-3.2-11B-Vision's layout (text 4096 wide, 40 layers with
# cross-attention at 3, 8, ..., 38, MLP 14336; vision 1280 wide, 32 local + 8 global layers, 560 px, patch
# 14, 5 intermediate layers); 9.55B parameters = the real 10.67B less its 128k-token embedding and LM head.
SIZES: dict[str, Sizes] = {
    "test": PRESETS["test"],
    "demo": PRESETS["demo"],
    "1b": Sizes(vocab=512, image=448, patch=14, v_hidden=768, v_layers=12, v_heads=12, v_mlp=3072,
                t_hidden=2048, t_layers=16, t_heads=32, t_kv_heads=8, t_mlp=8192, v_global_layers=2,
                v_intermediate=(3, 7), cross_first=3, cross_stride=4, max_positions=4096),
    "11b": Sizes(vocab=512, image=560, patch=14, v_hidden=1280, v_layers=32, v_heads=16, v_mlp=5120,
                 t_hidden=4096, t_layers=40, t_heads=32, t_kv_heads=8, t_mlp=14336, v_global_layers=8,
                 v_intermediate=(3, 7, 15, 23, 30), cross_first=3, cross_stride=5, max_positions=4096),
}

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM5 / HBM3, e.g. "NVIDIA H100 80GB HBM3"
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]

MODES = ("plain", "chunked", "cached")
WORDS = ("a red circle on a blue square beside the small green triangle near two yellow stars under one "
         "large white cat sitting in a grey room with the brown dog and an orange ball").split()


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU kernel of scaled_dot_product_attention, which torch's FLOP counter does not know."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Forward-FLOP formulas to add to torch's (its own cover matmuls, convolutions and the CUDA attentions).
EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name, or None when the name is not in `PEAK_TFLOPS`."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key.lower() in device_name.lower()), None)


# ------------------------------------------------------------------ memory


def _status_kb(field: str) -> int:
    """A memory field of /proc/self/status in KiB (Linux; CPU memory figures need it)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_cpu_peak() -> None:
    """Reset the process's peak RSS (VmHWM); Linux: writing 5 to clear_refs. No-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def cpu_rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def cpu_peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


# ------------------------------------------------------------------ model and inputs


def build_adapter(args: argparse.Namespace, device: torch.device) -> BackboneAdapter:
    """The backbone: `--backbone` loaded like a checkpoint, or a synthetic Mllama of `--size` on `device`."""
    dtype = DTYPES[args.dtype]
    input_format = InputFormat(max_length=args.text_tokens)  # every item's text is cut to exactly this
    if args.backbone:
        adapter = load_backbone(args.backbone, dtype=dtype, input_format=input_format)
        adapter.model.to(device)
    else:
        model, processor = make_tiny("mllama", seed=0, sizes=SIZES[args.size], dtype=dtype, device=device)
        adapter = ADAPTERS["mllama"](model, processor, input_format)
    return adapter


def synthetic_items(count: int, args: argparse.Namespace, rng: random.Random) -> list[Item]:
    """`count` items with long random texts; an evenly spread `--image-fraction` of them with an image."""
    side = args.image_size
    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8))
              for i in range(4)]
    items = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(2 * args.text_tokens + 8))  # > text_tokens tokens
        has_image = int((i + 1) * args.image_fraction) > int(i * args.image_fraction)
        items.append(Item("Represent the given item.", text, images[i % 4] if has_image else None))
    return items


def synthetic_groups(adapter: BackboneAdapter, args: argparse.Namespace, chunk: int) -> dict[str, list]:
    """Processor batches of `chunk` items for the query, positive and negatives groups (B, B, B × K).

    Already on `--device`, as Lightning moves a batch there before the training step.
    """
    rng = random.Random(0)
    sizes = {"query": args.batch, "positive": args.batch, "negatives": args.batch * args.negatives}
    chunks = {name: adapter.chunks(synthetic_items(n, args, rng), chunk) for name, n in sizes.items()}
    for chunk in (chunk for group in chunks.values() for chunk in group):
        chunk.inputs = {key: value.to(args.device) for key, value in chunk.inputs.items()}
    return chunks


def count_inputs(groups: dict[str, list]) -> dict[str, int]:
    """Items, token positions (padding included) and image tiles encoded in one step."""
    totals = {"items": 0, "tokens": 0, "image_tiles": 0}
    for chunks in groups.values():
        for chunk in (c.inputs for c in chunks):
            totals["items"] += chunk["input_ids"].shape[0]
            totals["tokens"] += chunk["input_ids"].numel()
            if chunk.get("aspect_ratio_ids") is not None:  # Mllama: (B, images); 0 = no image in the row
                rows = chunk["aspect_ratio_ids"][:, 0] > 0
                totals["image_tiles"] += int(rows.sum()) * chunk["pixel_values"].shape[2]  # padded tiles too
            elif chunk.get("image_grid_thw") is not None:  # Qwen2-VL: one row per image
                totals["image_tiles"] += chunk["image_grid_thw"].shape[0]
            elif chunk.get("pixel_values") is not None:  # LLaVA: (images, C, H, W)
                totals["image_tiles"] += chunk["pixel_values"].shape[0]
    return totals


# ------------------------------------------------------------------ one mode


def measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Build model and batch, run `--warmup` + `--steps` steps of `mode`, return the figures."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    adapter = build_adapter(args, device)
    lora = None if args.full else LoraSettings()
    encoder = Encoder(adapter, lora, gradient_checkpointing=args.gradient_checkpointing).train()
    params = sum(p.numel() for p in encoder.parameters())
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5) if args.optimizer == "adamw" else None
    loss_fn = InfoNCE(temperature=0.02, gather=False)
    groups = synthetic_groups(adapter, args, args.batch if mode == "plain" else args.chunk)
    mask = torch.ones(args.batch, args.negatives, dtype=torch.bool, device=device)  # every negative is real
    autocast = (torch.autocast(device.type, dtype=DTYPES[args.autocast]) if args.autocast != "none"
                else nullcontext())

    cache = GradCache(args.chunk) if mode == "cached" else None
    last_loss = [float("nan")]

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        encoder.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = contrastive_step(encoder.encode_chunk, groups["query"], groups["positive"],
                                       groups["negatives"], mask, loss_fn, cache)
        torch.nn.utils.clip_grad_norm_(trainable, 5.0)
        if optimizer is not None:
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        last_loss[0] = float(loss.detach())
        return time.perf_counter() - start

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_cpu_peak()
        before = cpu_rss_mb()
    times = [step() for _ in range(args.warmup + args.steps)][args.warmup :]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else cpu_peak_mb()

    # Model FLOPs: one forward of every item of the step under the step's autocast, chunked by `--chunk` in
    # every mode (padding depends on the chunking), so that all modes count the same FLOPs. After the timed
    # steps, so that these passes cannot raise the memory baseline; in grad mode, as the counter's module
    # tracker fails on trainable leaves under no_grad (each chunk's graph is dropped at once).
    counted = groups if mode != "plain" else synthetic_groups(adapter, args, args.chunk)

    def forward_flops(adapters: bool) -> int:
        off = encoder.model.disable_adapter() if encoder.has_adapters and not adapters else nullcontext()
        with off, autocast, FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS) as counter:
            for chunks in counted.values():
                for chunk in chunks:
                    encoder.encode_chunk(chunk).detach()
        return counter.get_total_flops()

    base_flops = forward_flops(adapters=False)  # the backbone alone: the convention's 2NT + attention
    executed_flops = forward_flops(adapters=True) if encoder.has_adapters else base_flops
    model_flops = base_flops * (3 if args.full else 2)

    step_s = statistics.median(times)
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_flops = args.peak_tflops or (peak_tflops(device_name) if cuda else None)
    achieved = model_flops / step_s / 1e12
    return {
        "benchmark": "gpu_step",
        "mode": mode,
        "backbone": args.backbone or f"synthetic mllama {args.size}",
        "device": device_name,
        "dtype": args.dtype,
        "autocast": args.autocast,
        "tuning": "full" if args.full else "lora",
        "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer": args.optimizer,
        "batch": args.batch,
        "chunk": args.batch if mode == "plain" else args.chunk,
        "negatives": args.negatives,
        "text_tokens": args.text_tokens,
        "image_fraction": args.image_fraction,
        "params_m": params / 1e6,
        "trainable_m": sum(p.numel() for p in trainable) / 1e6,
        **count_inputs(groups),
        "steps": args.steps,
        "warmup": args.warmup,
        "step_times_s": times,
        "step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "peak_mb": peak,
        "peak_rise_mb": max(peak - before, 0.0),
        "memory": "cuda max_memory_allocated" if cuda else "cpu peak RSS (VmHWM)",
        "forward_flops": base_flops,
        "forward_flops_with_adapters": executed_flops,
        "model_flops": model_flops,
        "model_tflops_per_s": achieved,
        "peak_tflops": peak_flops,
        "mfu": achieved / peak_flops if peak_flops else None,
        "loss": last_loss[0],
    }


# ------------------------------------------------------------------ driver


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """`measure` with `--threads` CPU threads (then restored: main() may run inside a test); running out
    of memory is a result (e.g. the plain step at a batch the cache still fits), not a crash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads or previous)
    try:
        return measure(args, mode)
    except torch.OutOfMemoryError:
        return {"benchmark": "gpu_step", "mode": mode, "batch": args.batch,
                "chunk": args.batch if mode == "plain" else args.chunk, "error": "out of memory"}
    finally:
        torch.set_num_threads(previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", help="a model folder for load_backbone (default: a synthetic Mllama)")
    model.add_argument("--size", default="1b", choices=sorted(SIZES), help="synthetic Mllama size")
    model.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA/DoRA")
    model.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant checkpointing")
    model.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weights' dtype")
    model.add_argument("--autocast", default="bfloat16", choices=["none", "bfloat16", "float16"])
    model.add_argument("--optimizer", default="adamw", choices=["adamw", "none"], help="step the optimiser")
    data = parser.add_argument_group("inputs")
    data.add_argument("--batch", type=int, default=64, help="samples per step (per GPU)")
    data.add_argument("--chunk", type=int, default=8, help="items per forward of the cached/chunked modes")
    data.add_argument("--negatives", type=int, default=3, help="hard negatives per sample")
    data.add_argument("--text-tokens", type=int, default=128, help="text tokens per item (image token apart)")
    data.add_argument("--image-fraction", type=float, default=0.5, help="share of items with an image")
    data.add_argument("--image-size", type=int, help="side of the synthetic images, px (default: the "
                      "synthetic model's tile side; 560 with --backbone)")
    run = parser.add_argument_group("run")
    run.add_argument("--modes", nargs="+", default=["plain", "cached"], choices=MODES)
    run.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    run.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: by GPU name)")
    run.add_argument("--in-process", action="store_true", help="all modes in this process")
    run.add_argument("--out", type=Path, help="also write the results to this JSON file")
    run.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 <= args.image_fraction <= 1 or min(args.batch, args.chunk, args.steps) < 1 or args.negatives < 0:
        parser.error("need 0 <= --image-fraction <= 1, --batch, --chunk, --steps >= 1 and --negatives >= 0")
    if args.image_size is None:
        args.image_size = 560 if args.backbone else SIZES[args.size].image
    return args


def print_table(results: list[dict[str, Any]]) -> None:
    done = [r for r in results if "error" not in r]
    if not done:
        print("every mode failed: " + ", ".join(f"{r['mode']}: {r['error']}" for r in results))
        return
    first = done[0]
    print(f"{first['backbone']} ({first['params_m']:.1f}M params, {first['trainable_m']:.2f}M trainable, "
          f"{first['tuning']}), {first['device']}, weights {first['dtype']}, autocast {first['autocast']}, "
          f"checkpointing {first['gradient_checkpointing']}; batch {first['batch']}, {first['negatives']} "
          f"negatives, {first['items']} items = {first['tokens']} token positions + {first['image_tiles']} "
          f"image tiles a step; model FLOPs/step {first['model_flops'] / 1e12:.3g} T; "
          f"median of {first['steps']} steps after {first['warmup']}")
    header = ["mode", "chunk", "step s", "samples/s", "peak MB", "peak rise MB", "TFLOP/s", "MFU"]
    print(" | ".join(header))
    for r in results:
        if "error" in r:
            row = [r["mode"], str(r["chunk"]), r["error"], *[""] * (len(header) - 3)]
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            row = [r["mode"], str(r["chunk"]), f"{r['step_s']:.3f}", f"{r['samples_per_s']:.1f}",
                   f"{r['peak_mb']:.0f}", f"{r['peak_rise_mb']:.0f}", f"{r['model_tflops_per_s']:.3g}", mfu]
        print(" | ".join(value.rjust(len(name)) for value, name in zip(row, header, strict=True)))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every mode, print the table and the JSON lines; returns the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args, args.child)))
        return []
    results = []
    for mode in args.modes:
        if args.in_process:
            results.append(run_mode(args, mode))
            continue
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", mode]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            sys.stderr.write(child.stderr[-5000:])
            raise SystemExit(f"mode {mode} failed (exit {child.returncode}): {' '.join(command)}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print_table(results)
    for result in results:
        print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
