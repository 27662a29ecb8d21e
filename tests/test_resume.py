"""How `train.py fit` ends and resumes (issue 21 §2), run in-process through the real CLI on a tiny model:
the final step is checkpointed, a run folder belongs to one recipe and one process, a signal checkpoints and
exits non-zero, and settings changed on resume are applied or refused, never ignored."""

import logging
import os
import re
import shutil
import signal

import lightning as L
import pytest
import torch
import yaml

import train
from mme5.export import main as export_main
from mme5.files import claim_folder, identity_changes, read_owner, remove_path
from mme5.resume import ResumeRefused, check_recipe, run_identity


class SignalAt(L.Callback):
    """Sends this process `signum` once, at the end of step `step` (as `kill` from outside would)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_start(self, trainer, *args):
        if self.step == -1:  # while the run is being set up, before the project's handler is in place
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def write_recipe(root, backbone, shards, every=2):
    """A small recipe in the shape of configs/demo.yaml (no evaluation callbacks)."""
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 5, "default_root_dir": str(root),
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root), "name": "tensorboard", "version": ""}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True,
                                         "every_n_train_steps": every, "enable_version_counter": False}}],
        },
        "model": {"backbone": backbone, "lora": None, "gradient_checkpointing": False, "chunk_size": 4,
                  "lr": 1e-3, "warmup": 1, "temperature": 0.05},
        "data": {"sources": [{"path": shards}], "batch_size": 8, "num_negatives": 1, "num_workers": 0,
                 "shuffle_buffer": 1},
    }
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fit(recipe, *args):
    return train.main(["fit", "--config", str(recipe), *args])


def outputs(root):
    """Every file of a run folder but its owner record, with its modification time."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != ".mme5-owner.json"}


def step_of(path):
    return torch.load(path, weights_only=False, map_location="cpu")["global_step"]


@pytest.fixture
def run(tmp_path, tiny_mllama, tiny_shards):
    root = tmp_path / "run"
    return root, write_recipe(root, tiny_mllama, tiny_shards)


def test_the_final_step_is_checkpointed_and_the_folder_records_its_recipe(run):
    root, recipe = run
    assert fit(recipe) == 0
    assert step_of(root / "checkpoints" / "last.ckpt") == 5  # saved every 2: Lightning alone ends at 4
    record = read_owner(root)
    assert record["command"] == "train.py fit" and record["complete"] and record["global_step"] == 5
    assert record["identity"]["model.temperature"] == 0.05


def test_a_fresh_fit_where_a_run_is_is_refused_and_overwrite_starts_anew(run, capsys):
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    before = sorted(p.name for p in (root / "tensorboard").iterdir()), (root / "checkpoints" / "last.ckpt"
                                                                         ).stat().st_mtime_ns
    assert fit(recipe, "--trainer.max_steps", "2") == 2
    error = capsys.readouterr().err
    assert "holds an earlier output of `train.py fit`" in error and "--ckpt_path last" in error
    assert "--overwrite" in error
    after = sorted(p.name for p in (root / "tensorboard").iterdir()), (root / "checkpoints" / "last.ckpt"
                                                                        ).stat().st_mtime_ns
    assert after == before  # nothing written: no second event file, no overwritten checkpoint
    assert fit(recipe, "--overwrite", "--ckpt_path", "last") == 2
    assert "--overwrite starts a new run" in capsys.readouterr().err

    (root / "checkpoints" / "epoch=0-step=2.ckpt").rename(root / "checkpoints" / "old-run.ckpt")
    assert fit(recipe, "--trainer.max_steps", "1", "--overwrite") == 0
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]  # the old run's gone
    assert step_of(root / "checkpoints" / "last.ckpt") == 1
    assert len(list((root / "tensorboard").glob("events.*"))) == 1  # one run's curves, not two mixed
    assert (root / "tensorboard" / "config.yaml").is_file()
    assert "overwrite: false" in (root / "tensorboard" / "config.yaml").read_text()  # never saved as true


def test_sigterm_checkpoints_at_the_step_and_exits_non_zero_then_resume_finishes(run):
    root, recipe = run
    stop = {"class_path": "test_resume.SignalAt", "init_args": {"step": 3}}
    assert fit(recipe, "--trainer.max_steps", "30", "--trainer.callbacks+", yaml.safe_dump(stop)) == 143
    assert step_of(root / "checkpoints" / "last.ckpt") == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    with pytest.warns(UserWarning, match="at step 3 of the 30 its run was asked for"):  # `train || export`
        export_main(["--ckpt", str(root / "checkpoints" / "last.ckpt"), "--out", str(root / "x")])
    assert fit(recipe, "--trainer.max_steps", "4", "--ckpt_path", "last") == 0
    assert step_of(root / "checkpoints" / "last.ckpt") == 4


def test_a_changed_learning_rate_is_applied_on_resume_and_said(run, caplog):
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "3") == 0
    caplog.set_level(logging.INFO)
    assert fit(recipe, "--trainer.max_steps", "4", "--ckpt_path", "last", "--model.lr", "1e-5") == 0
    assert "model.lr: 0.001 (recorded) → 1e-05 (now)" in caplog.text
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    group = saved["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 1e-5 and saved["lr_schedulers"][0]["base_lrs"] == [1e-5]
    assert group["lr"] < 1e-5  # the schedule's factor at step 4 applied to the new peak, not to 1e-3


@pytest.mark.parametrize(("change", "key"), [(["--model.temperature", "0.1"], "model.temperature"),
                                              (["--model.lora", "{}"], "model.lora")])
def test_a_checkpoint_of_another_recipe_is_refused_naming_the_keys(run, tmp_path, tiny_mllama, tiny_shards,
                                                                    capsys, change, key):
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    other = write_recipe(tmp_path / "other", tiny_mllama, tiny_shards)
    checkpoint = str(root / "checkpoints" / "last.ckpt")
    assert fit(other, "--ckpt_path", checkpoint, *change) == 2
    error = capsys.readouterr().err
    assert f"--ckpt_path {checkpoint} was trained with another recipe" in error and f"{key}:" in error
    assert not (tmp_path / "other" / "checkpoints").exists()
    # In its own folder the folder's record refuses it too, before the checkpoint is read.
    assert fit(recipe, "--ckpt_path", "last", *change) == 2
    assert "with other settings" in capsys.readouterr().err


def test_a_run_folder_held_by_another_process_is_refused_naming_it(run, capsys):
    root, recipe = run
    with claim_folder(root, "train.py fit", {}):  # an own lock: flock excludes another open file too
        assert fit(recipe) == 2
    assert f"is being written by pid {os.getpid()}" in capsys.readouterr().err
    assert not (root / "checkpoints").exists()


def test_a_missing_torn_or_foreign_checkpoint_is_refused_by_name(run, tmp_path, capsys):
    root, recipe = run
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(b"PK\x03\x04 half a zip")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    for path, reason in ((tmp_path / "gone.ckpt", "no such file"), (torn, "not a loadable checkpoint"),
                         (foreign, "not a checkpoint of train.py")):
        assert fit(recipe, "--ckpt_path", str(path)) == 2
        assert f"--ckpt_path {path}" in (error := capsys.readouterr().err) and reason in error
    assert not (root / "checkpoints").exists()


def test_sigterm_while_the_run_is_set_up_stops_after_the_first_step_with_a_checkpoint(run, capsys):
    root, recipe = run
    stop = {"class_path": "test_resume.SignalAt", "init_args": {"step": -1}}
    assert fit(recipe, "--trainer.max_steps", "30", "--trainer.callbacks+", yaml.safe_dump(stop)) == 143
    assert step_of(root / "checkpoints" / "last.ckpt") == 1
    assert "before training started" not in capsys.readouterr().err  # it trained a step and saved it


def test_a_signal_during_the_final_step_lets_the_run_finish_as_complete(run):
    root, recipe = run
    stop = {"class_path": "test_resume.SignalAt", "init_args": {"step": 5}}
    assert fit(recipe, "--trainer.callbacks+", yaml.safe_dump(stop)) == 0  # max_steps 5: nothing was cut
    assert step_of(root / "checkpoints" / "last.ckpt") == 5 and read_owner(root)["complete"]


def test_a_refused_checkpoint_leaves_the_run_folder_record_as_it_was(run, capsys):
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    record = read_owner(root)
    assert fit(recipe, "--ckpt_path", "lst") == 2  # a typo of `last`
    assert "--ckpt_path lst: no such file" in capsys.readouterr().err
    assert read_owner(root) == record  # still complete, still naming the run that wrote it


def test_a_resume_with_nothing_left_to_train_by_epochs_says_which_setting_to_raise(run):
    root, recipe = run
    by_epochs = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--data.batch_size", "32"]
    assert fit(recipe, *by_epochs) == 0  # 96 samples: 3 steps
    with pytest.warns(UserWarning, match="nothing is left to train; raise --trainer.max_epochs"):
        assert fit(recipe, *by_epochs, "--ckpt_path", "last") == 0


def test_a_run_folder_that_cannot_be_written_is_refused_by_name(tmp_path, tiny_mllama, tiny_shards, capsys):
    (tmp_path / "file").write_text("not a folder")
    root = tmp_path / "file" / "run"  # as root, a read-only folder is writable: a file in the way fails alike
    recipe = write_recipe(tmp_path / "run", tiny_mllama, tiny_shards)
    assert fit(recipe, "--trainer.default_root_dir", str(root)) == 2
    assert f"cannot write {root}" in capsys.readouterr().err


def test_a_resume_over_other_data_or_a_batch_too_large_is_refused_before_anything_is_written(
        tmp_path, tiny_mllama, capsys):
    from helpers import make_sample

    from mme5.data.shards import ShardWriter

    def shards(prefix, count=48):
        remove_path(tmp_path / "shards")
        with ShardWriter(tmp_path / "shards", max_count=24) as writer:
            for i in range(count):
                writer.write(make_sample(i, id=f"{prefix}{i}"))

    root = tmp_path / "run"
    recipe = write_recipe(root, tiny_mllama, str(tmp_path / "shards"))
    shards("a")
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    written = outputs(root)
    shards("b")  # converted again: other samples under the same folder name
    assert fit(recipe, "--trainer.max_steps", "4", "--ckpt_path", "last") == 2
    assert "is not the data this run's saved stream positions point into" in capsys.readouterr().err
    assert outputs(root) == written
    assert fit(recipe, "--ckpt_path", "last", "--data.batch_size", "64") == 2
    assert "batch" in capsys.readouterr().err


def test_resuming_an_older_checkpoint_names_the_later_ones_it_abandons(run, caplog):
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    older = root / "checkpoints" / "kept-at-step-2.ckpt"
    shutil.copy2(root / "checkpoints" / "last.ckpt", older)
    assert fit(recipe, "--trainer.max_steps", "4", "--ckpt_path", "last") == 0
    caplog.set_level(logging.INFO)
    with pytest.warns(UserWarning, match=r"older than epoch=0-step=4.ckpt, last.ckpt of this run"):
        assert fit(recipe, "--trainer.max_steps", "4", "--ckpt_path", str(older)) == 0


def test_a_run_folder_from_before_owner_records_resumes_and_a_fresh_run_there_needs_overwrite(run, capsys):
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    (root / ".mme5-owner.json").unlink()  # as an earlier version left it
    assert fit(recipe, "--trainer.max_steps", "2") == 2
    assert "no mme5 command recorded" in capsys.readouterr().err
    assert fit(recipe, "--trainer.max_steps", "3", "--ckpt_path", "last") == 0
    assert step_of(root / "checkpoints" / "last.ckpt") == 3 and read_owner(root)["identity"]


def test_ctrl_c_while_the_run_is_set_up_stops_after_the_first_step_with_exit_130(run):
    root, recipe = run
    stop = {"class_path": "test_resume.SignalAt", "init_args": {"step": -1, "signum": int(signal.SIGINT)}}
    assert fit(recipe, "--trainer.max_steps", "30", "--trainer.callbacks+", yaml.safe_dump(stop)) == 130
    assert step_of(root / "checkpoints" / "last.ckpt") == 1


def test_spelling_out_a_default_setting_on_resume_is_the_same_recipe(run):
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0  # input_format not given: the defaults
    assert fit(recipe, "--trainer.max_steps", "3", "--ckpt_path", "last",
               "--model.input_format.max_length", "256") == 0
    assert step_of(root / "checkpoints" / "last.ckpt") == 3


def test_naming_the_detected_preset_is_the_recipe_and_another_preset_is_refused():
    """A run whose format names no preset trains with the one the backbone's files give (`detected`):
    naming that one on resume is the same recipe, in the checkpoint's and in the run folder's identity
    (recorded before or after presets); naming another is refused by its dotted key."""
    backbone = {"config": "c", "weights": "w"}
    recorded = {"hyper_parameters": {"input_format": {"max_length": 64, "preset": None}}}

    def named(preset):
        return {"input_format": {"max_length": 64, "preset": preset}}

    for preset in (None, "vlm2vec_v2"):
        check_recipe("last.ckpt", recorded, named(preset), backbone, "vlm2vec_v2")
    with pytest.raises(ResumeRefused, match=r'model.input_format.preset: null \(recorded\) → "mme5" \(now\)'):
        check_recipe("last.ckpt", recorded, named("mme5"), backbone, "vlm2vec_v2")
    before_presets = run_identity({"input_format": {"max_length": 64}}, backbone, "mme5")
    before_presets["model.input_format"] = {k: v for k, v in before_presets["model.input_format"].items()
                                            if k not in ("preset", "max_grid_side")}
    assert identity_changes(before_presets, run_identity(named("mme5"), backbone, "mme5")) == {}


@pytest.mark.parametrize(("change", "says"), [
    (["--model.input_format.preset", "gme"], "input format preset 'gme' .* not to 'mllama'"),
    (["--model.input_format.max_grid_side", "2"], "max_grid_side .* the mllama family has none"),
])
def test_an_input_format_the_backbone_cannot_apply_is_refused_before_anything_is_written(run, capsys, change,
                                                                                         says):
    root, recipe = run
    assert fit(recipe, *change) == 2
    assert re.search(f"error: model.input_format: {says}", capsys.readouterr().err)
    assert not root.exists()


def test_a_run_recorded_before_truncation_rules_resumes_only_under_the_rule_it_trained_with():
    """Records without `truncation` cut text tokens only: resuming one where the preset's rule for the family
    now differs (mllama under mme5: the collator's whole-sequence cut) is refused by its dotted key, and
    accepted once the old rule is named; a family whose rule is still "text" resumes as it is."""
    backbone = {"config": "c", "weights": "w"}
    recorded = {"hyper_parameters": {"input_format": {"max_length": 64, "preset": None}}}

    def now(rule):
        return {"input_format": {"max_length": 64, "preset": None, "truncation": rule}}

    with pytest.raises(ResumeRefused, match=r'model.input_format.truncation: null \(recorded\) → "sequence"'):
        check_recipe("last.ckpt", recorded, now(None), backbone, "mme5", "mllama")
    check_recipe("last.ckpt", recorded, now("text"), backbone, "mme5", "mllama")
    check_recipe("last.ckpt", recorded, now(None), backbone, "mme5", "gemma3")
    # named or left to the preset, the same rule is the same recipe
    assert run_identity(now(None), backbone, "mme5", "mllama") == run_identity(now("sequence"), backbone,
                                                                               "mme5", "mllama")


@pytest.mark.parametrize("changed, named", [
    (["--model.hardness_mode", "in_batch_negatives", "--model.hardness_strength", "9"],
     "model.hardness_strength"),
    (["--model.matryoshka_dims", "[32, 8]"], "model.matryoshka_dims"),
    (["--model.task_temperatures", "true"], "model.task_temperatures"),
], ids=["hardness", "matryoshka", "task-temperatures"])
def test_a_technique_changed_on_resume_is_refused_through_the_cli_naming_it(run, capsys, changed, named):
    """What `check_recipe` refuses (tests/test_loss_techniques.py) reaches the command: exit 2, the setting
    named, nothing written."""
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    written = outputs(root)
    assert fit(recipe, "--trainer.max_steps", "3", "--ckpt_path", "last", *changed) == 2
    assert re.search(rf"{named}: .* \(recorded\) → .* \(now\); resume with the settings it was trained with",
                     capsys.readouterr().err)
    assert outputs(root) == written


def test_batch_composition_changed_on_resume_is_applied_and_said(run, caplog):
    """A data setting, as documented (docs/training.md): the reading positions carry over."""
    root, recipe = run
    assert fit(recipe, "--trainer.max_steps", "2") == 0
    caplog.set_level(logging.INFO)
    assert fit(recipe, "--trainer.max_steps", "3", "--ckpt_path", "last",
               "--data.batch_composition", "per_source") == 0
    assert "data.batch_composition: \"mixed\" (recorded) → \"per_source\" (now)" in caplog.text
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert saved["datamodule_hyper_parameters"]["batch_composition"] == "per_source"
