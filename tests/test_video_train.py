"""Training a video family end to end (issue 23): `train.py fit` on a tiny Qwen2-VL over shards mixing video,
image and document-page samples, with the gradient cache in chunks smaller than the batch; the run resumes
exactly, its checkpoint embeds a video the same whatever the batch, and a 2-process DDP step's gradient is
the full batch's."""

import io
import json

import pytest
import torch
from helpers import make_sample
from PIL import Image, ImageDraw
from test_resume import fit, write_recipe
from test_train import assert_same_gradients, full_batch_gradient, run_distributed, scalars

from mme5.backbones import Item
from mme5.checkpoint import load_encoder
from mme5.data.schema import Modality, Side
from mme5.data.shards import ShardWriter
from mme5.embedder import Embedder

# Video (caption retrieval, video retrieval, video QA), image and page modalities, in turn.
MIXED = [Modality.V2T, Modality.T2V, Modality.VT2T, Modality.I2T, Modality.IT2T, Modality.T2I]
# Images between 16 x 16 and 64 x 64 pixels: a 16 x 16 image or frame is one merged token, a page a grid.
PIXELS = ["--model.input_format.min_pixels", "256", "--model.input_format.max_pixels", "4096"]


def page_bytes(index: int, size: tuple[int, int] = (300, 420)) -> bytes:
    """A document page: lines of text on white, far larger than the pixel budget (resized under it)."""
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    for line in range(12):
        draw.text((12, 14 + 32 * line), f"page {index} line {line}: figures", fill=(index % 97, 0, 0))
    out = io.BytesIO()
    page.save(out, format="PNG")
    return out.getvalue()


def mixed_sample(index: int):
    """The `index`-th sample of the mix; a T2I sample's targets are pages retrieved by a text query."""
    modality = MIXED[index % len(MIXED)]
    sample = make_sample(index, modality, negatives=index % 2)
    if modality is Modality.T2I:
        sample.positive = Side(instruction="Represent the page.", image=page_bytes(index))
        sample.negatives = [Side(instruction="Represent the page.", image=page_bytes(index + 1000))
                            for _ in sample.negatives]
    return sample


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("video-shards")
    with ShardWriter(path, max_count=12) as writer:
        for i in range(36):
            writer.write(mixed_sample(i))
    return str(path)


@pytest.fixture(scope="module")
def qwen2_vl(tiny):
    return str(tiny("qwen2_vl"))


def train_run(root, backbone, shards, *args):
    """`train.py fit` of the tiny recipe with the gradient cache in chunks of 3 under a batch of 6."""
    recipe = write_recipe(root, backbone, shards)
    assert fit(recipe, "--data.batch_size", "6", "--model.chunk_size", "3", *PIXELS, *args) == 0
    return root


def weights(root):
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, qwen2_vl, video_shards):
    """Four steps of the mixed recipe: the run folder."""
    return train_run(tmp_path_factory.mktemp("trained") / "run", qwen2_vl, video_shards,
                     "--trainer.max_steps", "4")


def test_a_qwen2_vl_trains_on_video_image_and_page_samples_with_the_gradient_cache(trained):
    loss = scalars(trained / "tensorboard", "train/loss")
    assert [step for step, _ in loss] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(value)) for _, value in loss)
    assert torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    report = json.loads((trained / "data_report.json").read_text())
    assert report["skipped_samples"] == 0 and report["first_errors"] == []


def test_a_video_run_resumes_exactly(tmp_path, trained, qwen2_vl, video_shards):
    """Stopped at step 2 and resumed to 4 == 4 steps uninterrupted: weights and each step's logged loss."""
    resumed = train_run(tmp_path / "run", qwen2_vl, video_shards, "--trainer.max_steps", "2")
    train_run(resumed, qwen2_vl, video_shards, "--trainer.max_steps", "4", "--ckpt_path", "last")
    for tag in ("train/loss", "train/accuracy"):
        (steps, values), (straight_steps, straight_values) = (
            zip(*scalars(root / "tensorboard", tag), strict=True) for root in (resumed, trained))
        assert steps == straight_steps == (0, 1, 2, 3)
        assert values == pytest.approx(straight_values, rel=1e-5, abs=1e-6)
    straight, again = weights(trained), weights(resumed)
    assert straight.keys() == again.keys()
    for name, weight in straight.items():
        torch.testing.assert_close(again[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def video(seed: int, length: int, size: tuple[int, int]) -> tuple[Image.Image, ...]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (length, size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return tuple(Image.fromarray(frame.numpy()) for frame in pixels)


def test_the_trained_checkpoint_embeds_a_video_alone_as_in_any_batch(trained):
    """Videos of other lengths and shapes, beside images and texts: padding never leaks into a row."""
    checkpoint = trained / "checkpoints" / "last.ckpt"
    items = [Item("Represent the video.", video=video(0, 12, (32, 24))), Item("Find the clip:", "a dog runs"),
             Item("Represent the image.", image=video(1, 1, (48, 40))[0]),
             Item("Answer:", "what moves?", video=video(2, 3, (16, 48))),
             Item("Represent the video.", video=video(3, 9, (40, 40)))]
    encoder = load_encoder(checkpoint).encoder
    alone = torch.cat([encoder.embed([item]) for item in items])
    for batch_size in (2, 3, len(items)):
        torch.testing.assert_close(encoder.embed(items, batch_size=batch_size), alone, atol=1e-5, rtol=0)
    # Through the public API: a video is its frames, batched with the other inputs.
    embedder = Embedder.from_pretrained(checkpoint, device="cpu")
    videos = [i for i, item in enumerate(items) if item.video is not None]
    inputs = [{"text": items[i].text, "video": list(items[i].video)} if items[i].text else
              {"video": list(items[i].video)} for i in videos]
    expected = torch.cat([encoder.embed([Item("Represent the video.", items[i].text, video=items[i].video)])
                          for i in videos])
    got = embedder.encode(inputs, instruction="Represent the video.", batch_size=len(inputs),
                          normalize_embeddings=encoder.normalize)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow  # ~35 s: two processes started
def test_a_ddp_step_on_video_samples_has_the_full_batch_gradient(tmp_path, qwen2_vl, video_shards):
    record = run_distributed(tmp_path, qwen2_vl, video_shards, "ddp")
    assert len(record["ids"]) == 2 and not set(record["ids"][0]) & set(record["ids"][1])
    trained_on = {MIXED[int(i.removeprefix("s")) % len(MIXED)] for ids in record["ids"] for i in ids}
    assert {Modality.V2T, Modality.T2V, Modality.VT2T} <= trained_on  # no video sample was skipped
    assert_same_gradients(record, full_batch_gradient(qwen2_vl, video_shards, record))
