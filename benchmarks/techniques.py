"""Do the training techniques of issue 26 help? The demo recipe trained with each switch on and off, paired
by seed (same data order and initial weights), all scored on the demo world's MMEB, MMEB-V2 and XTD.

    python benchmarks/techniques.py --demo runs/demo [--seeds 0 1 2] [--steps 40] [--out runs/techniques]
        [--arms baseline hardness ...] [--init-from runs/demo/checkpoints/last.ckpt --lr 1e-4]

Arms, each `configs/demo.yaml` for `--steps` steps (warm-up scaled to the demo's 50 of 600) with the
in-training evaluation callbacks off (scoring happens once, at the end), from the demo's untrained backbone
or, with `--init-from`, as a second stage from a trained model's weights (`model.init_from`: how the papers
apply most of these techniques, and where a few steps of the tiny model mean something; the start itself is
scored as the row `start`). The paper's setting unless said:
  baseline            the demo recipe (in-batch + 1 hard negative, τ 0.05, content-equal false negatives
                      masked).
  hardness            `hardness_mode in_batch_negatives`, α 9 (RzenEmbed, Lan et al. 2025).
  hn-hardness         `hardness_mode hard_negatives`, α 5 (EmbeddingGemma, Schechter Vera et al. 2025).
  all-hardness        `hardness_mode all_negatives`, α 5 (sentence-transformers 6.2: both kinds at once).
  fn-threshold        `false_negative_threshold δ` (RzenEmbed: 0.95). Scaled: a cosine means something
                      else for the tiny model than for a pretrained VLM (its candidates spread from -0.6 to
                      1.0, a tenth of them above 0.95 already untrained), so 0.95 would drop far more than the
                      near-duplicates of the positive the rule is for. δ here is the `--fn-quantile` (0.99)
                      quantile of sim(candidate, positive) over the candidates a query's softmax keeps (the
                      other samples' positives and its own hard negatives, content-equal ones left out) as
                      the seed's trained baseline embeds the first `--fn-samples` training samples: the rule
                      drops the 1% of candidates the trained model finds most like the positive. Kept, with
                      the share of candidates above the paper's 0.95, in `<out>/fn-threshold-s<seed>.json`.
  fn-margin           `false_negative_margin 0.1` (Qwen3-VL-Embedding): a margin over the positive's own
                      score, meaningful at any cosine scale, so not scaled.
  task-temperatures   `task_temperatures true`: one learnable τ per task type (classification, VQA, retrieval,
                      grounding: the demo's meta-tasks; RzenEmbed has 7 groups over its data sets).
  per-source          `batch_composition per_source`: every batch from one source. The demo trains on one
                      source, so its samples are split by task into four (`<out>/sources/<task>`), the demo's
                      closest thing to RzenEmbed's data sets.
  matryoshka          `matryoshka_dims [128, 32, 16, 8]`: the paper's 4096, 1024, 512, 256 as fractions (1,
                      1/4, 1/8, 1/16) of the demo's 128 dimensions; scored at full size and at
                      `--truncate-dim` (32, as 1024 of 4096) against the baseline truncated alike (`--dim`).
  merge               no training: `python -m mme5.merge` of the baselines of seeds i and i+1 (cyclic:
                      two runs that differ only by seed), against the mean of the two (RzenEmbed's souping,
                      Qwen3-VL-Embedding's stage merge).
  positive-refinement `mine --min-positive-score t⁺` (Qwen3-VL-Embedding §3.3): the training samples whose
                      positive the mining model (the `--init-from` start, else the seed's baseline) scores
                      lowest are dropped as likely label noise. Scaled like δ: t⁺ is the `--refine-quantile`
                      (0.05) quantile of the positive scores of a report-only mining pass, so the rule drops
                      the 5% the model finds least like their positive (the demo has no label noise: this
                      measures what dropping them costs). `--max-negatives 0`: nothing is mined, the kept
                      samples keep their own negatives, so the arm differs from the baseline by the drop.
                      Kept, with t⁺ and the count dropped, in `<out>/refined*/threshold.json`.
Mining itself is benchmarks/mining_gain.py's subject.

Each row of the printed table is `mme5.eval.compare`'s; after it, per technique, the paired gain (arm −
baseline per seed): mean, sd, and the seeds where it is positive. Every step is skipped when its output
exists and a stopped training resumes from its newest checkpoint, so a killed run continues when run again.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from arms import arm_folder, evaluate, paired_gain, run, train

from mme5.data.collate import side_item
from mme5.data.shards import ShardWriter, read_samples, shard_urls

MATRYOSHKA_DIMS = [128, 32, 16, 8]
FIXED: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "hardness": ("--model.hardness_mode", "in_batch_negatives", "--model.hardness_strength", "9"),
    "hn-hardness": ("--model.hardness_mode", "hard_negatives", "--model.hardness_strength", "5"),
    "all-hardness": ("--model.hardness_mode", "all_negatives", "--model.hardness_strength", "5"),
    "fn-margin": ("--model.false_negative_margin", "0.1"),
    "task-temperatures": ("--model.task_temperatures", "true"),
    "matryoshka": ("--model.matryoshka_dims", json.dumps(MATRYOSHKA_DIMS)),
}
ARMS = ["baseline", "fn-threshold", "per-source", "matryoshka", "hardness", "hn-hardness", "all-hardness",
        "fn-margin", "task-temperatures", "positive-refinement", "merge"]  # in this order, seed after seed


def checkpoint_only(folder: Path) -> tuple[str, ...]:
    """The demo's callbacks without the in-training evaluations: its checkpoints only."""
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(folder / "checkpoints"), "save_last": True,
                              "enable_version_counter": False, "every_n_train_steps": 20, "save_top_k": -1}}
    return ("--trainer.callbacks", json.dumps([callback]))


def candidate_cosines(model: Path, shards: Path, count: int) -> torch.Tensor:
    """sim(candidate, positive) for the candidates of the first `count` samples' softmaxes as the demo batches
    them: every other sample's positive and the sample's own hard negatives, content-equal pairs (which the
    content mask drops anyway) left out; the model's embeddings, normalised."""
    from mme5.checkpoint import load_encoder

    samples = list(itertools.islice(read_samples(shard_urls(shards)), count))
    negatives = [(i, side) for i, sample in enumerate(samples) for side in sample.negatives]
    encoder = load_encoder(str(model)).encoder
    sides = [sample.positive for sample in samples] + [side for _, side in negatives]
    embedded = torch.nn.functional.normalize(encoder.embed([side_item(s) for s in sides], 32), dim=-1)
    positives, negative_embeddings = embedded[:len(samples)], embedded[len(samples):]
    keys = torch.tensor([s.content_key() for s in sides])
    owner = torch.tensor([i for i, _ in negatives], dtype=torch.long)
    in_batch = positives @ positives.T  # (N, N): row i's positive against the others'
    distinct = keys[:len(samples), None] != keys[None, :len(samples)]
    own = (negative_embeddings * positives[owner]).sum(-1)  # (M,): each negative against its positive
    return torch.cat([in_batch[distinct], own[keys[len(samples):] != keys[owner]]])


def threshold(baseline: Path, shards: Path, out: Path, quantile: float, count: int) -> float:
    """The fn-threshold arm's δ (see the docstring), measured with `baseline` once and kept at `out`."""
    if not out.exists():
        cosines = candidate_cosines(baseline, shards, count).double()
        out.write_text(json.dumps({"delta": float(torch.quantile(cosines, quantile)), "quantile": quantile,
                                   "model": str(baseline), "samples": count, "pairs": len(cosines),
                                   "share_above_0.95": float((cosines > 0.95).double().mean())}))
    return json.loads(out.read_text())["delta"]


def task_sources(demo: Path, out: Path) -> list[Path]:
    """The demo's training shards split by task, one shard folder each (written once)."""
    folder = out / "sources"
    tasks: dict[str, ShardWriter] = {}
    if not (folder / "done").exists():
        for sample in read_samples(shard_urls(demo / "world" / "train"), decode_images=False):
            task = str(sample.task)
            if task not in tasks:
                tasks[task] = ShardWriter(folder / task, extra={"split_from": str(demo / "world" / "train")})
            tasks[task].write(sample)
        for writer in tasks.values():
            writer.close()
        (folder / "done").write_text(json.dumps(sorted(tasks)))
    return [folder / task for task in json.loads((folder / "done").read_text())]


def refined_source(model: Path, demo: Path, out: Path, quantile: float) -> Path:
    """The demo's training shards without the samples whose positive `model` scores at most the `quantile`
    of all positive scores (`mme5.data.mine --min-positive-score`), mined once into `out`."""
    mine = ("-m", "mme5.data.mine", "--model", str(model), "--shards", str(demo / "world" / "train"),
            "--max-negatives", "0")
    if not (out / "threshold.json").exists():
        run(*mine, "--out", str(out / "report"), "--report-only", "--min-positive-score", "1.0")
        with open(out / "report" / "positive_refinement.jsonl", encoding="utf-8") as lines:
            scores = torch.tensor([json.loads(line)["positive_score"] for line in lines], dtype=torch.float64)
        t = float(torch.quantile(scores, quantile))
        (out / "threshold.json").write_text(json.dumps({"min_positive_score": t, "quantile": quantile,
                                                        "model": str(model), "samples": len(scores),
                                                        "dropped": int((scores <= t).sum())}))
    t = json.loads((out / "threshold.json").read_text())["min_positive_score"]
    run(*mine, "--out", str(out / "shards"), "--min-positive-score", f"{t:.6f}")  # done: says so
    return out / "shards"


def overrides(arm: str, seed: int, demo: Path, out: Path, args: argparse.Namespace) -> tuple[str, ...]:
    """The arm's settings on top of configs/demo.yaml (fn-threshold: after the seed's baseline)."""
    if arm == "fn-threshold":
        delta = threshold(out / f"baseline-s{seed}" / "checkpoints" / "last.ckpt", demo / "world" / "train",
                          out / f"fn-threshold-s{seed}.json", args.fn_quantile, args.fn_samples)
        return ("--model.false_negative_threshold", f"{delta:.6f}")
    if arm == "positive-refinement":
        model = args.init_from or out / f"baseline-s{seed}" / "checkpoints" / "last.ckpt"
        folder = out / ("refined" if args.init_from else f"refined-s{seed}")
        sources = [{"path": str(refined_source(model.resolve(), demo, folder, args.refine_quantile))}]
        return ("--data.sources", json.dumps(sources))
    if arm == "per-source":
        sources = [{"path": str(path)} for path in task_sources(demo, out)]
        return ("--data.batch_composition", "per_source", "--data.sources", json.dumps(sources))
    return FIXED[arm]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `make demo-data` folder")
    parser.add_argument("--out", type=Path, default=Path("runs/techniques"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS,
                        help="the techniques to run (the baseline is always trained)")
    parser.add_argument("--truncate-dim", type=int, default=32, help="matryoshka's truncated scoring size")
    parser.add_argument("--fn-quantile", type=float, default=0.99, help="fn-threshold's δ quantile")
    parser.add_argument("--fn-samples", type=int, default=256, help="samples δ is measured on")
    parser.add_argument("--refine-quantile", type=float, default=0.05,
                        help="positive-refinement's t⁺ quantile")
    parser.add_argument("--init-from", type=Path, help="start every arm from this checkpoint's weights")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the demo recipe's)")
    args = parser.parse_args(argv)
    demo, out = args.demo.resolve(), args.out.resolve()
    rows = {"start": [evaluate(args.init_from.resolve(), demo, out / "scores" / "start")]} if args.init_from \
        else {}
    rows |= trained_rows(demo, out, args)
    pairs = merge_pairs(args.seeds) if "merge" in args.arms else []
    if pairs:
        rows["merge"] = [merged_scores(demo, out, pair) for pair in pairs]
    run("-m", "mme5.eval.compare", *(str(path) for paths in rows.values() for path in paths))
    for arm in rows:
        if not arm.startswith(("baseline", "start")):
            print(gain_of(arm, out / "scores", args.seeds, pairs, args.truncate_dim))


def trained_rows(demo: Path, out: Path, args: argparse.Namespace) -> dict[str, list[Path]]:
    """Every trained arm of every seed, trained and scored (matryoshka and its baseline also truncated):
    {row name: its score folders, seed by seed}."""
    trained = [arm for arm in ARMS if arm == "baseline" or (arm in args.arms and arm != "merge")]
    schedule = ("--model.warmup", str(args.steps * 50 // 600))  # the demo's 50 of 600 steps, scaled
    if args.lr is not None:
        schedule += ("--model.lr", str(args.lr))
    if args.init_from is not None:
        schedule += ("--model.init_from", str(args.init_from.resolve()))
    rows: dict[str, list[Path]] = {}
    for seed, arm in itertools.product(args.seeds, trained):
        folder = arm_folder(out, f"{arm}-s{seed}", demo)
        settings = overrides(arm, seed, demo, out, args)
        checkpoint = train(folder, seed, args.steps, *checkpoint_only(folder), *schedule, *settings)
        full = evaluate(checkpoint, demo, out / "scores" / folder.name)
        rows.setdefault(arm, []).append(full)
        if arm in ("baseline", "matryoshka") and "matryoshka" in args.arms:  # the cache holds full embeddings
            name = f"{arm}-d{args.truncate_dim}"
            rows.setdefault(name, []).append(evaluate(checkpoint, demo, out / "scores" / f"{name}-s{seed}",
                                                      "--dim", str(args.truncate_dim), "--cache",
                                                      str(full / "cache")))
    return rows


def merged_scores(demo: Path, out: Path, pair: tuple[int, int]) -> Path:
    """The merge of two seeds' baselines (`python -m mme5.merge`), scored."""
    merged = out / f"merge-s{pair[0]}-s{pair[1]}"
    if not (merged / "model.ckpt").exists():
        run("-m", "mme5.merge", "--runs", *(str(out / f"baseline-s{seed}" / "checkpoints" / "last.ckpt")
                                            for seed in pair), "--out", str(merged))
    return evaluate(merged / "model.ckpt", demo, out / "scores" / merged.name)


def gain_of(arm: str, scores: Path, seeds: list[int], pairs: list[tuple[int, int]], truncate_dim: int) -> str:
    """The arm's paired gain table: against the seed's baseline (truncated alike), a merge against the mean
    of the two baselines it merges."""
    if arm == "merge":
        return paired_gain({f"s{a}+s{b}": ([scores / f"baseline-s{a}", scores / f"baseline-s{b}"],
                                           scores / f"merge-s{a}-s{b}") for a, b in pairs},
                           arm, "mean of the two baselines")
    base = f"baseline-d{truncate_dim}" if arm.endswith(f"-d{truncate_dim}") else "baseline"
    pairs_by_seed = {f"s{seed}": ([scores / f"{base}-s{seed}"], scores / f"{arm}-s{seed}") for seed in seeds}
    return paired_gain(pairs_by_seed, arm, base)


def merge_pairs(seeds: list[int]) -> list[tuple[int, int]]:
    """Seed i's baseline with seed i+1's, cyclically (one pair for two seeds, none for one)."""
    if len(seeds) < 2:
        return []
    pairs = list(zip(seeds, seeds[1:] + seeds[:1], strict=True))
    return pairs[:1] if len(seeds) == 2 else pairs


if __name__ == "__main__":
    main()
