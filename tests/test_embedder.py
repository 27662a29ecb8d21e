"""The public embedder: same numbers as the evaluation path, whatever the batching and input kinds."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_pngs
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
    return write_pngs(tmp_path_factory.mktemp("images"), COLORS)


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
    for path in (folder, ckpt, tiny_mllama):  # an exported folder, a .ckpt and a backbone take num_frames
        embedder = mme5.Embedder.from_pretrained(path, num_frames=64)
        assert embedder.encoder.adapter.input_format.num_frames == 64
    assert mme5.Embedder.from_pretrained(folder).encoder.adapter.input_format.num_frames == 8  # the default


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


def test_rejects_bad_inputs(exported, image_files, tmp_path):
    emb = mme5.Embedder.from_pretrained(exported[0], device="cpu")
    with pytest.raises(ValueError, match="give inputs, texts"):
        emb.encode()
    with pytest.raises(ValueError, match="pair up"):
        emb.encode(texts=["a", "b"], images=[Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="not both"):
        emb.encode(["a"], texts=["b"])
    assert emb.encode(texts=[]).shape == (0, emb.dim)
    assert emb.encode([]).shape == (0, emb.dim)
    with pytest.raises(TypeError, match="texts must be a list of strings.*wrap it"):
        emb.encode(texts="a red circle")  # not 12 embeddings, one per character
    with pytest.raises(TypeError, match="inputs must be a list, got one str"):
        emb.encode("a red circle")
    for single in ("cat.png", Path("cat.png"), Image.new("RGB", (8, 8))):
        with pytest.raises(TypeError, match="images must be a list"):
            emb.encode(images=single)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("just text")
    bad = [
        (["ok", None], TypeError, r"inputs\[1\]: expected a string.*got NoneType None"),
        (["ok", "fine", Path(tmp_path / "missing.png")], FileNotFoundError,
         r"inputs\[2\]: image file '.*missing.png' does not exist"),
        ([{"image": str(not_an_image)}], OSError, r"inputs\[0\] \(.*notes.png\): not a readable image"),
        ([{"text": "a", "img": "x.png"}], ValueError, r"inputs\[0\]: a dict input has the keys"),
        ([{"text": 3}], TypeError, r"inputs\[0\]: 'text' must be a string"),
        ([{"text": None, "image": None}], ValueError, r"inputs\[0\]: 'text', 'image' and 'video' are all"),
        ([image_files[0], {"image": "http://127.0.0.1:9/cat.png"}], ConnectionError,
         r"inputs\[1\]: could not download image http://127.0.0.1:9/cat.png .*offline"),
    ]
    for inputs, error, message in bad:
        with pytest.raises(error, match=message):
            emb.encode(inputs)


def test_mixed_inputs_in_one_call_equal_the_same_items_alone(exported, image_files):
    """Strings, PIL images, paths and dicts in one list (Mllama batches text-only and image rows together);
    each row equals its item embedded alone, and equals the texts=/images= spelling."""
    emb = mme5.Embedder.from_pretrained(exported[0], device="cpu")
    picture = Image.open(image_files[1]).convert("RGB")
    inputs = [TEXTS[0], picture, image_files[2], {"text": TEXTS[3], "image": str(image_files[3])},
              {"text": TEXTS[4]}, {"image": image_files[5]}]
    got = emb.encode(inputs, instruction="Find:", batch_size=4)
    alone = [emb.encode([value], instruction="Find:")[0] for value in inputs]
    torch.testing.assert_close(got, torch.stack(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[3], emb.encode(texts=[TEXTS[3]], images=[image_files[3]],
                                                   instruction="Find:")[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], emb.encode(images=[picture], prompt="Find:")[0], atol=1e-5, rtol=0)


def test_strings_naming_images_are_images_as_in_sentence_transformers(exported, image_files):
    """An existing image file's path and a data:image URI are images; other strings (a missing file's name
    too) are text."""
    import base64

    emb = mme5.Embedder.from_pretrained(exported[0], device="cpu")
    data_uri = "data:image/png;base64," + base64.b64encode(image_files[0].read_bytes()).decode()
    got = emb.encode([str(image_files[0]), data_uri, "nowhere/cat.png"])
    expected = emb.encode([image_files[0], image_files[0], {"text": "nowhere/cat.png"}])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"inputs\[0\]: a data:image URI that is not base64"):
        emb.encode(["data:image/png;base64,@@@"])


def test_query_and_document_instructions_numpy_and_unnormalised(exported, tmp_path):
    folder, ckpt = exported
    with_instructions = export(ckpt, tmp_path / "instructed", query_instruction="Find a caption:",
                               target_instruction="Represent the given image.")
    emb = mme5.Embedder.from_pretrained(with_instructions, device="cpu")
    assert emb.instructions == {"query": "Find a caption:", "target": "Represent the given image."}
    torch.testing.assert_close(emb.encode_query(TEXTS[:2]),
                               emb.encode(TEXTS[:2], instruction="Find a caption:"))
    torch.testing.assert_close(emb.encode_document(TEXTS[:2]),
                               emb.encode(TEXTS[:2], instruction="Represent the given image."))
    torch.testing.assert_close(emb.encode_query(TEXTS[:2], prompt="Other:"),
                               emb.encode(TEXTS[:2], prompt="Other:"))
    assert not torch.allclose(emb.encode_query(TEXTS[:2]), emb.encode(TEXTS[:2]))  # the instruction is used
    as_numpy = emb.encode(TEXTS[:3], convert_to_numpy=True, show_progress_bar=True)
    assert as_numpy.dtype == "float32" and as_numpy.shape == (3, emb.dim)
    raw = emb.encode(TEXTS[:3], normalize_embeddings=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), torch.from_numpy(as_numpy))
    assert emb.encoder.normalize  # restored
    scores = emb.similarity(as_numpy, raw)
    torch.testing.assert_close(scores, torch.from_numpy(as_numpy) @ torch.from_numpy(as_numpy).T)
    assert emb.similarity(raw[0], raw).shape == (1, 3)
