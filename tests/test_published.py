"""Parity with the reference input format (mme5.md §3 "Exact input format").

Every expected string below is written by hand from the reference rules, not from the project's output:
- mmE5 collator (mllama): `"<|image_1|>\\n"` becomes `<|image|><|begin_of_text|>` with an image and
  `<|begin_of_text|>` without; the processor puts `<|begin_of_text|>` in front of a string without one and
  adds no second one; the rest of the published string is kept, trailing newline included.
- VLM2Vec (qwen2_vl, llava): only `<|image_1|>` is replaced (a bare `<|image_pad|>`; `<image>`).
- gemma3 (no public embedder): the same rule with Gemma 3's image marker `<start_of_image>`, which its
  processor expands to "\n\n", the marker, the soft tokens, `<end_of_image>`, "\n\n".
The expected token ids are what the real transformers processor classes make of the expected strings, called
as the reference calls them; the project's ids must equal them id for id.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mme5 import published
from mme5.backbones import ADAPTERS, InputFormat, Item, load_processing
from mme5.backbones.tiny import build_tiny
from mme5.data.collate import side_item
from mme5.data.convert import ConversionReport, RowConverter
from mme5.data.schema import Task
from mme5.eval.encode import _loaded
from mme5.eval.images import ImageStore
from mme5.eval.retrieval import SetBuilder
from mme5.eval.rows import add_rows
from mme5.eval.xtd import TEXT_INSTRUCTION

FAMILIES = sorted(ADAPTERS)
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")

# (name, published string, has image) → expected prompt per family
ROWS = [
    ("classification query", "<|image_1|>\nRepresent the given image for classification\n", True, {
        "mllama": "<|image|><|begin_of_text|>Represent the given image for classification\n",
        "qwen2_vl": "<|image_pad|>\nRepresent the given image for classification\n",
        "llava": "<image>\nRepresent the given image for classification\n",
        "gemma3": "<start_of_image>\nRepresent the given image for classification\n"}),
    ("bare text target", "tench", False, {
        "mllama": "<|begin_of_text|>tench", "qwen2_vl": "tench", "llava": "tench", "gemma3": "tench"}),
    ("text query with trailing space", "Find me an everyday image that matches the given caption: A man on a "
     "moped. \n", False, {
         "mllama": "<|begin_of_text|>Find me an everyday image that matches the given caption: A man on a "
                   "moped. \n",
         "qwen2_vl": "Find me an everyday image that matches the given caption: A man on a moped. \n",
         "llava": "Find me an everyday image that matches the given caption: A man on a moped. \n",
         "gemma3": "Find me an everyday image that matches the given caption: A man on a moped. \n"}),
    ("image target", "<|image_1|>\nRepresent the given image.\n", True, {
        "mllama": "<|image|><|begin_of_text|>Represent the given image.\n",
        "qwen2_vl": "<|image_pad|>\nRepresent the given image.\n",
        "llava": "<image>\nRepresent the given image.\n",
        "gemma3": "<start_of_image>\nRepresent the given image.\n"}),
    ("vqa query",
     "<|image_1|>\nRepresent the given image with the following question: What is on the table?\n", True, {
         "mllama": "<|image|><|begin_of_text|>Represent the given image with the following question: What is "
                   "on the table?\n",
         "qwen2_vl": "<|image_pad|>\nRepresent the given image with the following question: What is on the "
                     "table?\n",
         "llava": "<image>\nRepresent the given image with the following question: What is on the table?\n",
         "gemma3": "<start_of_image>\nRepresent the given image with the following question: What is on the "
                   "table?\n"}),
    ("image+text target", "<|image_1|>\nRepresent the given Wikipedia image with related text information: "
     "Eiffel Tower. A wrought-iron lattice tower.\n", True, {
         "mllama": "<|image|><|begin_of_text|>Represent the given Wikipedia image with related text "
                   "information: Eiffel Tower. A wrought-iron lattice tower.\n",
         "qwen2_vl": "<|image_pad|>\nRepresent the given Wikipedia image with related text information: "
                     "Eiffel Tower. A wrought-iron lattice tower.\n",
         "llava": "<image>\nRepresent the given Wikipedia image with related text information: Eiffel Tower. "
                  "A wrought-iron lattice tower.\n",
         "gemma3": "<start_of_image>\nRepresent the given Wikipedia image with related text information: "
                   "Eiffel Tower. A wrought-iron lattice tower.\n"}),
    ("stray placeholder on a text-only query", "<|image_1|>\nFind a passage that answers: ¿Dónde está el "
     "gato?\n", False, {
         "mllama": "<|begin_of_text|>Find a passage that answers: ¿Dónde está el gato?\n",
         # the VLM2Vec rule would leave an image token without an image (the processor raises): dropped
         "qwen2_vl": "Find a passage that answers: ¿Dónde está el gato?\n",
         "llava": "Find a passage that answers: ¿Dónde está el gato?\n",
         "gemma3": "Find a passage that answers: ¿Dónde está el gato?\n"}),
]

# How the reference calls each family's processor (mmE5's Mllama call passes add_special_tokens=False, which
# Llama 3.2's tokenizer makes no different: see the one-bos test; VLM2Vec's calls keep the default).
REFERENCE_SPECIAL_TOKENS = {"mllama": False, "qwen2_vl": True, "llava": True, "gemma3": True}
# Processors that take one list of images per prompt.
NESTED_IMAGES = {"mllama", "gemma3"}

# Families that take another's published rule: the same strings and the same processor call; the ids come
# from their own real processors.
# - qwen2_5_vl: VLM2Vec maps Qwen2.5-VL to Qwen2-VL's image token (src/model/processor.py VLM_IMAGE_TOKENS).
# - qwen3_vl: Qwen2-VL's rule (a bare <|image_pad|>), Qwen3VLProcessor's 16 px patches and expansion.
# - qwen3_5: its checkpoints name Qwen3VLProcessor and keep Qwen2-VL's image token names.
# - llava_onevision: the llava rule (VLM2Vec and LLaVE replace `<|image_1|>` by `<image>`); Qwen2's tokenizer
#   adds no bos, `<image>` expands to the anyres feature count.
SAME_RULE_AS = {"qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen2_vl", "qwen3_5": "qwen2_vl",
                "llava_onevision": "llava"}
for _family, _rule in SAME_RULE_AS.items():
    for _row in ROWS:
        _row[3][_family] = _row[3][_rule]
    REFERENCE_SPECIAL_TOKENS[_family] = REFERENCE_SPECIAL_TOKENS[_rule]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tmp_path_factory):
    """The family's processor with its real special tokens (tiny tokenizer), loaded as a checkpoint's."""
    path = build_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=0, preset="test")
    return load_processing(path)


def reference_inputs(adapter, text: str, image: Image.Image | None) -> dict[str, torch.Tensor]:
    processor, images = adapter.processor, None
    if image is not None:
        images = [[image]] if adapter.family in NESTED_IMAGES else [image]
    return processor(text=[text], images=images, add_special_tokens=REFERENCE_SPECIAL_TOKENS[adapter.family],
                     return_tensors="pt")


def project_inputs(adapter, item: Item) -> dict[str, torch.Tensor]:
    batch = adapter.collate([item])
    keep = batch["attention_mask"][0].bool()
    return {**batch, "input_ids": batch["input_ids"][:, keep]}


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_published_rows_become_the_reference_prompt_and_ids(adapter, row):
    _, text, has_image, expected = row
    image = IMAGE if has_image else None
    item = Item(prompt=text, image=image)
    assert adapter.prompt(item) == expected[adapter.family]
    ours = project_inputs(adapter, item)
    reference = reference_inputs(adapter, expected[adapter.family], image)
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    if has_image:
        torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    last = adapter.tokenizer.convert_ids_to_tokens(ours["input_ids"][0, -1:].tolist())[0]
    assert last.endswith("Ċ") == text.endswith("\n")  # the pooled token is the published newline (byte BPE)


def test_an_mllama_prompt_holds_one_bos_however_the_tokenizer_is_called(adapter):
    """Llama-3.2-Vision's tokenizer adds no bos itself (transformers' MllamaConverter: a ByteLevel
    post-processor only): the prompt's own <|begin_of_text|> is the one bos, so the processor and the
    tokenizer give the project's ids with or without special tokens, on published rows (text and image)
    and on items made here."""
    if adapter.family != "mllama":
        pytest.skip("the bos is in the prompt only in mllama's")
    items = [Item(prompt=text, image=IMAGE if has_image else None) for _, text, has_image, _ in ROWS]
    items += [Item(text="A cat."), Item("Represent the given image.", image=IMAGE),
              Item(TEXT_INSTRUCTION, "Un gato duerme en el sofá.")]
    bos = adapter.tokenizer.bos_token_id
    for item in items:
        ours = project_inputs(adapter, item)["input_ids"][0].tolist()
        assert ours.count(bos) == 1, adapter.prompt(item)
        images = None if item.image is None else [[item.image]]
        for specials in (True, False):
            processed = adapter.processor(text=[adapter.prompt(item)], images=images,
                                          add_special_tokens=specials)["input_ids"][0]
            tokenized = adapter.tokenizer(adapter.prompt(item), add_special_tokens=specials).input_ids
            assert list(processed) == tokenized == ours, (specials, adapter.prompt(item))


def test_sides_made_here_follow_the_published_rule(adapter):
    """Instruction + text items (synthesis, the demo world, API calls, XTD10 files) render like the published
    rows of the same kind."""
    same = [
        (Item("Represent the given image for classification", image=IMAGE), ROWS[0][1]),
        (Item(text="tench"), "tench"),
        (Item("Represent the given image.", image=IMAGE), ROWS[3][1]),
        (Item("Represent the given image with the following question:", "What is on the table?", IMAGE),
         ROWS[4][1]),
        (Item(TEXT_INSTRUCTION, "Un gato duerme en el sofá."),
         "Find me an everyday image that matches the given caption: Un gato duerme en el sofá.\n"),
        # placeholders inside the parts and stray whitespace are not content
        (Item("<|image_1|>\nRepresent the given image. ", image=IMAGE), ROWS[3][1]),
    ]
    for item, text in same:
        assert item.published() == text
        assert adapter.prompt(item) == adapter.prompt(Item(prompt=text, image=item.image))


def test_image_token_is_a_recipe_setting(adapter):
    token = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>",
             "mllama": "<|image|>",
             "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
             "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
             "qwen3_5": "<|vision_start|><|image_pad|><|vision_end|>",
             "llava_onevision": "<image>",
             "gemma3": "<start_of_image>"}[adapter.family]
    custom = type(adapter)(None, adapter.processor, InputFormat(image_token=token))
    item = Item(prompt=ROWS[3][1], image=IMAGE)
    expected = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.\n",
                "llava": "<image>\nRepresent the given image.\n",
                "mllama": "<|image|><|begin_of_text|>Represent the given image.\n",
                "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.\n",
                "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.\n",
                "qwen3_5": "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.\n",
                "llava_onevision": "<image>\nRepresent the given image.\n",
                "gemma3": "<start_of_image>\nRepresent the given image.\n"}[adapter.family]
    assert custom.prompt(item) == expected
    ids = project_inputs(custom, item)["input_ids"]
    assert ids.tolist() == reference_inputs(custom, expected, IMAGE)["input_ids"].tolist()


def test_gemma3_prompt_becomes_the_image_sequence_then_the_text(tmp_path):
    """The ids of a Gemma 3 image side, written out: the tokenizer's <bos>, the processor's "\n\n", marker,
    soft tokens, end marker and "\n\n" in place of `<start_of_image>`, then the published text."""
    adapter = load_processing(build_tiny("gemma3", tmp_path, seed=0, preset="test"))
    tok, n = adapter.tokenizer, adapter.processor.image_seq_length

    def text(s):
        return tok(s, add_special_tokens=False).input_ids

    image = [tok.boi_token_id, *[tok.image_token_id] * n, tok.eoi_token_id]
    expected = [tok.bos_token_id, *text("\n\n"), *image, *text("\n\n\nRepresent the given image.\n")]
    assert project_inputs(adapter, Item(prompt=ROWS[3][1], image=IMAGE))["input_ids"][0].tolist() == expected


def write_image(path, image=IMAGE):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_converted_rows_keep_the_published_strings(adapter, tmp_path):
    """MMEB-train / mmE5-MMEB-hardneg rows through the converter and the training collation path."""
    for name in ("q.png", "p.png", "n0.png", "n1.png"):
        write_image(tmp_path / name)
    report = ConversionReport()
    converter = RowConverter(tmp_path, report)
    row = {"qry": "Find me an everyday image that matches the given caption: A man on a moped. \n",
           "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.\n",
           "pos_image_path": "p.png", "neg_text": "['', '']", "neg_image_path": "['n0.png', 'n1.png']"}
    sample = converter.convert(row, "s-1", Task.RETRIEVAL, "MSCOCO_t2i")
    assert adapter.prompt(side_item(sample.query)) == adapter.prompt(Item(prompt=ROWS[2][1]))
    assert adapter.prompt(side_item(sample.positive)) == adapter.prompt(Item(prompt=ROWS[3][1], image=IMAGE))
    # an image negative without text takes its positive's string (the reference rule), instruction included
    for negative in sample.negatives:
        assert negative.prompt == row["pos_text"] and negative.instruction == published.IMAGE_INSTRUCTION
    assert report.quirks["negative_text_inherited"] == 2


def test_mmeb_eval_rows_are_fed_verbatim(adapter, tmp_path):
    write_image(tmp_path / "eval_images" / "Set" / "a.png")
    write_image(tmp_path / "eval_images" / "Set" / "b.png", IMAGE.rotate(90))
    table = pa.table({"qry_text": [ROWS[4][1]], "qry_img_path": ["eval_images/Set/a.png"],
                      "tgt_text": [["table", "chair"]], "tgt_img_path": [["", ""]]})
    pq.write_table(table, tmp_path / "test-0.parquet")
    builder = SetBuilder("Set", ImageStore([tmp_path], ("",)))
    add_rows(builder, "Set", [tmp_path / "test-0.parquet"])
    items = next(_loaded([builder.build().items], workers=1))
    expected = [ROWS[4][3][adapter.family], *(adapter.prompt(Item(prompt=t)) for t in ("table", "chair"))]
    assert [adapter.prompt(item) for item in items] == expected


def test_render_and_normalize_rules():
    assert published.render("", "tench", has_image=False) == "tench"
    assert published.render("Caption:", "A dog.", has_image=False) == "Caption: A dog.\n"
    assert published.render("Represent the given image.", None, has_image=True) == ROWS[3][1]
    assert published.render("", "a dog", has_image=True) == "<|image_1|>\na dog\n"
    assert published.normalize("Represent the given image.\n", has_image=True) == ROWS[3][1]
    assert published.normalize(ROWS[6][1], has_image=False) == ROWS[6][3]["qwen2_vl"]


def test_split_rules():
    """The converter's bookkeeping split (side kinds, reports); the string itself is kept verbatim."""
    assert published.split(ROWS[4][1]) == (
        "Represent the given image with the following question:", "What is on the table?", True)
    assert published.split(ROWS[3][1]) == ("Represent the given image.", None, True)
    assert published.split("tench") == ("", "tench", False)
    assert published.split("Find an image\nA dog.") == ("Find an image", "A dog.", False)


def test_exports_carry_a_chat_template_for_the_families_vllm_serves():
    """vLLM's multimodal embedding models (docs/models/pooling_models/embed.md): Qwen3-VL by name, the other
    Qwen-VL families and LLaVA(-NeXT) through `--convert embed`; no Mllama since vLLM 0.10.2."""
    from mme5.export import CHAT_TEMPLATE_FAMILIES

    assert sorted(CHAT_TEMPLATE_FAMILIES) == ["llava", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


def test_the_exported_chat_template_renders_the_project_prompt(adapter):
    """What vLLM makes of an embedding request's messages (system = instruction, user = text and image) is
    the project's prompt string, character for character, for every kind of side."""
    from mme5.export import CHAT_TEMPLATE_FAMILIES
    from mme5.integrations.vllm import chat_template

    if adapter.family not in CHAT_TEMPLATE_FAMILIES:
        pytest.skip(f"current vLLM does not serve {adapter.family}: its exports carry no chat template")
    template = chat_template(adapter.image_token)
    sides = [("Represent the given image for classification", None, True), ("", "tench", False),
             ("Find me an everyday image that matches the given caption:", " A man on a moped. ", False),
             ("Represent the given image.", None, True),
             ("Represent the given image with the following question:", "What is on the table?", True),
             ("", "A cat.", True), ("Retrieve it", "", False)]
    for instruction, text, has_image in sides:
        content = [{"type": "image"}] if has_image else []
        content += [{"type": "text", "text": text}] if text else []
        messages = ([{"role": "system", "content": instruction}] if instruction else []) + [
            {"role": "user", "content": content}]
        rendered = adapter.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        expected = adapter.prompt(Item(instruction, text, IMAGE if has_image else None))
        assert rendered == expected, (instruction, text, has_image)
