"""End to end on a tiny demo world: the training callbacks, the checkpoint loader and the command."""

import json
import os
import shutil

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mme5.backbones import Item
from mme5.checkpoint import load_encoder
from mme5.data.datamodule import ShardDataModule
from mme5.data.stream import Source
from mme5.encoder import LoraSettings
from mme5.eval.__main__ import main
from mme5.eval.callbacks import MMEBEval, XTDEval
from mme5.eval.mmeb import MMEB
from mme5.eval.registry import META_TASKS
from mme5.eval.run import evaluate
from mme5.module import EmbeddingModule

LANGUAGES = ("en", "es", "zh")  # the tiny_world fixture's (conftest.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_world, demo_backbone):
    """Two LoRA steps with both callbacks evaluating at start and every step; the checkpoint saved after."""
    out = tmp_path_factory.mktemp("run")
    module = EmbeddingModule(backbone=demo_backbone, lora=LoraSettings(r=2, alpha=4, dropout=0.0),
                             gradient_checkpointing=False, chunk_size=8, lr=1e-2, warmup=0)
    data = ShardDataModule(sources=[Source(str(tiny_world / "train"))], backbone=demo_backbone, batch_size=8,
                           num_negatives=1, chunk_size=8, num_workers=0, shuffle_buffer=1)
    callbacks = [MMEBEval(str(tiny_world / "mmeb"), max_queries=2, every_n_steps=1),
                 XTDEval(str(tiny_world / "xtd"), max_queries=4, every_n_steps=2)]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", default_root_dir=out,
                        logger=TensorBoardLogger(out, name="tb", version=""),
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, data)
    trainer.save_checkpoint(out / "last.ckpt")
    return trainer, module, out


def scalars(tb_dir):
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_callbacks_log_the_baseline_and_every_n_steps(trained, tiny_world):
    trainer, module, out = trained
    logged = scalars(out / "tb")
    subsets = json.loads((tiny_world / "mmeb" / "subsets.json").read_text())
    for name in [*subsets, *META_TASKS, "IND", "OOD", "Overall"]:
        assert set(logged[f"eval/mmeb/{name}"]) == {0, 1, 2}, name
    for tag in ["en_r10", "es_r1", "zh_i2t_r10", "mean_r10", "mean_all_r10"]:
        assert set(logged[f"eval/xtd/{tag}"]) == {0, 2}, tag
    # the data's skip report lands in the run folder (never in the working directory)
    assert json.loads((out / "data_report.json").read_text())["skipped_samples"] == 0
    module.encoder.train()
    trainer.callbacks[0].run(trainer, module)
    assert module.encoder.training  # eval mode only while evaluating


def test_checkpoint_loads_the_trained_encoder_and_the_command_reproduces_the_callback(trained, tiny_world,
                                                                                    demo_backbone, tmp_path):
    trainer, module, out = trained
    loaded = load_encoder(out / "last.ckpt")
    assert loaded.encoder.has_adapters and loaded.description["kind"] == "lightning-checkpoint"
    items = [Item("Represent the given image.", "a caption"), Item("", "another caption of more words")]
    module.encoder.eval()
    with torch.no_grad():
        expected = module.encoder(module.encoder.adapter.collate(items))
        torch.testing.assert_close(loaded.encoder(loaded.encoder.adapter.collate(items)), expected)
        zero_shot = load_encoder(demo_backbone).encoder
        assert not torch.allclose(zero_shot(zero_shot.adapter.collate(items)), expected, atol=1e-4)

    main(["--model", str(out / "last.ckpt"), "--benchmark", "mmeb", "--data", str(tiny_world),
          "--out", str(tmp_path), "--max-queries", "2", "--device", "cpu"])
    from_command = json.loads((tmp_path / "scores.json").read_text())["scalars"]
    logged = scalars(out / "tb")
    for key, value in from_command.items():  # same code, same weights, same first 2 queries
        assert value == pytest.approx(logged[f"eval/{key}"][2], abs=1e-4), key


def test_command_end_to_end_on_a_backbone_folder(tiny_world, demo_backbone, tmp_path):
    args = ["--model", demo_backbone, "--data", str(tiny_world), "--out", str(tmp_path), "--batch-size", "4",
            "--device", "cpu", "--top-k", "3"]
    main(args)
    scores = json.loads((tmp_path / "scores.json").read_text())
    subsets = json.loads((tiny_world / "mmeb" / "subsets.json").read_text())
    assert {*META_TASKS, "IND", "OOD", "Overall", "datasets"} <= set(scores["mmeb"])
    assert set(scores["mmeb"]["datasets"]) == set(subsets)
    assert scores["model"]["kind"] == "backbone" and not scores["model"]["adapters"]
    # what produced the numbers: the tie rule and the data's identity
    assert scores["mmeb"]["ties"] == "pessimistic" and "Ties: a candidate scoring exactly" in \
        (tmp_path / "results.md").read_text()
    assert scores["mmeb"]["data"]["root"] == str((tiny_world / "mmeb").resolve())
    assert len(scores["xtd"]["data"]["fingerprint"]) == 16
    xtd = scores["xtd"]
    assert set(xtd["languages"]) == set(LANGUAGES) and xtd["paper_languages"] == ["es", "zh"]
    assert {"mean", "mean_all"} <= set(xtd) and "xtd/mean_r10" in scores["scalars"]
    report = (tmp_path / "results.md").read_text()
    assert "| Model | Classification | VQA | Retrieval | Grounding | IND | OOD | Overall |" in report
    assert "text→image" in report and "mean over 2 of 7 paper languages" in report  # not the paper's mean
    lines = (tmp_path / "predictions" / "mmeb" / "Shape.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 3 and set(first) == {"query", "gold_rank", "top", "scores"}
    assert len(first["top"]) == len(first["scores"]) == 3
    assert (tmp_path / "predictions" / "xtd" / "es_i2t.jsonl").is_file()
    # --data holds mmeb-v2/: its sets, registry and all, are scored too
    assert scores["mmeb-v2"]["sets"]["evaluated"] == scores["mmeb-v2"]["sets"]["in_benchmark"] == 8
    assert "Overall" in scores["mmeb-v2"] and "| VisDoc | All |" in report

    parts = sorted(tmp_path.glob("cache/*/*/part-*.pt"))
    main(args)  # everything comes from the cache: no new part is written, the scores are the same
    assert sorted(tmp_path.glob("cache/*/*/part-*.pt")) == parts
    assert json.loads((tmp_path / "scores.json").read_text())["scalars"] == scores["scalars"]


def test_command_errors_before_loading_the_model(tiny_world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--out", str(tmp_path)])  # no --data nor --mmeb/--xtd
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path), "--benchmark", "mmeb", "--mmeb", str(tiny_world / "mmeb"),
              "--subsets", "ImageNet-1K", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "error: unknown MMEB data set(s) 'ImageNet-1K'" in capsys.readouterr().err  # no traceback
    with pytest.raises(SystemExit):  # a missing model, before --out is claimed
        main(["--model", str(tmp_path / "gone.ckpt"), "--data", str(tiny_world), "--out",
              str(tmp_path / "o")])
    assert "gone.ckpt: no such file or folder" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_evaluating_nothing_is_an_error_not_a_nan_score(tiny_world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", "nowhere", "--data", str(tiny_world), "--max-queries", "0", "--out", str(tmp_path)])
    assert "--max-queries must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 0 was taken for "the model's own" while --out recorded 0
        main(["--model", "nowhere", "--data", str(tiny_world), "--max-length", "0", "--out", str(tmp_path)])
    assert "--max-length must be at least 1" in capsys.readouterr().err
    empty = tmp_path / "mmeb" / "Empty"
    empty.mkdir(parents=True)
    pq.write_table(pa.table({"qry_text": pa.array([], pa.string()), "qry_img_path": pa.array([], pa.string()),
                             "tgt_text": pa.array([], pa.list_(pa.string())),
                             "tgt_img_path": pa.array([], pa.list_(pa.string()))}), empty / "test-0.parquet")
    registry = {"Empty": {"meta_task": "Retrieval", "split": "IND", "instruction": ""}}
    (tmp_path / "mmeb" / "subsets.json").write_text(json.dumps(registry))
    with pytest.raises(ValueError, match="mmeb/Empty: no query to evaluate"):
        evaluate(MMEB(tmp_path / "mmeb"), lambda items: torch.zeros(len(items), 4))


def test_out_belongs_to_one_evaluation(tiny_world, demo_backbone, tmp_path, monkeypatch, capsys):
    """Same model, data and settings: resumed. Other settings: refused before the model loads, naming the
    key; --overwrite replaces. A second process on the same --out: refused at once, naming the holder."""
    import mme5.eval.__main__ as command
    from mme5.files import claim_folder, read_owner

    out = tmp_path / "eval"
    args = ["--model", demo_backbone, "--benchmark", "mmeb", "--data", str(tiny_world), "--subsets", "Shape",
            "--max-queries", "2", "--out", str(out), "--device", "cpu"]
    main(args)
    first = json.loads((out / "scores.json").read_text())
    assert read_owner(out)["complete"] and read_owner(out)["identity"]["mmeb.sets"] == ["Shape"]
    assert first["model"]["files"] == read_owner(out)["identity"]["model_files"]
    main(args)  # resumed: same scores
    assert json.loads((out / "scores.json").read_text())["scalars"] == first["scalars"]

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(command, "load_encoder", no_load)
    other = args[:-5] + ["3", *args[-4:]]  # --max-queries 3
    with pytest.raises(SystemExit) as exit_:
        main(other)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "max_queries: 2 (recorded) → 3 (now)" in error and "--overwrite" in error
    another = shutil.copytree(demo_backbone, tmp_path / "another-model")
    with pytest.raises(SystemExit):
        main([*args[:1], str(another), *args[2:]])
    assert "model_files" in capsys.readouterr().err
    with claim_folder(out, "mme5.eval", {}, overwrite=True), pytest.raises(SystemExit):
        main(args)  # another process holds it
    assert f"is being written by pid {os.getpid()}" in capsys.readouterr().err
    assert json.loads((out / "scores.json").read_text()) == first  # nothing refused touched it
    with pytest.raises(SystemExit):  # an --out holding the model is never replaced
        main(["--model", str(another), *args[2:-3], str(tmp_path), "--overwrite"])
    assert another.is_dir() and "holds the input" in capsys.readouterr().err

    monkeypatch.undo()
    main([*other, "--overwrite"])
    replaced = json.loads((out / "scores.json").read_text())
    assert replaced["mmeb"]["datasets"]["Shape"]["queries"] == 3
    assert read_owner(out)["identity"]["max_queries"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["another-model", "eval"]  # no sibling nor lock left


def test_overall_only_when_every_set_is_evaluated_and_repeated_subsets_count_once(tiny_world, demo_backbone,
                                                                                  tmp_path, capsys):
    from mme5.eval.compare import comparison, figures

    every = len(json.loads((tiny_world / "mmeb" / "subsets.json").read_text()))
    args = ["--model", demo_backbone, "--benchmark", "mmeb", "--data", str(tiny_world), "--max-queries", "2",
            "--device", "cpu"]
    with pytest.warns(UserWarning, match=r"MMEB data set\(s\) \['Shape'\] listed more than once"):
        main([*args, "--subsets", "Shape", "Count", "Shape", "--out", str(tmp_path / "two")])
    label = f"mean over 2 of {every} sets (first 2 queries of each set)"  # --max-queries 2: a sample
    assert f"mmeb: {label}" in capsys.readouterr().out
    scores = json.loads((tmp_path / "two" / "scores.json").read_text())
    mmeb = scores["mmeb"]
    assert "Overall" not in mmeb and "mmeb/Overall" not in scores["scalars"]
    assert mmeb["sets"] == {"evaluated": 2, "in_benchmark": every, "max_queries": 2}
    assert set(mmeb["datasets"]) == {"Shape", "Count"}
    per_set = [mmeb["datasets"][name]["precision@1"] for name in ("Shape", "Count")]
    assert mmeb["mean_over_sets"] == pytest.approx(sum(per_set) / 2)  # Shape once, not twice
    report = (tmp_path / "two" / "results.md").read_text()
    assert f"| IND | OOD | {label} |" in report and "no Overall" in report

    main([*args, "--out", str(tmp_path / "all")])
    complete = json.loads((tmp_path / "all" / "scores.json").read_text())
    assert "mmeb: Overall (first 2 queries of each set)" in capsys.readouterr().out  # every set, sampled
    assert "not comparable with a leaderboard" in (tmp_path / "all" / "results.md").read_text()
    assert figures(scores)["Overall"] is None and figures(complete)["Overall"] == complete["mmeb"]["Overall"]
    table = comparison({"two": scores, "all": complete})
    assert f"{mmeb['mean_over_sets']:.1f} ({label})" in table
    assert f"{complete['mmeb']['Overall']:.1f} (Overall (first 2 queries of each set))" in table


def test_scores_count_the_items_cut_to_max_length(tiny_world, tiny_mllama, tmp_path):
    """Case 14: text longer than --max-length is truncated as before, and scores.json says how many items
    were cut (0 when everything fits)."""
    args = ["--model", tiny_mllama, "--data", str(tiny_world), "--benchmark", "xtd", "--device", "cpu",
            "--no-cache"]
    main([*args, "--out", str(tmp_path / "short"), "--max-length", "6"])
    main([*args, "--out", str(tmp_path / "long"), "--max-length", "512"])
    assert json.loads((tmp_path / "short" / "scores.json").read_text())["truncated_items"] > 0
    assert json.loads((tmp_path / "long" / "scores.json").read_text())["truncated_items"] == 0
