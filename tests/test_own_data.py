"""The "Your own data" commands of docs/data.md, run as written on a folder of image–text pairs (the training
shortened to 4 steps of 8 samples)."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from doc_blocks import doc_commands
from PIL import Image

import mme5

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def test_the_docs_take_a_folder_of_pairs_to_a_trained_exported_model(tmp_path):
    data = tmp_path / "my-data"
    (data / "images").mkdir(parents=True)
    with open(data / "pairs.jsonl", "w") as pairs:
        for i in range(48):
            name = list(COLORS)[i % 4]
            Image.new("RGB", (24 + i % 5, 24), COLORS[name]).save(data / "images" / f"{i:04d}.png")
            row = {"query": f"a {name} square number {i}", "positive_image": f"images/{i:04d}.png"}
            pairs.write(json.dumps(row) + "\n")
    commands = doc_commands("docs/data.md", "Your own data")
    assert [c.split()[:3] for c in commands] == [
        ["python", "-m", "mme5.backbones.tiny"], ["python", "-m", "mme5.data.convert"],
        ["python", "train.py", "fit"], ["python", "-m", "mme5.export"]]
    for command in commands:
        argv = shlex.split(command.replace("--trainer.max_steps 300", "--trainer.max_steps 4"))
        local = ("train.py", "configs/own_data.yaml")  # the repository's, run from the user's folder
        argv = [sys.executable if a == "python" else str(ROOT / a) if a in local else a for a in argv]
        if "train.py" in command:
            argv += ["--data.num_workers", "0", "--data.batch_size", "8", "--model.chunk_size", "8"]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-3000:])

    manifest = json.loads((tmp_path / "runs/mine/shards/manifest.json").read_text())
    assert manifest["num_samples"] == 48 and manifest["extra"]["report"]["skipped"] == {}
    assert torch.load(tmp_path / "runs/mine/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    model = mme5.Embedder.from_pretrained(tmp_path / "runs/mine/exported", device="cpu")
    queries = model.encode_query(["a red square", "a blue square"])
    images = model.encode_document([data / "images" / "0000.png"])
    assert queries.shape == (2, model.dim) and model.similarity(queries, images).shape == (2, 1)
