"""Exports that the field's tools load (issue 12), checked with the real packages: sentence-transformers and
PEFT give the project's embeddings and weights; the model card says what the checkpoint and the scores say;
pushing stops at the upload call here."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import DOCUMENT, QUERY
from test_export import perturbed_checkpoint

from mme5.backbones.tiny import build_tiny
from mme5.checkpoint import load_encoder
from mme5.demo.world import WorldConfig, build_world
from mme5.encoder import LoraSettings
from mme5.eval.__main__ import main as evaluate
from mme5.export import export, main
from mme5.files import OWNER_RECORD

st = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module", params=["mllama", "qwen2_vl"])
def exported(request, tmp_path_factory):
    """A family's tiny backbone, a DoRA checkpoint as if trained on shards, its merged and adapter exports."""
    root = tmp_path_factory.mktemp(request.param)
    backbone = build_tiny(request.param, root / "backbone", seed=0, preset="test")
    (backbone / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- tiny\n---\n# tiny backbone\n")
    ckpt = perturbed_checkpoint(str(backbone), root / "last.ckpt", LoraSettings(r=2, alpha=4, dropout=0.0))
    merged = export(ckpt, root / "merged", query_instruction=QUERY, target_instruction=DOCUMENT)
    adapter = export(ckpt, root / "adapter", query_instruction=QUERY, target_instruction=DOCUMENT,
                     adapter_only=True)
    return backbone, ckpt, merged, adapter


def test_sentence_transformers_refuses_untrusted_code_and_bad_inputs(exported):
    _, _, merged, _ = exported
    with pytest.raises(ValueError, match="trust_remote_code"):
        st.SentenceTransformer(str(merged), device="cpu")
    model = st.SentenceTransformer(str(merged), trust_remote_code=True, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.encode([{"image": "missing.png"}])


def test_a_saved_sentence_transformer_loads_back_to_the_same_numbers(exported, tmp_path):
    _, _, merged, _ = exported
    model = st.SentenceTransformer(str(merged), trust_remote_code=True, device="cpu")
    model.save(str(tmp_path / "resaved"))
    again = st.SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True, device="cpu")
    texts = ["a red square", "two blue circles"]
    torch.testing.assert_close(again.encode_query(texts, convert_to_tensor=True),
                               model.encode_query(texts, convert_to_tensor=True), atol=1e-6, rtol=0)


def test_an_adapter_folder_without_a_base_says_what_to_pass(exported, tmp_path):
    _, _, _, adapter = exported
    shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no base_model_name_or_path.*--backbone"):
        load_encoder(tmp_path / "adapter")
    assert load_encoder(tmp_path / "adapter", backbone=str(exported[0])).encoder.has_adapters


def card_meta(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_model_card_carries_the_recipe_the_languages_the_licence_and_the_scores(tmp_path, tiny_mllama,
                                                                                tiny_shards):
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_mllama, backbone)
    (backbone / "README.md").write_text("---\nlicense: llama3.2\n---\n")
    ckpt = perturbed_checkpoint(str(backbone), tmp_path / "last.ckpt", LoraSettings(r=2, alpha=4), step=123)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["datamodule_hyper_parameters"] = {"sources": [{"path": tiny_shards}], "batch_size": 1024,
                                                 "num_negatives": 3}
    torch.save(checkpoint, ckpt)
    world = tmp_path / "world"
    build_world(world, WorldConfig(train_samples=0, eval_queries=3, eval_candidates=4, xtd_images=4,
                                   languages=("en", "zh")), progress=False)
    evaluate(["--model", str(ckpt), "--data", str(world), "--out", str(tmp_path / "eval"), "--no-cache",
              "--device", "cpu"])
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--scores", str(tmp_path / "eval"),
          "--query-instruction", QUERY])

    meta, text = card_meta(tmp_path / "out")
    assert meta["library_name"] == "sentence-transformers" and meta["license"] == "llama3.2"
    assert "mllama" in meta["tags"] and "base_model" not in meta  # a local backbone is no hub id
    assert meta["language"] == ["en", "ru", "zh"]  # counted in the shards' manifest
    assert "| global_step | 123 |" in text and "| batch_size | 1024 |" in text and "| lora.r | 2 |" in text
    columns = ["Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall"]
    assert "| " + " | ".join(columns) + " |" in text
    assert "| " + " | ".join(f"{scores['mmeb'][k]:.1f}" for k in columns) + " |" in text
    xtd = [f"{scores['xtd']['languages'][code]['t2i']['recall@10']:.1f}" for code in ("en", "zh")]
    assert "| " + " | ".join([*xtd, f"{scores['xtd']['mean']['t2i']['recall@10']:.1f}"]) + " |" in text
    assert json.dumps(QUERY) in text


def test_push_to_hub_uploads_the_written_folder_and_fails_clearly_offline(tmp_path, tiny_mllama, monkeypatch,
                                                                           capsys):
    from huggingface_hub import HfApi

    ckpt = perturbed_checkpoint(tiny_mllama, tmp_path / "last.ckpt", LoraSettings(r=2, alpha=4))
    calls = []
    monkeypatch.setattr(HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "done")
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--push-to-hub", "someone/tiny-mme5"])
    assert calls[0] == ("create", "someone/tiny-mme5", {"private": False, "exist_ok": True,
                                                        "repo_type": "model"})
    assert calls[1][1]["folder_path"] == str(tmp_path / "out")
    assert calls[1][1]["repo_id"] == "someone/tiny-mme5"
    assert calls[1][1]["ignore_patterns"] == [OWNER_RECORD]  # who wrote the folder stays local
    assert (tmp_path / "out" / OWNER_RECORD).is_file()
    assert "\n# someone/tiny-mme5\n" in card_meta(tmp_path / "out")[1]  # the card names the repository

    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"could not push .*out2 to someone/tiny-mme5.*complete.*hf upload"
                                         rf".*--exclude {OWNER_RECORD}"):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out2"), "--push-to-hub", "someone/tiny-mme5"])
    assert load_encoder(tmp_path / "out2").description["kind"] == "exported"  # written before the push
