"""Does the demo-size path learn a real image set? scikit-learn's handwritten digits (1 797 scans of 8x8 grey
pixels, upscaled to 64x64) as "Your own data" pairs, trained and scored per seed.

    python benchmarks/own_data_digits.py [--seeds 0 1 2] [--steps 300] [--preset demo-vision] [--out DIR]

Each image of the training split becomes three pairs (the image as query, the digit's word in English,
Spanish and Chinese as positive), written as a JSONL + PNG folder, converted with
`python -m mme5.data.convert --format pairs` and trained with `configs/own_data.yaml` from a tiny backbone
of `--preset`, exactly the README's commands. The held-out images (split by image, the same for every seed)
are scored:
  zero-shot  image → the 10 words of one language, nearest by cosine; mean over the three languages;
  probe      a logistic regression on the image embeddings (fit on the training images);
against chance (10%), the untrained backbone and a logistic regression on the raw 8x8 pixels.
Every step is skipped when its output exists, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from mme5.backbones.base import Item
from mme5.checkpoint import load_encoder
from mme5.encoder import Encoder
from mme5.eval.report import table

ROOT = Path(__file__).resolve().parents[1]
WORDS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
    "zh": ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"],
}
QUERY_INSTRUCTION = "Represent the given image with the following question: What digit is this?"
POSITIVE_INSTRUCTION = "Represent the given text."
SIDE = 64  # pixels: the demo backbones' tile


@dataclass(frozen=True)
class Digits:
    """The data set, split by image: pixels (N, 8, 8) in 0..16, labels (N,), index arrays of the split."""

    pixels: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray

    def image(self, i: int) -> Image.Image:
        """Scan i as the RGB image a user would have: grey levels stretched to 0..255, upscaled bilinearly."""
        grey = Image.fromarray((self.pixels[i] * (255 / 16)).round().astype(np.uint8))
        return grey.resize((SIDE, SIDE), Image.BILINEAR).convert("RGB")


def load(test_size: int, split_seed: int = 0) -> Digits:
    data = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(data.target))
    return Digits(data.images, data.target, np.sort(order[test_size:]), np.sort(order[:test_size]))


def write_pairs(digits: Digits, folder: Path) -> Path:
    """The training images as PNGs and one pair per (image, language): the user's "own data" folder."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs = folder / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as out:
        for i in digits.train:
            name = f"images/{i:04d}.png"
            digits.image(i).save(folder / name)
            for language, words in WORDS.items():
                row = {"query_image": name, "positive": words[digits.labels[i]], "language": language}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return pairs


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)


def prepare(digits: Digits, out: Path) -> Path:
    """Pairs converted to shards (once for all seeds)."""
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        pairs = write_pairs(digits, out / "my-data")
        run("-m", "mme5.data.convert", "--format", "pairs", "--input", str(pairs), "--images",
            str(pairs.parent), "--task", "classification", "--query-instruction", QUERY_INSTRUCTION,
            "--positive-instruction", POSITIVE_INSTRUCTION, "--out", str(shards), "--overwrite")
    return shards


def train(shards: Path, folder: Path, seed: int, steps: int, preset: str) -> Path:
    """A tiny backbone of `preset` and `seed`, trained on the shards with configs/own_data.yaml."""
    backbone, checkpoint = folder / "backbone", folder / "checkpoints" / "last.ckpt"
    run("-m", "mme5.backbones.tiny", "--family", "mllama", "--preset", preset, "--seed", str(seed),
        "--out", str(backbone))
    if not (folder / "trained").exists():
        run("train.py", "fit", "--config", "configs/own_data.yaml", "--trainer.default_root_dir", str(folder),
            "--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.max_steps", str(steps),
            "--data.sources", json.dumps([{"path": str(shards)}]), "--overwrite")
        (folder / "trained").write_text(json.dumps({"seed": seed, "steps": steps, "preset": preset}))
    return checkpoint


def image_embeddings(encoder: Encoder, digits: Digits, rows: np.ndarray) -> np.ndarray:
    items = [Item(instruction=QUERY_INSTRUCTION, image=digits.image(i)) for i in rows]
    return encoder.embed(items, batch_size=64).numpy()


def zero_shot(encoder: Encoder, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of image → nearest of the 10 label words, averaged over the languages."""
    accuracies = []
    for words in WORDS.values():
        texts = encoder.embed([Item(instruction=POSITIVE_INSTRUCTION, text=w) for w in words]).numpy()
        accuracies.append(float(((images @ texts.T).argmax(1) == labels).mean()))
    return statistics.mean(accuracies)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression on fixed features (standardised on the training split)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    model = LogisticRegression(max_iter=2000).fit((train_x - mean) / std, train_y)
    return float(model.score((test_x - mean) / std, test_y))


def score(model: Path, digits: Digits) -> dict[str, float]:
    """Zero-shot and probe accuracy (%) of a backbone folder or checkpoint on the held-out images."""
    encoder = load_encoder(model, "cpu").encoder.eval()
    with torch.no_grad():
        train_x, test_x = image_embeddings(encoder, digits, digits.train), image_embeddings(encoder, digits,
                                                                                           digits.test)
    test_y = digits.labels[digits.test]
    return {"zero-shot": 100 * zero_shot(encoder, test_x, test_y),
            "probe": 100 * probe(train_x, digits.labels[digits.train], test_x, test_y)}


def mean_sd(values: list[float]) -> str:
    sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{sd}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--preset", default="demo-vision")
    parser.add_argument("--test-size", type=int, default=297, help="held-out images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = (args.out or Path(scratch)).resolve()
        digits = load(args.test_size)
        shards = prepare(digits, out)
        untrained, trained = [], []
        for seed in args.seeds:
            folder = out / f"{args.preset}-s{seed}"
            checkpoint = train(shards, folder, seed, args.steps, args.preset)
            untrained.append(score(folder / "backbone", digits))
            trained.append(score(checkpoint, digits))
            print(f"seed {seed}: untrained {untrained[-1]}, trained {trained[-1]}", flush=True)
    pixels = digits.pixels.reshape(len(digits.labels), -1).astype(np.float64)
    raw = 100 * probe(pixels[digits.train], digits.labels[digits.train], pixels[digits.test],
                      digits.labels[digits.test])
    columns = ("zero-shot", "probe")
    rows = [[f"{args.preset}, untrained", *(mean_sd([s[k] for s in untrained]) for k in columns)],
            [f"{args.preset}, {args.steps} steps", *(mean_sd([s[k] for s in trained]) for k in columns)],
            ["raw 8x8 pixels", "–", f"{raw:.1f}"], ["chance", "10.0", "10.0"]]
    print(f"\nheld-out accuracy (%) on {len(digits.test)} digits, mean ± sd over seeds {args.seeds}:")
    print("\n".join(table(["model", "zero-shot (image → word)", "linear probe"], rows)))


if __name__ == "__main__":
    main()
