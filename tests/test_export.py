"""Exporting a checkpoint: merged weights load as a plain backbone and embed like the checkpoint."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from doc_blocks import doc_commands, run_doc_commands
from PIL import Image

from mme5.backbones import InputFormat, Item, load_backbone
from mme5.checkpoint import EXPORT_CONFIG as CONFIG_NAME
from mme5.checkpoint import load_encoder
from mme5.demo.world import WorldConfig, build_world
from mme5.encoder import Encoder, LoraSettings
from mme5.eval.__main__ import main as evaluate
from mme5.eval.registry import mean_over_sets
from mme5.export import main
from mme5.module import EmbeddingModule

ITEMS = [
    Item("Represent the given image.", None, Image.new("RGB", (24, 24), (200, 40, 40))),
    Item("Find the caption:", "a small blue cube by a sphere", Image.new("RGB", (32, 20), (20, 90, 200))),
    Item("", "a caption"),
    Item("Retrieve the image of:", "two green cylinders on a long wooden table"),
]


def perturbed_checkpoint(backbone: str, path, lora: LoraSettings | None, step: int = 7):
    """A checkpoint as if trained: random adapter (or, without LoRA, all) weights moved off their init."""
    module = EmbeddingModule(backbone=backbone, lora=lora, gradient_checkpointing=False,
                             input_format=InputFormat(max_length=64))
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.encoder.named_parameters():
            if lora is None or "lora_" in name or "magnitude" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    torch.save({"state_dict": module.state_dict(), "adapter_only": lora is not None,  # as training saves
                "hyper_parameters": dict(module.hparams), "global_step": step}, path)
    return path


@pytest.fixture(scope="module")
def dora_export(tmp_path_factory, tiny_mllama):
    root = tmp_path_factory.mktemp("export")
    ckpt = perturbed_checkpoint(tiny_mllama, root / "last.ckpt", LoraSettings(r=2, alpha=4, dropout=0.0))
    main(["--ckpt", str(ckpt), "--out", str(root / "exported"), "--query-instruction", "Find:"])
    return ckpt, root / "exported"


def embed(encoder: Encoder, items=ITEMS) -> torch.Tensor:
    return encoder.eval().embed(items)


def test_merged_folder_loads_as_a_plain_backbone_and_embeds_like_the_checkpoint(dora_export, tiny_mllama):
    ckpt, out = dora_export
    checkpoint = load_encoder(ckpt).encoder
    assert checkpoint.has_adapters
    merged = Encoder(load_backbone(out, input_format=InputFormat(max_length=64)))
    torch.testing.assert_close(embed(merged), embed(checkpoint), atol=1e-5, rtol=0)
    assert not torch.allclose(embed(Encoder(load_backbone(tiny_mllama))), embed(checkpoint), atol=1e-3)

    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["pooling"] == "last_token" and config["normalize"] is True
    assert config["family"] == "mllama" and config["input_format"]["max_length"] == 64  # the training's
    assert config["instructions"] == {"query": "Find:", "target": ""}
    assert config["source"]["checkpoint"] == str(ckpt.resolve()) and config["source"]["global_step"] == 7
    assert not any("lora" in f.name for f in out.iterdir())  # no adapter files: weights are merged


def test_loader_recognises_an_exported_folder(dora_export):
    ckpt, out = dora_export
    loaded = load_encoder(out)
    assert loaded.description["kind"] == "exported" and not loaded.description["adapters"]
    assert loaded.encoder.adapter.max_length == 64  # the folder's own, when not given
    assert load_encoder(out, max_length=32).encoder.adapter.max_length == 32
    torch.testing.assert_close(embed(loaded.encoder), embed(load_encoder(ckpt).encoder), atol=1e-5, rtol=0)


def test_full_fine_tune_checkpoint_exports_too(tmp_path, tiny_mllama):
    ckpt = perturbed_checkpoint(tiny_mllama, tmp_path / "full.ckpt", None)
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"])
    exported = load_encoder(tmp_path / "out")
    assert next(exported.encoder.model.parameters()).dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["dtype"] == "bfloat16"
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "fp32")])
    torch.testing.assert_close(embed(load_encoder(tmp_path / "fp32").encoder),
                               embed(load_encoder(ckpt).encoder), atol=1e-5, rtol=0)


def test_eval_command_scores_an_export_like_its_checkpoint(dora_export, tmp_path):
    ckpt, out = dora_export
    world = tmp_path / "world"
    build_world(world, WorldConfig(train_samples=0, eval_queries=3, eval_candidates=4, xtd_images=4,
                                   languages=("en", "zh")), progress=False)
    scores = {}
    for name, model in [("ckpt", ckpt), ("exported", out)]:
        evaluate(["--model", str(model), "--data", str(world), "--out", str(tmp_path / name), "--device",
                  "cpu", "--no-cache"])
        scores[name] = json.loads((tmp_path / name / "scores.json").read_text())
    assert scores["exported"]["model"]["kind"] == "exported"
    assert scores["exported"]["scalars"] == pytest.approx(scores["ckpt"]["scalars"], abs=1e-6)


def test_a_checkpoints_relative_backbone_is_found_from_its_run_directory(tmp_path, monkeypatch):
    from mme5.checkpoint import _recorded_backbone

    (tmp_path / "runs" / "demo" / "backbone").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "backbone" / "config.json").write_text("{}")
    ckpt = tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    monkeypatch.chdir(tmp_path / "runs")  # not where training ran
    assert _recorded_backbone(ckpt, "runs/demo/backbone") == str(tmp_path / "runs" / "demo" / "backbone")
    assert _recorded_backbone(ckpt, "meta-llama/Llama-3.2-11B-Vision") == "meta-llama/Llama-3.2-11B-Vision"
    with pytest.raises(FileNotFoundError, match="--backbone"):
        _recorded_backbone(ckpt, "runs/other/backbone")


class Payload:
    """What a crafted checkpoint would smuggle in: an object whose unpickling runs code."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["MME5_PWNED"]),))


def test_a_checkpoint_that_would_run_code_is_refused_unless_trusted(tmp_path, tiny_mllama, monkeypatch):
    ckpt = perturbed_checkpoint(tiny_mllama, tmp_path / "crafted.ckpt", LoraSettings(r=2, alpha=4))
    checkpoint = torch.load(ckpt, weights_only=True)  # the project's own: plain types only
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MME5_PWNED", str(marker))
    checkpoint["hyper_parameters"]["note"] = Payload()
    torch.save(checkpoint, ckpt)
    with pytest.raises(ValueError, match="would run code from the file.*--trust-checkpoint"):
        load_encoder(ckpt)
    assert not marker.exists()  # nothing ran
    assert load_encoder(ckpt, trust_checkpoint=True).encoder.has_adapters and marker.exists()


def test_the_cache_fingerprint_covers_the_backbone_a_checkpoint_is_rebuilt_on(tmp_path, tiny_mllama):
    """Re-evaluating a .ckpt with another --backbone must not reuse the first backbone's embeddings."""
    ckpt = perturbed_checkpoint(tiny_mllama, tmp_path / "last.ckpt", LoraSettings(r=2, alpha=4))
    other = tmp_path / "other-backbone"
    shutil.copytree(tiny_mllama, other)
    first, second = load_encoder(ckpt), load_encoder(ckpt, backbone=str(other))
    assert first.fingerprint != second.fingerprint
    assert first.description["backbone"] == str(Path(tiny_mllama).resolve())
    assert second.description["backbone"] == str(other.resolve())
    assert load_encoder(ckpt).fingerprint == first.fingerprint  # and stable when nothing changed


def test_out_belongs_to_one_export(tmp_path, tiny_mllama, monkeypatch, capsys):
    """The same export again writes nothing; another checkpoint or other settings are refused before the
    checkpoint loads, naming the keys; --overwrite swaps the new export in. The owner record changes
    neither what loads nor the model's fingerprint."""
    import mme5.export as command
    from mme5.files import OWNER_RECORD, claim_folder, read_owner

    ckpt = perturbed_checkpoint(tiny_mllama, tmp_path / "last.ckpt", LoraSettings(r=2, alpha=4))
    out = tmp_path / "exported"
    main(["--ckpt", str(ckpt), "--out", str(out)])
    assert read_owner(out)["complete"] and (out / OWNER_RECORD).is_file()
    weights = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != OWNER_RECORD}
    fingerprint = load_encoder(out).fingerprint

    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(command, "load_encoder", no_load)
    main(["--ckpt", str(ckpt), "--out", str(out)])  # the same export: nothing to write
    assert "already holds this export" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != OWNER_RECORD} == weights
    assert read_owner(out)["complete"]
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", str(ckpt), "--out", str(out), "--dtype", "bfloat16"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "--overwrite" in error
    assert 'dtype: null (recorded) → "bfloat16" (now)' in error
    other = perturbed_checkpoint(tiny_mllama, tmp_path / "other.ckpt", LoraSettings(r=2, alpha=4), step=9)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(other), "--out", str(out)])
    assert "checkpoint_files" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an --out holding the checkpoint is never replaced
        main(["--ckpt", str(ckpt), "--out", str(tmp_path), "--overwrite"])
    assert ckpt.is_file() and "holds the input" in capsys.readouterr().err
    with claim_folder(out, "mme5.export", {}, overwrite=True), pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--out", str(out)])  # another process is writing it
    assert f"is being written by pid {os.getpid()}" in capsys.readouterr().err

    monkeypatch.undo()
    assert load_encoder(out).fingerprint == fingerprint  # claims rewrote the record, not the model
    main(["--ckpt", str(other), "--out", str(out), "--overwrite"])
    assert json.loads((out / CONFIG_NAME).read_text())["source"]["global_step"] == 9
    assert read_owner(out)["identity"]["checkpoint"] == str(other.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "last.ckpt", "other.ckpt"]


def test_a_failed_first_export_leaves_no_folder(tmp_path, tiny_mllama, capsys):
    full = perturbed_checkpoint(tiny_mllama, tmp_path / "full.ckpt", None)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(full), "--out", str(tmp_path / "out"), "--adapter-only"])
    assert "trained without adapters" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # so the corrected command is not refused as "other settings"


def test_scores_must_be_the_exported_checkpoints(tmp_path, tiny_mllama, capsys):
    """Scores name the model file they were computed on: another checkpoint's, or this path's before it
    was retrained, are refused naming both (the card would credit this model with them); a partial MMEB
    run goes into the card as the mean over its sets, never as Overall."""
    from mme5.files import path_fingerprint

    ckpt = perturbed_checkpoint(tiny_mllama, tmp_path / "last.ckpt", LoraSettings(r=2, alpha=4))
    other = perturbed_checkpoint(tiny_mllama, tmp_path / "other.ckpt", LoraSettings(r=2, alpha=4))
    mmeb = {"metric": "precision@1", "datasets": {}, "sets": {"evaluated": 2, "in_benchmark": 36},
            "Classification": 40.0, "VQA": None, "Retrieval": 60.0, "Grounding": None, "IND": 50.0,
            "OOD": None, "mean_over_sets": 50.0}

    def scores_of(model, folder):
        folder.mkdir()
        scored = {"path": str(model.resolve()), "files": path_fingerprint(model)}
        (folder / "scores.json").write_text(json.dumps({"model": scored, "mmeb": mmeb}))
        return folder

    foreign = scores_of(other, tmp_path / "eval-other")
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--scores", str(foreign)])
    error = capsys.readouterr().err
    assert f"computed on {other.resolve()}" in error and f"being exported, {ckpt.resolve()}" in error
    assert "--scores-of-other-model" in error and not (tmp_path / "out").exists()

    own = scores_of(ckpt, tmp_path / "eval")
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--scores", str(own)])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| IND | OOD | mean over 2 of 36 sets |" in card and "Overall" not in card
    assert "| 40.0 | – | 60.0 | – | 50.0 | – | 50.0 |" in card

    perturbed_checkpoint(tiny_mllama, ckpt, LoraSettings(r=2, alpha=4), step=8)  # retrained in place
    os.utime(ckpt, ns=(1, 1))  # another mtime even on a coarse clock
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out2"), "--scores", str(own)])
    assert "not on the checkpoint being exported" in capsys.readouterr().err
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out2"), "--scores", str(foreign),
          "--scores-of-other-model"])
    assert "mean over 2 of 36 sets" in (tmp_path / "out2" / "README.md").read_text()


def test_the_checkpoints_backbone_is_an_input_refused_as_out_and_part_of_the_identity(tmp_path, capsys):
    """`--out BACKBONE --overwrite` replaced the backbone an adapter-only checkpoint is rebuilt on with the
    export (the checkpoint then loaded on merged weights); an export of a checkpoint whose backbone changed
    since said 'nothing to write'. The same backbone is refused as the --out of eval and mine."""
    from mme5.backbones.tiny import build_tiny
    from mme5.data import mine

    backbone = build_tiny("mllama", tmp_path / "backbone", seed=0)
    lora = LoraSettings(r=2, alpha=4, dropout=0.0)
    ckpt = perturbed_checkpoint(str(backbone), tmp_path / "last.ckpt", lora)
    world = tmp_path / "world"
    build_world(world, WorldConfig(train_samples=4, eval_queries=3, eval_candidates=4, xtd_images=4,
                                   languages=("en",)), progress=False)
    weights = (backbone / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--out", str(backbone), "--overwrite"])
    assert "holds the input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(["--model", str(ckpt), "--data", str(world), "--out", str(backbone), "--overwrite"])
    assert "holds the input" in capsys.readouterr().err
    assert mine.main(["--model", str(ckpt), "--shards", str(world / "train"), "--out", str(backbone),
                      "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert (backbone / "model.safetensors").read_bytes() == weights

    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])
    build_tiny("mllama", backbone, seed=1)  # the backbone rebuilt: the export would differ
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])
    assert "backbone_files:" in capsys.readouterr().err


def test_the_docs_score_compare_and_export_a_checkpoint(tmp_path, tiny_world, demo_backbone):
    """docs/evaluation.md's scoring of a run, then docs/sharing.md's export of it and mteb's XTD on the
    export, as written, in a folder laid out as `make demo` leaves it: the world, the backbone and a
    checkpoint as training writes one."""
    demo = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_world, demo / "world")
    shutil.copytree(demo_backbone, demo / "backbone")
    (demo / "checkpoints").mkdir()
    perturbed_checkpoint(str(demo / "backbone"), demo / "checkpoints" / "last.ckpt",
                         LoraSettings(r=2, alpha=4, dropout=0.0))
    *_, compared = run_doc_commands(doc_commands("docs/evaluation.md", "Score a run"), tmp_path)
    run_doc_commands(doc_commands("docs/sharing.md", "Export"), tmp_path)

    trained = json.loads((demo / "eval" / "trained" / "scores.json").read_text())
    assert [line.split(" | ")[0] for line in compared.splitlines()[2:]] == ["| untrained", "| trained"]
    card = (tmp_path / "exported" / "demo" / "README.md").read_text()
    label, mean = mean_over_sets(trained["mmeb"])
    assert f"| {label} |" in card and f"| {mean:.1f} |" in card  # --scores
    assert (tmp_path / "exported" / "demo-lora" / "adapter_config.json").is_file()  # --adapter-only

    pytest.importorskip("mteb")
    run_doc_commands(doc_commands("docs/sharing.md", "mteb"), tmp_path,
                     env=os.environ | {"MTEB_CACHE": str(tmp_path / "mteb-cache")})
    assert {path.stem for path in (tmp_path / "runs" / "mteb").rglob("XTD-*.json")} == {
        f"XTD-{language}-{direction}" for language in ("en", "es", "zh") for direction in ("t2i", "i2t")}
