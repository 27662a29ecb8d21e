"""Tiny offline backbones: deterministic, save/load round trip, presets, CLI, offline tokenizer."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from mme5.backbones import ADAPTERS, Item, load_backbone
from mme5.backbones.tiny import PRESETS, build_tiny, main, make_tiny, tiny_tokenizer
from mme5.backbones.tokenizer import BUILTIN_CORPUS
from mme5.encoder import Encoder
from mme5.losses import InfoNCE

FAMILIES = sorted(ADAPTERS)


def items() -> list[Item]:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return [Item("Represent the given image.", image=image), Item("Caption:", "Un chat dort sur le canapé.")]


def hidden(adapter) -> torch.Tensor:
    with torch.no_grad():
        return adapter.last_hidden_state(adapter.model, adapter.collate(items()))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_backbone_gives_identical_outputs(family, tmp_path):
    model, processor = make_tiny(family, seed=0)
    in_memory = ADAPTERS[family](model, processor)
    loaded = load_backbone(build_tiny(family, tmp_path, seed=0))
    assert type(loaded.processor) is type(processor)
    batch, loaded_batch = in_memory.collate(items()), loaded.collate(items())
    assert batch.keys() == loaded_batch.keys()
    assert all(torch.equal(batch[k], loaded_batch[k]) for k in batch)
    assert torch.equal(hidden(in_memory), hidden(loaded))


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_other_seed_other_weights(family):
    (first, first_proc), (second, second_proc), (other, _) = (make_tiny(family, seed=s) for s in (0, 0, 1))
    assert first_proc.tokenizer.get_vocab() == second_proc.tokenizer.get_vocab()
    first, second, other = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_cli_builds_the_demo_mllama_of_stack_md(tmp_path, monkeypatch, capsys):
    argv = ["tiny", "--family", "mllama", "--preset", "demo", "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    main()
    n_params = float(re.search(r"([\d.]+)M parameters", capsys.readouterr().out).group(1))
    assert 1.0 < n_params < 1.4  # stack.md's best tiny Mllama had 1.13M
    adapter = load_backbone(tmp_path)
    vision, text = adapter.model.config.vision_config, adapter.model.config.text_config
    assert (vision.image_size, vision.patch_size, vision.max_num_tiles) == (64, 8, 1)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_global_layers) == (128, 2, 1)
    assert (text.hidden_size, text.num_hidden_layers, text.cross_attention_layers) == (128, 4, [1, 3])
    assert hidden(adapter).shape[-1] == 128


def first_digit_images() -> list[Image.Image]:
    """The first scan of each digit 0-9 in scikit-learn's set, as the 64 px RGB image a user would have."""
    digits = load_digits()
    rows = [int(np.flatnonzero(digits.target == k)[0]) for k in range(10)]
    grey = [Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)) for i in rows]
    return [g.resize((64, 64), Image.BILINEAR).convert("RGB") for g in grey]


def test_demo_vision_preset_tells_real_handwritten_digits_apart():
    # "demo" with the same data, steps and rate stays at ln(10) (2.28 after 30 steps): a mean over 64
    # patches of 8 px hides thin grey strokes (issue 25).
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    model, processor = make_tiny("mllama", seed=0, preset="demo-vision")
    encoder = Encoder(ADAPTERS["mllama"](model, processor))
    queries = encoder.adapter.collate([Item("What digit is this?", image=i) for i in first_digit_images()])
    targets = encoder.adapter.collate([Item("", word) for word in words])
    loss_fn = InfoNCE(temperature=0.05, gather=False)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-4)  # configs/own_data.yaml's rate
    for _ in range(30):
        output = loss_fn(encoder(queries), encoder(targets))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    assert output.loss < 0.25 * math.log(10) and output.accuracy == 1.0


def test_tokenizer_splits_cjk_and_keeps_special_tokens_whole():
    tok = tiny_tokenizer("qwen2_vl", PRESETS["test"].vocab, BUILTIN_CORPUS.splitlines())
    chinese = "一只猫睡在小狗旁边的沙发上"
    spans = tok(chinese, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    assert all(end - start <= 1 for start, end in spans)  # no token spans two characters
    assert tok.decode(tok(chinese).input_ids) == chinese
    for special in ("<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert tok.convert_tokens_to_ids(special) < 16
        assert len(tok(special, add_special_tokens=False).input_ids) == 1


def test_corpus_file_drives_the_bpe(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the zebrafish swims\n" * 50, encoding="utf-8")
    assert make_tiny("llava", corpus=corpus)[1].tokenizer.tokenize(" zebrafish") == ["Ġzebrafish"]
    assert len(make_tiny("llava")[1].tokenizer.tokenize(" zebrafish")) > 1  # the built-in corpus lacks it


def test_cli_claims_out_a_rerun_says_it_is_there_other_settings_refused(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the zebrafish swims\n" * 50, encoding="utf-8")
    out, command = tmp_path / "backbone", ["--family", "llava", "--corpus", str(corpus)]
    assert main([*command, "--out", str(out)]) == 0
    weights = (out / "model.safetensors").read_bytes()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    corpus.write_text("the zebrafish swims\n" * 50, encoding="utf-8")  # rewritten, same text: a rebuilt world
    capsys.readouterr()
    assert main([*command, "--out", str(out)]) == 0
    assert "already holds" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not built again

    assert main([*command, "--out", str(out), "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert "seed: 0 (recorded) → 1 (now)" in error and "--overwrite" in error
    assert (out / "model.safetensors").read_bytes() == weights
    assert main([*command, "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "corpus.txt"]  # swapped in

    import mme5.backbones.tiny as tiny

    def dies(family, out_dir, **kwargs):
        (out_dir / "config.json").write_text("{}")  # a build stopped half-way
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "build_tiny", dies)
    with pytest.raises(KeyboardInterrupt):
        main([*command, "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert main([*command, "--out", str(tmp_path / "cut")]) == 0  # not complete: built, not "already there"
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == weights


def test_cli_refuses_an_out_holding_the_corpus_and_a_corpus_not_utf8_before_claiming(tmp_path, capsys):
    world = tmp_path / "world"
    world.mkdir()
    corpus = world / "corpus.txt"
    corpus.write_text("the zebrafish swims\n" * 50, encoding="utf-8")
    # --overwrite would swap the folder away, the corpus (and whatever it came with) with it
    assert main(["--family", "llava", "--corpus", str(corpus), "--out", str(world), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in world.iterdir()) == ["corpus.txt"]

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    assert main(["--family", "llava", "--corpus", str(latin1), "--out", str(tmp_path / "out")]) == 2
    assert f"{latin1}: not UTF-8: byte 3 (0xe9)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the claim: nothing to clear up


def test_demo_video_vocabulary_keeps_the_demo_texts_in_words():
    """The `make demo` Qwen2-VL pools its last token, which must attend to the image tokens among the text
    ones: with "demo"'s 512 BPE tokens an instruction is spelled in characters, with "demo-video"'s in
    words."""
    from mme5.demo import language
    from mme5.demo.scenes import scenes_in
    from mme5.demo.tasks import IMAGE

    scenes = scenes_in("train")[:300]
    texts = [IMAGE, *(language.caption(s, code) for s in scenes for code in language.LANGUAGES)]
    lengths = {preset: len(tiny_tokenizer("qwen2_vl", PRESETS[preset].vocab, texts).tokenize(IMAGE))
               for preset in ("demo", "demo-video")}
    assert lengths["demo-video"] <= 6 < 12 <= lengths["demo"], lengths
