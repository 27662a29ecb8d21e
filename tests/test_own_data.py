"""The "Your own data" commands of docs/data.md, run as written on a folder of image–text pairs (the training
shortened to 4 steps of 8 samples)."""

import json

import pytest
import torch
from doc_blocks import doc_commands, run_doc_commands
from PIL import Image

import mme5

# appended to a documented training command: 8-sample batches in the test's process
TRAIN_SMALL = " --data.num_workers 0 --data.batch_size 8 --model.chunk_size 8"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def shortened(commands: list[str]) -> list[str]:
    """The documented commands with every training cut to 4 steps of 8 samples."""
    return [c.replace("--trainer.max_steps 300", "") + " --trainer.max_steps 4" + TRAIN_SMALL
            if "train.py" in c else c for c in commands]


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    """A folder of 48 coloured squares and their captions taken through the "Your own data" commands."""
    folder = tmp_path_factory.mktemp("own-data")
    data = folder / "my-data"
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
    run_doc_commands(shortened(commands), folder)
    return folder


def test_the_docs_take_a_folder_of_pairs_to_a_trained_exported_model(own_data_run):
    manifest = json.loads((own_data_run / "runs/mine/shards/manifest.json").read_text())
    assert manifest["num_samples"] == 48 and manifest["extra"]["report"]["skipped"] == {}
    checkpoint = own_data_run / "runs/mine/checkpoints/last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    model = mme5.Embedder.from_pretrained(own_data_run / "runs/mine/exported", device="cpu")
    queries = model.encode_query(["a red square", "a blue square"])
    images = model.encode_document([own_data_run / "my-data" / "images" / "0000.png"])
    assert queries.shape == (2, model.dim) and model.similarity(queries, images).shape == (2, 1)


@pytest.mark.slow
def test_the_docs_mine_with_the_first_model_and_train_the_second_round(own_data_run):
    commands = doc_commands("docs/data.md", "Positive refinement and iterated mining")
    assert [c.split()[:3] for c in commands] == [
        ["python", "-m", "mme5.data.mine"], ["python", "train.py", "fit"]]
    run_doc_commands(shortened(commands), own_data_run)

    mined = json.loads((own_data_run / "runs/mine-r2/shards/manifest.json").read_text())
    counts = mined["extra"]["mined"]["counts"]
    assert mined["num_samples"] == 48 - counts["dropped_for_positive_score"] > 0
    report = (own_data_run / "runs/mine-r2/shards/positive_refinement.jsonl").read_text().splitlines()
    assert len(report) == counts["positive_below_min_score"]
    second = torch.load(own_data_run / "runs/mine-r2/checkpoints/last.ckpt", weights_only=True)
    assert second["global_step"] == 4
