"""The public embedder: same numbers as the evaluation path, whatever the batching and input kinds."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_export import perturbed_checkpoint

import mme5
from mme5.backbones import Item, load_backbone
from mme5.checkpoint import load_encoder
from mme5.encoder import LoraSettings
from mme5.export import export

TEXTS = [f"{'a long ' * (i % 5)}caption number {i} of a {['red', 'blue', 'green'][i % 3]} object"
         for i in range(11)]
COLORS = [(40 * i % 256, 90, 200 - 15 * i) for i in range(11)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_mllama):
    root = tmp_path_factory.mktemp("embedder")
    ckpt = perturbed_checkpoint(tiny_mllama, root / "last.ckpt", LoraSettings(r=2, alpha=4, dropout=0.0))
    return export(ckpt, root / "exported"), ckpt


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, color in enumerate(COLORS):
        paths.append(root / f"{i}.png")
        Image.new("RGB", (20 + 3 * i, 24), color).save(paths[-1])
    return paths


def test_embeddings_equal_the_evaluation_path_in_input_order(exported, image_files):
    folder, _ = exported
    emb = mme5.Embedder.from_pretrained(folder, device="cpu")
    reference = load_encoder(folder).encoder.eval().embed
    images = [Image.open(p).convert("RGB") for p in image_files]
    cases = [
        ({"texts": TEXTS}, [Item("Find:", t) for t in TEXTS]),
        ({"images": image_files}, [Item("Find:", None, im) for im in images]),  # paths
        ({"texts": TEXTS, "images": images},
         [Item("Find:", t, im) for t, im in zip(TEXTS, images, strict=True)]),
    ]
    for kwargs, items in cases:
        got = emb.encode(**kwargs, instruction="Find:", batch_size=4)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (11, emb.dim)
        for i, item in enumerate(items):  # each item alone: no padding at all on the reference side
            torch.testing.assert_close(got[i], reference([item])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(11))


def test_independent_of_batch_size(exported, image_files):
    emb = mme5.Embedder.from_pretrained(exported[0], device="cpu")
    for kwargs in ({"texts": TEXTS}, {"texts": TEXTS, "images": image_files}):
        one, seven, many = (emb.encode(**kwargs, batch_size=b) for b in (1, 7, 32))
        torch.testing.assert_close(seven, one, atol=1e-5, rtol=0)
        torch.testing.assert_close(many, one, atol=1e-5, rtol=0)


def test_loads_a_checkpoint_and_a_backbone_folder(exported, tiny_mllama):
    folder, ckpt = exported
    from_ckpt = mme5.Embedder.from_pretrained(ckpt, device="cpu")
    assert from_ckpt.encoder.has_adapters
    torch.testing.assert_close(from_ckpt.encode(TEXTS[:3]),
                               mme5.Embedder.from_pretrained(folder).encode(TEXTS[:3]), atol=1e-5, rtol=0)
    zero_shot = mme5.Embedder.from_pretrained(tiny_mllama, dtype="float32", max_length=16)
    assert zero_shot.description["kind"] == "backbone" and zero_shot.encoder.adapter.max_length == 16
    assert zero_shot.encode(TEXTS[:2]).norm(dim=-1).allclose(torch.ones(2))


def test_a_hub_id_loads_from_the_hub_cache_offline(exported, tmp_path, monkeypatch):
    """`namespace/name` (as the released `intfloat/mmE5-mllama-11b-instruct`) through huggingface_hub's cache
    layout, offline as on a cluster node; an id that is not cached is a clear error naming HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-mme5" / "snapshots" / "0123abcd"
    shutil.copytree(exported[0], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = load_encoder("someone/tiny-mme5")
    assert from_hub.description["kind"] == "exported" and from_hub.description["path"] == str(snapshot)
    expected = mme5.Embedder.from_pretrained(exported[0]).encode(TEXTS[:2])
    torch.testing.assert_close(from_hub.encoder.embed([Item(text=t) for t in TEXTS[:2]]), expected)
    with pytest.raises(FileNotFoundError, match=r"someone/absent: no such folder here, and as a hub id.*"
                                                r"HF_HUB_OFFLINE=1"):
        load_encoder("someone/absent")
    # a backbone folder that is not there says so (not a hub connection error)
    with pytest.raises(FileNotFoundError, match="nowhere/backbone: no such file or folder"):
        load_backbone(tmp_path / "nowhere" / "backbone")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_encoder(tmp_path / "nowhere" / "model.ckpt")


def test_rejects_bad_inputs(exported):
    emb = mme5.Embedder.from_pretrained(exported[0], device="cpu")
    with pytest.raises(ValueError, match="give texts"):
        emb.encode()
    with pytest.raises(ValueError, match="pair up"):
        emb.encode(texts=["a", "b"], images=[Image.new("RGB", (8, 8))])
    assert emb.encode(texts=[]).shape == (0, emb.dim)
    with pytest.raises(TypeError, match="texts must be a list of strings.*wrap it"):
        emb.encode(texts="a red circle")  # not 12 embeddings, one per character
    for single in ("cat.png", Path("cat.png"), Image.new("RGB", (8, 8))):
        with pytest.raises(TypeError, match="images must be a list"):
            emb.encode(images=single)
