"""Backbone adapters on tiny random models of each family: prompts, mixed batches, truncation, loading."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig

from mme5.backbones import (
    ADAPTERS,
    IMAGE_INSTRUCTION,
    IMAGE_PLACEHOLDER,
    InputFormat,
    Item,
    adapter_for_model_type,
    load_backbone,
    load_backbone_skeleton,
    load_processing,
)
from mme5.backbones.tiny import build_tiny
from mme5.images import load_rgb

FAMILIES = sorted(ADAPTERS)


def noise_image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tmp_path_factory):
    """Each family built once, saved, and loaded back through `load_backbone` like a real checkpoint."""
    path = build_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=0, preset="test")
    return load_backbone(path)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, D) state of each row's last real token, whatever the padding side."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
    return hidden[torch.arange(len(hidden)), last]


def embed(adapter, items, model=None) -> torch.Tensor:
    batch = adapter.collate(items)
    with torch.no_grad():
        hidden = adapter.last_hidden_state(adapter.model if model is None else model, batch)
    return last_token(hidden, batch["attention_mask"])


def is_image_token(adapter, batch) -> torch.Tensor:
    return torch.isin(batch["input_ids"], torch.tensor(sorted(adapter.image_token_ids)))


def image_token_count(adapter, batch) -> list[int]:
    return is_image_token(adapter, batch).sum(1).tolist()


def test_load_backbone_dispatches_on_model_type(adapter):
    assert isinstance(adapter, ADAPTERS[adapter.family])
    assert adapter.model.config.model_type in adapter.model_types
    assert embed(adapter, [Item("a red circle")]).shape == (1, adapter.hidden_size)


def test_one_bos_per_row(adapter):
    """In Mllama's prompt; added by LLaVA's tokenizer; Qwen2-VL has none (exact strings: test_published)."""
    bos = adapter.tokenizer.bos_token_id
    ids = adapter.collate([Item("Represent the given image.", image=noise_image(0)), Item(text="A cat.")])
    if bos is not None:
        assert (ids["input_ids"] == bos).sum(1).tolist() == [1, 1]


def test_stray_placeholder_removed_and_no_double_image_tokens(adapter):
    img = noise_image(0)
    clean_text = Item("Find me an image for the caption:", "A cat.")
    stray = Item(f"{IMAGE_PLACEHOLDER}\nFind me an image for the caption:", f"A cat. {IMAGE_PLACEHOLDER}")
    assert adapter.prompt(stray) == adapter.prompt(clean_text)
    assert IMAGE_PLACEHOLDER not in adapter.prompt(stray)

    clean_image = Item("Represent the given image.", image=img)
    doubled = Item(f"{IMAGE_PLACEHOLDER}\nRepresent the given image.", image=img)
    assert adapter.prompt(doubled) == adapter.prompt(clean_image)
    batch = adapter.collate([doubled, clean_image, stray])
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    counts = image_token_count(adapter, batch)
    assert counts[0] == counts[1] > 0 and counts[2] == 0


def test_image_and_video_tokens_written_in_a_users_text_are_dropped(adapter):
    """A text that carries the family's own image or video tokens ("<image>" in a web page) would ask the
    processor for an image the item does not have (the batch fails) or get another row's vision features:
    they are dropped from instruction, text and verbatim prompt, as the published placeholder is."""
    reserved = adapter.reserved_tokens
    assert adapter.image_token in reserved
    token = reserved[0]
    written = token[:2] + "".join(reserved) + token[2:]  # a removal that joins two halves into a token
    img = noise_image(0)
    dirty = [Item("Find the caption:", f"a {written}cat"), Item(f"Represent{written} this:", "x", img),
             Item(prompt=f"{IMAGE_PLACEHOLDER}\nRepresent the {written}image.\n", image=img)]
    clean = [Item("Find the caption:", "a cat"), Item("Represent this:", "x", img),
             Item(prompt=f"{IMAGE_PLACEHOLDER}\nRepresent the image.\n", image=img)]
    assert [adapter.prompt(item) for item in dirty] == [adapter.prompt(item) for item in clean]
    torch.testing.assert_close(embed(adapter, dirty), embed(adapter, clean))


# Families whose tokenizer adds no bos: an item with neither text nor image has no token at all.
NO_BOS = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_onevision"}


def test_an_item_with_nothing_to_embed_is_refused_where_no_token_would_stand_for_it(adapter):
    """Without a token the model fails alone (an empty sequence) and pools a pad in a batch (a zero
    vector): refused by name. A family whose prompt starts with a bos embeds the bos."""
    empty = Item(text="")
    if adapter.family in NO_BOS:
        with pytest.raises(ValueError, match="neither text nor image gives the .* no token"):
            adapter.collate([Item(text="dog"), empty])
    else:
        torch.testing.assert_close(embed(adapter, [empty, Item(text="dog")])[0], embed(adapter, [empty])[0])


def test_mixed_batch_rowwise_equals_single_items(adapter):
    """Text-only and image rows of different lengths and image sizes in one batch: padding and alignment."""
    items = [
        Item("Find me an everyday image that matches the given caption:", "Un gato duerme en el sofá."),
        Item(f"{IMAGE_PLACEHOLDER}\nRepresent the given image.", image=noise_image(1, (40, 30))),
        Item("", "一只猫睡在小狗旁边的沙发上。", noise_image(2)),
        Item(text="dog"),
        Item("Represent the image with the following question:", "What is in the image?", noise_image(3)),
    ]
    together = embed(adapter, items)
    alone = torch.cat([embed(adapter, [it]) for it in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)

    # the pixels matter, so the check above would catch an image landing in the wrong row
    swapped = [*items[:2], Item("", items[2].text, items[4].image), *items[3:]]
    assert not torch.allclose(embed(adapter, swapped)[2], together[2], atol=1e-3)


def test_truncation_counts_text_tokens_only_and_keeps_image_tokens(adapter):
    """The "text" rule, on every family (each family's reference rule: tests/test_truncation.py)."""
    long_text = "A red circle and a blue square on a white background, next to a sleeping cat. " * 4
    items = [Item("Represent the given image.", long_text, noise_image(4)), Item("Caption:", long_text)]
    full = adapter.collate(items)
    short = type(adapter)(adapter.model, adapter.processor, InputFormat(max_length=12, truncation="text"))
    batch = short.collate(items)

    assert image_token_count(short, batch) == image_token_count(adapter, full)
    is_text = ~is_image_token(short, batch) & batch["attention_mask"].bool()
    assert is_text.sum(1).tolist() == [12, 12]
    for row, item in zip(batch["input_ids"], items, strict=True):
        kept = short.tokenizer.decode(row, skip_special_tokens=True).strip()
        body = item.published().removeprefix(IMAGE_PLACEHOLDER).strip()
        assert kept and body.startswith(kept)  # the end of the text is what goes
    assert embed(short, items).shape == (2, short.hidden_size)

    with pytest.raises(ValueError, match="max_length"):
        InputFormat(max_length=0)


def test_last_hidden_state_skips_lm_head_and_accepts_peft_wrapper(adapter):
    from peft import LoraConfig, get_peft_model

    items = [Item("Represent the given image.", image=noise_image(5)), Item(text="a blue square")]
    model = copy.deepcopy(adapter.model)
    model.lm_head.register_forward_hook(lambda *_: pytest.fail("lm_head must not run"))
    base = embed(adapter, items, model)

    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    torch.testing.assert_close(embed(adapter, items, peft_model), base)  # LoRA B starts at zero
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    assert not torch.allclose(embed(adapter, items, peft_model), base)  # the adapters are in the path


def test_load_processing_collates_like_the_full_adapter_and_pickles(adapter):
    """Dataloader workers get a processing-only adapter: same batches, no model to copy."""
    processing = pickle.loads(pickle.dumps(load_processing(adapter.model.name_or_path, adapter.input_format)))
    assert processing.model is None
    items = [Item("Represent the given image.", image=noise_image(6)), Item("Caption:", "Ein roter Kreis.")]
    expected, got = adapter.collate(items), processing.collate(items)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_unknown_model_type_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"'bert'.*supported model types.*'mllama'"):
        adapter_for_model_type("bert")
    BertConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json.*'bert'"):
        load_backbone(tmp_path)


def test_skeleton_has_the_architecture_and_no_weights(tiny_mllama):
    """What FSDP's non-zero ranks build before rank 0 broadcasts their shards."""
    loaded, skeleton = load_backbone(tiny_mllama), load_backbone_skeleton(tiny_mllama)
    shapes = {name: (p.shape, p.dtype) for name, p in loaded.model.named_parameters()}
    assert {name: (p.shape, p.dtype) for name, p in skeleton.model.named_parameters()} == shapes
    assert {p.device.type for p in skeleton.model.parameters()} == {"meta"}
    assert skeleton.prompt(Item("", "a caption")) == loaded.prompt(Item("", "a caption"))


def test_transparent_and_extreme_images_go_through_every_family(adapter):
    """A transparent PNG (decoded as training and evaluation decode it), a 300×1 and a 1×300 image."""
    rgba = Image.new("RGBA", (24, 16), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 12, 16))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    transparent = load_rgb(buffer.getvalue())
    assert transparent.getpixel((20, 8)) == (255, 255, 255) and transparent.getpixel((2, 8)) == (255, 0, 0)
    wide, tall = noise_image(7, (300, 1)), noise_image(8, (1, 300))
    for image, padded in ((wide, (300, 3)), (tall, (3, 300))):
        if adapter.target_size(image.size) == image.size:  # else resized first (test_reference_images)
            fitted = adapter.prepare_image(image)
            left, top = (fitted.width - image.width) // 2, (fitted.height - image.height) // 2
            content = fitted.crop((left, top, left + image.width, top + image.height))
            assert fitted.size == padded and content.tobytes() == image.tobytes()
    items = [Item(IMAGE_INSTRUCTION, image=image) for image in (transparent, wide, tall)]
    embeddings = embed(adapter, items)
    assert embeddings.shape == (3, adapter.hidden_size) and torch.isfinite(embeddings).all()


def test_qwen3_vl_expands_the_placeholder_per_merged_patch_and_feeds_deepstack(tmp_path):
    """Qwen3-VL: the bare `<|image_pad|>` becomes one token per 2x2 merged patch, without vision markers (the
    published rule), typed as image for the 3-D rope; the deepstack features (vision layers → first
    language layers) are in the embedding path."""
    adapter = load_backbone(build_tiny("qwen3_vl", tmp_path, seed=0, preset="test"))
    items = [Item(IMAGE_INSTRUCTION, image=noise_image(9, (64, 48))), Item(text="a red circle")]
    batch = adapter.collate(items)
    ((t, h, w),) = batch["image_grid_thw"].tolist()
    assert (t, h, w) == (1, 48 // 8, 64 // 8)  # one temporal patch of the image's 8 px patches (real: 16 px)
    image_id, ids = adapter.processor.image_token_id, batch["input_ids"][0].tolist()
    assert ids.count(image_id) == t * h * w // 4
    assert adapter.processor.vision_start_token_id not in ids
    assert batch["mm_token_type_ids"][0].tolist() == [int(i == image_id) for i in ids]

    before = embed(adapter, items)
    with torch.no_grad():
        for merger in adapter.model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    after = embed(adapter, items)
    assert not torch.allclose(after[0], before[0], atol=1e-4)  # the image row lost its deepstack features
    torch.testing.assert_close(after[1], before[1])  # the text row never had any


def test_qwen3_5_linear_attention_keeps_left_padding_out_of_its_state(tmp_path):
    """Qwen3.5's Gated-DeltaNet layers run a recurrence and a causal conv over every position: an item embeds
    the same alone and behind left padding (over 64 pads: more than one chunk of the chunked delta rule),
    whatever the pad token's embedding, and no conv or recurrent state is carried between calls."""
    adapter = load_backbone(build_tiny("qwen3_5", tmp_path, seed=0, preset="test"))
    layers = adapter.model.model.language_model.layers
    assert [layer.block_type for layer in layers] == ["linear_attention", "full_attention"]
    long_text = "A red circle and a blue square on a white background, next to a sleeping cat. " * 6
    items = [Item("Find me an everyday image that matches the given caption:", long_text), Item(text="dog"),
             Item(IMAGE_INSTRUCTION, image=noise_image(10, (40, 32)))]
    lengths = adapter.collate(items)["attention_mask"].sum(1).tolist()
    assert lengths[0] > 64 and lengths[0] - lengths[1] > 64

    caches = []
    layers[0].linear_attn.register_forward_pre_hook(lambda _, args, kwargs: caches.append(kwargs["cache"]),
                                                    with_kwargs=True)
    together = embed(adapter, items)
    torch.testing.assert_close(embed(adapter, items), together, atol=0, rtol=0)  # a re-forward: no state
    assert caches and all(cache is None for cache in caches)
    alone = torch.cat([embed(adapter, [it]) for it in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # pads only reach the state if unmasked: their embedding would then show
        adapter.model.model.language_model.embed_tokens.weight[adapter.tokenizer.pad_token_id].normal_(0, 10)
    torch.testing.assert_close(embed(adapter, items), together, atol=1e-5, rtol=1e-5)


def test_qwen3_5_fsdp_units_cover_both_layer_types(tmp_path):
    """mme5.sharding wraps the classes of `_no_split_modules`: every language layer, linear or full
    attention, and every vision block is one FSDP unit."""
    from mme5.sharding import transformer_blocks

    model = load_backbone(build_tiny("qwen3_5", tmp_path, seed=0, preset="demo")).model
    blocks = transformer_blocks(model, set(model._no_split_modules))
    layers, vision = model.model.language_model.layers, model.model.visual.blocks
    assert {layer.block_type for layer in layers} == {"linear_attention", "full_attention"}
    assert {id(m) for m in blocks} == {id(m) for m in (*layers, *vision)}

def test_llava_onevision_tiles_by_the_anyres_grid_and_max_grid_side_narrows_it(tmp_path):
    """LLaVA-OneVision: a 3:1 image takes the 1x3 grid resolution (the whole image + 3 tiles, one token per
    patch, a learned `image_newline` after each feature row); `max_grid_side` narrows the grid in processor
    and model alike (the model refuses a token count that its own grid does not give)."""
    path = build_tiny("llava_onevision", tmp_path, seed=0, preset="test")
    adapter = load_backbone(path)
    items = [Item(IMAGE_INSTRUCTION, image=noise_image(9, (96, 32))), Item(text="a red circle")]
    batch = adapter.collate(items)
    assert batch["image_sizes"].tolist() == [[32, 96]] and batch["batch_num_images"].tolist() == [1]
    assert batch["pixel_values"].shape[:2] == (1, 1 + 3)  # the whole image, then 3 tiles of 32 px
    patches = 4 * 4  # per 32 px tile of 8 px patches
    assert image_token_count(adapter, batch) == [patches + 3 * patches + 4, 0]  # + a newline per feature row

    before = embed(adapter, items)
    with torch.no_grad():
        adapter.model.model.image_newline.zero_()
    after = embed(adapter, items)
    assert not torch.allclose(after[0], before[0], atol=1e-4)  # the newline vectors are in the image row
    torch.testing.assert_close(after[1], before[1])

    narrow = load_backbone(path, input_format=InputFormat(max_grid_side=1))
    assert narrow.model.config.image_grid_pinpoints == [[32, 32]]
    narrow_batch = narrow.collate(items)
    assert narrow_batch["pixel_values"].shape[:2] == (1, 1 + 1)
    assert 0 < image_token_count(narrow, narrow_batch)[0] < image_token_count(adapter, batch)[0]
    assert torch.isfinite(embed(narrow, items)).all()
    with pytest.raises(ValueError, match="max_grid_side"):
        InputFormat(max_grid_side=0)


def test_gemma3_expands_the_image_marker_and_its_soft_tokens_attend_both_ways(tmp_path):
    """Gemma 3: `<start_of_image>` becomes the marker, `mm_tokens_per_image` soft tokens and `<end_of_image>`;
    `token_type_ids` (1 on the soft tokens, in every chunk, lockstep ones too) give them bidirectional
    attention, which is in the embedding path."""
    adapter = load_backbone(build_tiny("gemma3", tmp_path, seed=0, preset="test"))
    tok = adapter.tokenizer
    items = [Item(IMAGE_INSTRUCTION, image=noise_image(9, (64, 48))), Item(text="a red circle")]
    batch = adapter.collate(items)
    ids = batch["input_ids"][0].tolist()
    n = adapter.model.config.mm_tokens_per_image
    start = ids.index(tok.boi_token_id)
    assert ids[start + 1 : start + 2 + n] == [tok.image_token_id] * n + [tok.eoi_token_id]
    for chunk in [*adapter.chunks(items, 1), *adapter.chunks([items[1], None], 2, lockstep=True)]:
        soft = chunk.inputs["input_ids"] == tok.image_token_id
        assert torch.equal(chunk.inputs["token_type_ids"], soft.long())

    causal = {k: v for k, v in batch.items() if k != "token_type_ids"}
    with torch.no_grad():
        without = last_token(adapter.last_hidden_state(adapter.model, causal), batch["attention_mask"])
    together = embed(adapter, items)
    assert not torch.allclose(without[0], together[0], atol=1e-4)  # soft tokens saw the ones after them
    torch.testing.assert_close(without[1], together[1])  # a text row has none


def test_gemma3_pan_and_scan_is_off_whatever_the_processor_says(tmp_path):
    """One fixed-size image sequence per image, also from a processor whose call defaults ask for crops."""
    adapter = load_processing(build_tiny("gemma3", tmp_path, seed=0, preset="test"))
    processor = adapter.processor
    processor.images_kwargs = {**processor.images_kwargs, "do_pan_and_scan": True,
                               "pan_and_scan_min_crop_size": 8}
    wide = noise_image(10, (128, 16))
    asked = processor(text=["<start_of_image>"], images=[[wide]], return_tensors="pt")
    assert len(asked["pixel_values"]) > 1  # the setting is live: the processor would crop
    batch = type(adapter)(None, processor).collate([Item(IMAGE_INSTRUCTION, image=wide)])
    assert len(batch["pixel_values"]) == 1
    assert image_token_count(adapter, batch) == [processor.image_seq_length + 2]
