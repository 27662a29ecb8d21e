"""`model.init_from` (mme5.warm_start): a run starts from a trained model's weights, the ones evaluation
scores (`load_encoder`), and refuses a start it cannot continue before anything is written."""

import re

import pytest
import torch
from test_export import perturbed_checkpoint
from test_merge import lora_run
from test_resume import fit, outputs, write_recipe
from test_train import run_distributed

from mme5.backbones import Item
from mme5.checkpoint import load_encoder
from mme5.encoder import LoraSettings
from mme5.export import export
from mme5.merge import merge
from mme5.module import EmbeddingModule
from mme5.warm_start import INITIALISED_FROM

LORA = LoraSettings(r=2, alpha=4, dropout=0.0, use_dora=False)
ITEMS = [Item("", "a red square"), Item("Find:", "two blue circles")]


def started(backbone, init_from, lora=None) -> EmbeddingModule:
    module = EmbeddingModule(backbone=backbone, lora=lora, gradient_checkpointing=False,
                             init_from=str(init_from))
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def starts(tmp_path_factory, tiny_mllama):
    """A full run, a LoRA run and a merge of two LoRA runs, as checkpoints."""
    root = tmp_path_factory.mktemp("starts")
    runs = [lora_run(tiny_mllama, root / f"lora{i}.ckpt", seed=i) for i in range(2)]
    return {"full": perturbed_checkpoint(tiny_mllama, root / "full.ckpt", None),
            "lora": runs[0], "merge": merge(runs, root / "merged")}


@pytest.mark.parametrize("kind", ["full", "lora", "merge"])
def test_a_full_run_starts_from_the_model_evaluation_scores(starts, tiny_mllama, kind):
    module = started(tiny_mllama, starts[kind])
    expected = load_encoder(starts[kind]).encoder  # adapters merged or not: the same function
    torch.testing.assert_close(module.encoder.eval().embed(ITEMS), expected.embed(ITEMS), atol=1e-5, rtol=0)
    # and not by accident: the backbone alone embeds otherwise
    untrained = load_encoder(tiny_mllama).encoder
    assert not torch.allclose(untrained.embed(ITEMS), expected.embed(ITEMS), atol=1e-3)
    assert module._initialised_from["checkpoint"] == str(starts[kind].resolve())


def test_a_lora_run_continues_the_adapters_of_a_run_with_its_settings(starts, tiny_mllama):
    module = started(tiny_mllama, starts["lora"], LORA)
    saved = torch.load(starts["lora"], weights_only=True)["state_dict"]
    adapters = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert adapters and set(adapters) == set(saved)
    for name, value in adapters.items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize(("kind", "lora", "says"), [
    ("full", LORA, "is not a LoRA run"),
    ("merge", LORA, "is not a LoRA run"),
    ("lora", LoraSettings(r=4, alpha=8, dropout=0.0), "trained other adapters"),
])
def test_a_lora_run_refuses_a_start_it_cannot_continue(starts, tiny_mllama, kind, lora, says):
    with pytest.raises(ValueError, match=says + r".*python -m mme5.export"):
        started(tiny_mllama, starts[kind], lora)


def test_a_start_of_another_backbone_a_folder_or_a_broken_file_is_refused_by_name(starts, tiny, tmp_path):
    with pytest.raises(ValueError, match=r"trained on the backbone at .* differs from model.backbone"):
        started(tiny("qwen2_vl"), starts["full"])
    exported = export(starts["full"], tmp_path / "exported")
    with pytest.raises(ValueError, match=r"exported: a model folder, which is a backbone: name it as "
                                         r"model.backbone"):
        started(tiny("mllama"), exported)
    with pytest.raises(ValueError, match=r"model.init_from .*nothing.ckpt: no such file"):
        started(tiny("mllama"), tmp_path / "nothing.ckpt")
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(starts["full"].read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model.init_from .*torn.ckpt: not a loadable checkpoint"):
        started(tiny("mllama"), torn)


def test_train_py_starts_from_a_run_records_it_and_resumes_without_it(tmp_path, tiny_mllama, tiny_shards,
                                                                      capsys):
    first = tmp_path / "first"
    assert fit(write_recipe(first, tiny_mllama, tiny_shards), "--trainer.max_steps", "2") == 0
    start = tmp_path / "start.ckpt"
    start.write_bytes((first / "checkpoints" / "last.ckpt").read_bytes())
    second = tmp_path / "second"
    recipe = write_recipe(second, tiny_mllama, tiny_shards)
    # lr 0: the step changes nothing, so the second run's weights are the start's
    assert fit(recipe, "--model.init_from", str(start), "--model.lr", "0", "--trainer.max_steps", "1") == 0
    before = torch.load(start, weights_only=True)
    after = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    encoder = [k for k in before["state_dict"] if k.startswith("encoder.")]
    assert encoder and all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in encoder)
    assert after["global_step"] == 1  # a new run: its own steps, optimiser and stream
    assert after[INITIALISED_FROM]["checkpoint"] == str(start) and after[INITIALISED_FROM]["global_step"] == 2

    card = (export(second / "checkpoints" / "last.ckpt", tmp_path / "exported") / "README.md").read_text()
    assert f"| global_step | 1 |\n| init_from | {start} |" in card

    # a resume takes the run's checkpoint and does not read the start again (it may be gone) ...
    start.unlink()
    assert fit(recipe, "--model.init_from", str(start), "--model.lr", "0", "--trainer.max_steps", "2",
               "--ckpt_path", "last") == 0
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 2 and resumed[INITIALISED_FROM] == after[INITIALISED_FROM]
    # ... but with another start it is another model: refused, naming the setting
    capsys.readouterr()
    assert fit(recipe, "--trainer.max_steps", "3", "--ckpt_path", "last") == 2
    assert re.search(r"model.init_from: .*start.ckpt.* \(recorded\) → null \(now\)", capsys.readouterr().err)

    # a new run over the run whose checkpoint is its start would remove the start first: refused
    written = outputs(first)
    assert fit(write_recipe(first, tiny_mllama, tiny_shards), "--overwrite", "--model.init_from",
               str(first / "checkpoints" / "last.ckpt")) == 2
    assert re.search(r"last.ckpt is an output of the run in .*first, which a new run there removes first",
                     capsys.readouterr().err)
    assert outputs(first) == written

    # a start that cannot be read is refused before the run folder is claimed or written
    third = tmp_path / "third"
    assert fit(write_recipe(third, tiny_mllama, tiny_shards), "--model.init_from", str(start)) == 2
    assert re.search(r"error: model.init_from .*start.ckpt: no such file", capsys.readouterr().err)
    assert not outputs(third)  # nothing written, the owner record included
    assert not (third / ".mme5-owner.json").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_starts_from_the_start_under_ddp_and_fsdp(tmp_path, tiny_mllama, tiny_shards, strategy):
    """Under FSDP only rank 0 reads the start and the shards come from it: the weights the first step trains
    are the start's on every rank (gathered whole), not the backbone's fresh adapters."""
    start = perturbed_checkpoint(tiny_mllama, tmp_path / "start.ckpt", LoraSettings(dropout=0.0))
    record = run_distributed(tmp_path / "run", tiny_mllama, tiny_shards, strategy, "--init-from", str(start))
    saved = torch.load(start, weights_only=True)["state_dict"]
    assert record["initial"] and set(record["initial"]) == set(saved)
    for name, value in record["initial"].items():
        assert torch.equal(value, saved[name]), name
