"""Input-format presets of released embedders (mme5.backbones.presets), token for token.

Every expected string below is written by hand from the reference code cited in each preset's template
docstring, not from the project's output; the expected ids are what the real processor classes of the tiny
backbones make of those strings (called as the references call them).
"""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mme5.backbones import InputFormat, Item, load_processing, resolve_preset
from mme5.backbones.presets import PRESETS, detect
from mme5.checkpoint import EXPORT_CONFIG, load_encoder, save_model_folder

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def adapter_for(tiny, family: str, **fmt):
    return load_processing(tiny(family), InputFormat(**fmt))


def _gme(system: str, user: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>")


def _qwen3(system: str, user: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def _llave(user: str) -> str:
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}"
            "<|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n")


# (preset, families, item, expected prompt)
CASES = [
    ("vlm2vec_v2", ("qwen2_vl", "qwen2_5_vl"),
     Item("Find a document image that matches the given query:", "what was the revenue?"),
     "Find a document image that matches the given query: what was the revenue?"),
    ("vlm2vec_v2", ("qwen2_vl", "qwen2_5_vl"),
     Item("Understand the content of the provided document image.", image=IMAGE),
     "<|image_pad|> Understand the content of the provided document image."),
    ("vlm2vec_v2", ("qwen2_vl",), Item(text="tench"), " tench"),  # process_input_text("", text="tench")
    ("vlm2vec_v2", ("qwen2_5_vl",),  # an MMEB image row keeps its V1 string
     Item(prompt="<|image_1|>\nRepresent the given image for classification\n", image=IMAGE),
     "<|image_pad|>\nRepresent the given image for classification\n"),
    ("vlm2vec_v1", ("qwen2_vl",), Item(prompt="<|image_1|>\nRepresent the given image.\n", image=IMAGE),
     "<|image_pad|>\nRepresent the given image.\n"),
    ("vlm2vec_v1", ("llava",), Item(prompt="<|image_1|>\nRepresent the given image.\n", image=IMAGE),
     "<image>\nRepresent the given image.\n"),
    ("gme", ("qwen2_vl",), Item("Find an image that matches the given text.", "A cat on a sofa."),
     _gme("Find an image that matches the given text.", "A cat on a sofa.")),
    ("gme", ("qwen2_vl",), Item(image=IMAGE), _gme("You are a helpful assistant.", VISION)),
    ("gme", ("qwen2_vl",), Item("", "A cat.", IMAGE),
     _gme("You are a helpful assistant.", VISION + "A cat.")),
    ("qwen3_vl_embedding", ("qwen3_vl",),
     Item("Retrieve images or text relevant to the user's query", "A woman and her dog."),
     _qwen3("Retrieve images or text relevant to the user's query.", "A woman and her dog.")),
    ("qwen3_vl_embedding", ("qwen3_vl",), Item(image=IMAGE), _qwen3("Represent the user's input.", VISION)),
    ("qwen3_vl_embedding", ("qwen3_vl",), Item("Is this it?", "Yes", IMAGE),
     _qwen3("Is this it?", VISION + "Yes")),
    ("qwen3_vl_embedding", ("qwen3_vl",), Item(), _qwen3("Represent the user's input.", "NULL")),
    ("llave", ("llava_onevision",), Item(
        prompt="<|image_1|>\nRepresent the given image with the following question: What is in the image\n",
        image=IMAGE),
     _llave("<image>\nRepresent the given image with the following question: What is in the image\n")),
    ("llave", ("llava_onevision",), Item(prompt="A cat and a dog"), _llave("A cat and a dog")),
]
PARAMS = [pytest.param(name, family, item, expected, id=f"{name}-{family}-{i}")
          for i, (name, families, item, expected) in enumerate(CASES) for family in families]
POOLED = {"vlm2vec_v2": None, "vlm2vec_v1": "Ċ", "gme": "<|endoftext|>", "qwen3_vl_embedding": "Ċ",
          "llave": "Ċ"}  # the last (pooled) token; vlm2vec_v2: the text's own last token


def reference_image(name: str) -> Image.Image:
    """The image as the reference feeds its processor: VLM2Vec V1 resizes it to 1344x1344 first."""
    return IMAGE.resize((1344, 1344)) if name == "vlm2vec_v1" else IMAGE


@pytest.mark.parametrize(("name", "family", "item", "expected"), PARAMS)
def test_preset_writes_the_reference_prompt_and_ids(tiny, name, family, item, expected):
    adapter = adapter_for(tiny, family, preset=name)
    assert adapter.prompt(item) == expected
    batch = adapter.collate([item])
    image = [reference_image(name)] if item.image is not None else None
    reference = adapter.processor(text=[expected], images=image, return_tensors="pt")
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
    if image is not None:
        torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    last = adapter.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, -1:].tolist())[0]
    assert POOLED[name] in (None, last)


@pytest.mark.parametrize(("name", "family", "bounds"), [
    ("vlm2vec_v2", "qwen2_5_vl", (28 * 28 * 4, 28 * 28 * 1280)),
    ("gme", "qwen2_vl", (256 * 28 * 28, 1280 * 28 * 28)),
    ("qwen3_vl_embedding", "qwen3_vl", (4 * 32 * 32, 1800 * 32 * 32)),
])
def test_preset_sets_the_reference_pixel_bounds_unless_the_format_does(tiny, name, family, bounds):
    size = adapter_for(tiny, family, preset=name).processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == bounds
    own = adapter_for(tiny, family, preset=name, max_pixels=2 * bounds[1]).processor.image_processor.size
    assert own["longest_edge"] == 2 * bounds[1]


LONG = "A red circle and a blue square on a white background, next to a sleeping cat. " * 20


@pytest.mark.parametrize(("name", "family"), [("gme", "qwen2_vl"), ("qwen3_vl_embedding", "qwen3_vl"),
                                              ("llave", "llava_onevision"), ("vlm2vec_v2", "qwen2_5_vl")])
def test_truncation_keeps_head_and_tail_and_every_image_token(tiny, name, family):
    """The "text" rule (VLM2Vec-V2's own is "none": tests/test_truncation.py)."""
    full = adapter_for(tiny, family, preset=name, truncation="text")
    short = adapter_for(tiny, family, preset=name, max_length=200, truncation="text")  # a long tiny frame
    items = [Item("Find the image of the following caption:", LONG, IMAGE), Item("Caption:", LONG)]
    whole, cut = full.collate(items), short.collate(items)
    image_id = short.processor.image_token_id
    assert (cut["input_ids"] == image_id).sum(1).tolist() == (whole["input_ids"] == image_id).sum(1).tolist()
    is_text = (cut["input_ids"] != image_id) & cut["attention_mask"].bool()
    assert is_text.sum(1).tolist() == [200, 200]
    assert short.truncated_count() == 2
    for item in items:
        head, body, tail = full.prompt_parts(item)
        prompt = short.truncated_prompt(item)
        assert prompt.startswith(head) and prompt.endswith(tail) and len(prompt) < len(head + body + tail)
    if full.prompt_parts(items[0]).tail:  # the pooled end token is still the last one
        assert torch.equal(cut["input_ids"][:, -1], whole["input_ids"][:, -1])


def test_a_max_length_shorter_than_the_chat_frame_is_refused_before_any_item(tiny):
    """The frame (with the default instruction) is checked when the adapter is made, so that a run is
    refused before it writes; an instruction that makes one item's system turn too long refuses that item."""
    with pytest.raises(ValueError, match=r"max_length=3 is shorter than the fixed part .* \(\d+ tokens"):
        adapter_for(tiny, "qwen2_vl", preset="gme", max_length=3)
    fits = adapter_for(tiny, "qwen2_vl", preset="gme", max_length=60)  # the tiny BPE spells the frame long
    assert fits.truncated_prompt(Item("Find:", LONG)).endswith("<|endoftext|>")
    with pytest.raises(ValueError, match=r"max_length=60 .* preset 'gme': head .*, tail '<\|im_end\|>"):
        fits.truncated_prompt(Item(LONG, "a cat"))


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_max_grid_side_is_refused_on_a_family_without_an_anyres_grid(tiny, family):
    """Refused rather than ignored: a recipe copied from LLaVA-OneVision must not seem to narrow a grid."""
    with pytest.raises(ValueError, match=f"max_grid_side .* the {family} family has none"):
        adapter_for(tiny, family, max_grid_side=2)
    assert adapter_for(tiny, "llava_onevision", max_grid_side=2).input_format.max_grid_side == 2


def test_a_preset_is_refused_on_another_family_naming_its_families(tiny):
    with pytest.raises(ValueError, match=r"'gme'.*qwen2_vl, not to 'llava'"):
        adapter_for(tiny, "llava", preset="gme")
    with pytest.raises(ValueError, match="known: mme5, vlm2vec_v2"):
        InputFormat(preset="clip")
    assert InputFormat().preset is None and adapter_for(tiny, "llava").input_format.preset == "mme5"


@pytest.mark.parametrize(("files", "expected"), [
    ({"gme_inference.py": "class GmeQwen2VL: ...\n"}, "gme"),
    ({"README.md": "# Qwen3-VL-Embedding-2B\n"}, "qwen3_vl_embedding"),
    ({"README.md": "# VLM2Vec-V2.0\nVLM2Vec-V2 on Qwen2-VL\n"}, "vlm2vec_v2"),
    ({"README.md": "# VLM2Vec-Qwen2VL-2B\nVLM2Vec, trained on MMEB-train\n"}, "vlm2vec_v1"),
    ({"README.md": "# LLaVE-0.5B\n"}, "llave"),
    ({EXPORT_CONFIG: json.dumps({"input_format": {"preset": "gme"}}), "README.md": "LLaVE"}, "gme"),
    ({EXPORT_CONFIG: json.dumps({"input_format": {"max_length": 64}})}, "mme5"),  # written before presets
    ({"README.md": "# Qwen2-VL-2B-Instruct\n"}, None),
])
def test_detect_reads_the_preset_from_the_model_files(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    found = detect(tmp_path)
    assert (found and found.name) == expected
    if found:
        assert str(tmp_path) in found.reason


@pytest.mark.parametrize(("family", "card", "expected"), [
    ("qwen3_vl", "Beats VLM2Vec-V2 and GME", "mme5"),  # another family's embedders, compared with
    ("qwen3_5", "Distilled from Qwen3-VL-Embedding", "mme5"),
    ("gemma3", "Better than Qwen3-VL-Embedding", "mme5"),
    ("llava_onevision", "Compared with VLM2Vec, LLaVE is ...", "llave"),  # its family's mark, not the first
    ("qwen2_5_vl", "Trained as VLM2Vec-V2", "vlm2vec_v2"),
])
def test_a_card_naming_an_embedder_of_another_family_loads_the_model(tiny, tmp_path, family, card, expected):
    """Detection reads only the marks of presets that apply to the model's family: a user who never named
    a preset is not refused because the card mentions another family's embedder."""
    folder = shutil.copytree(tiny(family), tmp_path / family)
    (folder / "README.md").write_text(f"# My embedder\n{card}\n", encoding="utf-8")
    if family == "qwen2_5_vl":
        (folder / "gme_inference.py").write_text("", encoding="utf-8")  # GME's mark: a qwen2_vl preset
    assert load_processing(folder).preset.name == expected


def test_an_explicit_preset_wins_and_a_mismatch_warns(tmp_path):
    (tmp_path / "gme_inference.py").write_text("", encoding="utf-8")
    assert resolve_preset(tmp_path, None, "qwen2_vl").preset == "gme"
    assert resolve_preset(tmp_path, InputFormat(max_length=9), "qwen2_vl") == InputFormat(max_length=9,
                                                                                          preset="gme")
    with pytest.warns(UserWarning, match="'vlm2vec_v2' was asked for, but .*gme_inference.py.* 'gme'"):
        assert resolve_preset(tmp_path, InputFormat(preset="vlm2vec_v2"), "qwen2_vl").preset == "vlm2vec_v2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_preset(tmp_path, InputFormat(preset="gme"), "qwen2_vl").preset == "gme"


def test_the_preset_travels_from_the_model_files_to_an_export_and_back(tiny, tmp_path):
    """A released GME folder (its gme_inference.py) loads with GME's format; the export records it and
    loads with it, embedding alike; an explicit preset overrides, and the registry lists every preset."""
    backbone = shutil.copytree(tiny("qwen2_vl"), tmp_path / "gme")
    (backbone / "gme_inference.py").write_text("", encoding="utf-8")
    loaded = load_encoder(backbone)
    assert loaded.encoder.adapter.preset.name == loaded.description["input_format"]["preset"] == "gme"
    save_model_folder(tmp_path / "export", loaded.encoder, {}, {"backbone": str(backbone)})
    recorded = json.loads((tmp_path / "export" / EXPORT_CONFIG).read_text())["input_format"]
    assert recorded["preset"] == "gme" and recorded["image_token"] == VISION
    exported = load_encoder(tmp_path / "export")
    assert exported.encoder.adapter.prompt(Item(image=IMAGE)) == _gme("You are a helpful assistant.", VISION)
    items = [Item("Find the image:", "a cat"), Item(image=IMAGE)]
    torch.testing.assert_close(exported.encoder.eval().embed(items), loaded.encoder.eval().embed(items))
    with pytest.warns(UserWarning, match="records it 'gme'"):
        assert load_encoder(tmp_path / "export", preset="mme5").encoder.adapter.preset.name == "mme5"
    assert set(PRESETS) == {"mme5", "vlm2vec_v2", "vlm2vec_v1", "gme", "qwen3_vl_embedding", "llave"}



def test_llave_narrows_the_anyres_grid_to_its_two_by_two_tiles(tiny):
    """LLaVE trains on (1x1)..(2x2) grids: its preset narrows the grid unless the format says otherwise."""
    def widest(**fmt):
        grid = adapter_for(tiny, "llava_onevision", **fmt).processor.image_processor.image_grid_pinpoints
        return max(max(h, w) for h, w in grid) // 32  # tiles of 32 px in the tiny build

    assert (widest(), widest(preset="llave"), widest(preset="llave", max_grid_side=1)) == (3, 2, 1)


@pytest.mark.parametrize(("name", "family", "expected"), [
    ("mme5", "mllama", 256),  # mmE5's scripts: --max_len 256
    ("gme", "qwen2_vl", 1800),  # gme_inference.py: GmeQwen2VL(max_length=1800)
    ("qwen3_vl_embedding", "qwen3_vl", 8192),  # qwen3_vl_embedding.py: MAX_LENGTH = 8192
    ("llave", "llava_onevision", 4096),  # LLaVE train.py: model_max_length 4096
])
def test_a_preset_defaults_to_its_references_max_length_and_a_recipes_own_wins(name, family, expected):
    assert InputFormat(preset=name).completed(family).max_length == expected
    assert InputFormat(preset=name, max_length=64).completed(family).max_length == 64


def test_a_detected_preset_gives_its_max_length_to_the_adapter(tiny, tmp_path):
    folder = shutil.copytree(tiny("qwen2_vl"), tmp_path / "gme")
    (folder / "gme_inference.py").write_text("", encoding="utf-8")
    assert load_processing(folder).max_length == 1800
