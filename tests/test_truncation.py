"""Truncation rules (`InputFormat.truncation`): each preset cuts a long item as its reference code does."""

from dataclasses import asdict

import pytest
from PIL import Image

from mme5.backbones import IMAGE_PLACEHOLDER, InputFormat, Item, load_processing
from mme5.backbones.presets import PRESETS
from mme5.checkpoint import _input_format

LONG = "A red circle and a blue square on a white background, next to a sleeping cat. " * 30
IMAGE = Image.new("RGB", (64, 48), "white")
ITEMS = [Item("Represent the given image with the following question:", LONG, IMAGE),
         Item("Find me an everyday image that matches the given caption:", LONG)]


def adapter_for(tiny, family: str, **fmt):
    return load_processing(tiny(family), InputFormat(**fmt))


def rows(batch) -> list[list[int]]:
    """Each row's ids without its (left) padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                              strict=True)]


@pytest.mark.parametrize(("preset", "family", "rule"), [
    ("mme5", "mllama", "sequence"), ("mme5", "llava", "none"), ("mme5", "qwen2_vl", "none"),
    ("mme5", "qwen2_5_vl", "none"), ("vlm2vec_v2", "qwen2_vl", "none"), ("vlm2vec_v2", "qwen2_5_vl", "none"),
    ("vlm2vec_v1", "qwen2_vl", "none"), ("vlm2vec_v1", "llava", "none"), ("gme", "qwen2_vl", "text"),
    ("qwen3_vl_embedding", "qwen3_vl", "text"), ("llave", "llava_onevision", "text"),
    ("mme5", "gemma3", "text"), ("mme5", "qwen3_vl", "text"), ("mme5", "llava_onevision", "text")])
def test_each_preset_names_its_references_rule_per_family(preset, family, rule):
    """mmE5 cuts Mllama's whole sequence and never LLaVA-NeXT's; VLM2Vec (v1 and V2) never cuts; GME,
    Qwen3-VL-Embedding, LLaVE and the families without a known reference keep the text rule."""
    assert PRESETS[preset].truncation_for(family) == rule


def test_mllama_cuts_the_whole_sequence_at_max_length_as_the_mme5_collator(tiny):
    """mmE5's `LlamaCollator`: the published string with "<|image_1|>\\n" replaced by
    "<|image|><|begin_of_text|>" (a text item: the bos in front, as MllamaProcessor adds it), tokenized
    whole and cut to its first max_len ids; the image token and the bos count."""
    adapter = adapter_for(tiny, "mllama", max_length=256)
    assert adapter.input_format.truncation == "sequence"
    strings = [ITEMS[0].published().replace(IMAGE_PLACEHOLDER + "\n", "<|image|><|begin_of_text|>"),
               "<|begin_of_text|>" + ITEMS[1].published()]
    # The real Llama-3.2-Vision tokenizer adds no bos of its own (transformers' MllamaConverter).
    full = [adapter.tokenizer(s, add_special_tokens=False).input_ids for s in strings]
    assert all(len(ids) > 257 for ids in full)

    batch = adapter.collate(ITEMS)
    assert rows(batch) == [ids[:256] for ids in full]
    assert batch["cross_attention_mask"].shape[1] == 256
    assert adapter.truncated_count() == 2
    adapter.collate([Item("Caption:", "a cat")])
    assert adapter.truncated_count() == 2  # a short item is not counted


def test_the_text_rule_stays_as_a_setting_and_gives_mllama_257_tokens(tiny):
    """The earlier rule: 256 text tokens, the image token besides (257 for an image item)."""
    adapter = adapter_for(tiny, "mllama", max_length=256, truncation="text")
    batch = adapter.collate(ITEMS)
    assert [len(ids) for ids in rows(batch)] == [257, 256]
    assert rows(batch)[0][:2] == adapter.tokenizer("<|image|><|begin_of_text|>",
                                                   add_special_tokens=False).input_ids
    assert adapter.truncated_count() == 2
    assert asdict(adapter.input_format)["truncation"] == "text"  # as checkpoints and exports record it


@pytest.mark.parametrize(("family", "preset", "image"), [
    ("llava", "mme5", "<image>"), ("qwen2_vl", "mme5", "<|image_pad|>"), ("qwen2_5_vl", "vlm2vec_v2", None)])
def test_references_that_never_cut_keep_every_id(tiny, family, preset, image):
    """mmE5's LLaVA-NeXT branch and VLM2Vec's `Qwen2_VL_process_fn` (max_len None) hand the processor the
    whole string: every id of it, however long, and nothing counted."""
    adapter = adapter_for(tiny, family, preset=preset, max_length=16)
    assert adapter.input_format.truncation == "none"
    if image is None:  # VLM2Vec-V2's own string (src/model/processor.py `process_input_text`)
        strings = [f"<|image_pad|> {ITEMS[0].instruction} {LONG.strip()}",
                   f"{ITEMS[1].instruction} {LONG.strip()}"]
    else:  # the published string, its placeholder replaced
        strings = [item.published().replace(IMAGE_PLACEHOLDER, image) for item in ITEMS]
    whole = [rows(adapter.processor(text=[s], images=[IMAGE] if i == 0 else None, return_tensors="pt"))[0]
             for i, s in enumerate(strings)]
    assert sum(i not in adapter.image_token_ids for i in whole[1]) > 16

    assert rows(adapter.collate(ITEMS)) == whole
    assert adapter.truncated_count() == 0


def test_an_unknown_rule_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown truncation 'middle'; known: sequence, text, none"):
        InputFormat(truncation="middle")


def test_a_sequence_cut_that_could_split_image_tokens_or_the_frame_is_refused(tiny):
    with pytest.raises(ValueError, match=r"'sequence' on the qwen2_vl family: the processor expands"):
        adapter_for(tiny, "qwen2_vl", truncation="sequence")
    with pytest.raises(ValueError, match=r"'sequence' on the mllama family: max_length=1 would cut"):
        adapter_for(tiny, "mllama", max_length=1, truncation="sequence")


def test_checkpoints_recorded_before_the_rules_keep_the_text_rule():
    """A format recorded without `truncation` was cut by the text rule; one recording None (the preset's
    reference) keeps None, which the adapter resolves."""
    assert _input_format({"max_length": 64, "preset": "mme5"}, None).truncation == "text"
    assert _input_format({"max_length": 64, "preset": "mme5", "truncation": None}, None).truncation is None
    assert _input_format(None, None).truncation is None
