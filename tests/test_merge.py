"""`python -m mme5.merge` (issue 26 item 6): the merged weights equal a float64 brute force of the averaged
models, the result loads and exports as any checkpoint, and runs that cannot be merged are refused."""

import json
import multiprocessing
import os
import shlex
import signal
import time

import pytest
import torch
from doc_blocks import doc_commands
from test_export import perturbed_checkpoint

import mme5.merge
from mme5.backbones import Item, load_backbone
from mme5.backbones.tiny import build_tiny
from mme5.checkpoint import EXPORT_CONFIG, load_encoder
from mme5.encoder import LoraSettings
from mme5.export import export
from mme5.export import main as export_main
from mme5.files import OWNER_RECORD, FolderInUse, OutputFolderError
from mme5.merge import main, merge

LORA = LoraSettings(r=2, alpha=4, dropout=0.0, use_dora=False)
ITEMS = [Item("", "a red square"), Item("Find:", "two blue circles")]


def lora_run(backbone, path, seed: int, lora: LoraSettings = LORA):
    """A LoRA checkpoint whose A (initialised from the global generator) and B differ per seed."""
    torch.manual_seed(seed)
    perturbed_checkpoint(backbone, path, lora)
    checkpoint = torch.load(path, weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if "lora_B" in key:
            value.mul_(1 + seed)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mllama):
    root = tmp_path_factory.mktemp("merge")
    return root, [lora_run(tiny_mllama, root / f"run{i}.ckpt", seed=i) for i in range(2)]


def brute_force(backbone, runs, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i (W + s B_i A_i) in float64 for every adapted weight, from the backbone's weights and the
    checkpoints' LoRA factors."""
    base = {k: v.double() for k, v in load_backbone(backbone).model.state_dict().items()}
    expected: dict[str, torch.Tensor] = {}
    for path, weight in zip(runs, weights, strict=True):
        state = torch.load(path, weights_only=True)["state_dict"]
        scale = LORA.alpha / LORA.r
        for key in (k for k in state if ".lora_A." in k):
            name = key.removeprefix("encoder.model.base_model.model.").replace(".lora_A.default", "")
            delta = scale * state[key.replace("lora_A", "lora_B")].double() @ state[key].double()
            expected[name] = expected.get(name, 0) + weight * (base[name] + delta)
    return expected


def test_merged_weights_are_the_weighted_average_of_the_models(runs, tiny_mllama):
    root, (a, b) = runs
    path = merge([a, b], root / "out", weights=[3, 1])
    checkpoint = torch.load(path, weights_only=True)
    merged = {k.removeprefix("encoder.model."): v for k, v in checkpoint["state_dict"].items()}
    expected = brute_force(tiny_mllama, [a, b], [0.75, 0.25])
    assert set(merged) == set(expected)  # only the adapted weights: the rest is the backbone's
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, atol=1e-6, rtol=1e-6, msg=name)
    assert checkpoint["hyper_parameters"]["lora"] is None
    assert [run["weight"] for run in checkpoint["merged_from"]] == [0.75, 0.25]

    # It loads as any checkpoint (what mme5.eval does) and exports to merged weights.
    encoder = load_encoder(path).encoder
    assert not encoder.has_adapters
    exported = load_encoder(export(path, root / "exported")).encoder
    torch.testing.assert_close(exported.embed(ITEMS), encoder.embed(ITEMS), atol=1e-5, rtol=0)


def test_merging_a_dora_run_with_itself_gives_that_run(tmp_path, tiny_mllama):
    dora = perturbed_checkpoint(tiny_mllama, tmp_path / "dora.ckpt", LoraSettings(r=2, alpha=4, dropout=0.0))
    merged = merge([dora, dora], tmp_path / "out")
    torch.testing.assert_close(load_encoder(merged).encoder.embed(ITEMS),
                               load_encoder(dora).encoder.embed(ITEMS), atol=1e-5, rtol=0)


def test_runs_that_cannot_be_merged_are_refused_naming_both(runs, tmp_path, capsys):
    root, (a, b) = runs
    other = str(build_tiny("mllama", tmp_path / "other", seed=1, preset="test"))
    c = lora_run(other, tmp_path / "other.ckpt", seed=2)
    with pytest.raises(ValueError, match=rf"{a} and {c} were trained on different backbones"):
        merge([a, c], tmp_path / "x")
    checkpoint = torch.load(b, weights_only=True)
    checkpoint["hyper_parameters"]["input_format"]["max_length"] = 32
    torch.save(checkpoint, tmp_path / "short.ckpt")
    with pytest.raises(ValueError, match="different input formats"):
        merge([a, tmp_path / "short.ckpt"], tmp_path / "x")
    for weights, message in [([1.0], "1 weights for 2 runs"), ([1.0, -1.0], "must be positive")]:
        with pytest.raises(ValueError, match=message):
            merge([a, b], tmp_path / "x", weights=weights)
    assert not (tmp_path / "x").exists()

    # --out belongs to one merge: the same again writes nothing, other weights need --overwrite.
    out = str(root / "claimed")
    main(["--runs", str(a), str(b), "--out", out])
    before = (root / "claimed" / "model.ckpt").stat().st_mtime_ns
    main(["--runs", str(a), str(b), "--out", out])
    assert (root / "claimed" / "model.ckpt").stat().st_mtime_ns == before
    with pytest.raises(SystemExit):
        main(["--runs", str(a), str(b), "--weights", "1", "2", "--out", out])
    assert "--overwrite" in capsys.readouterr().err
    main(["--runs", str(a), str(b), "--weights", "1", "2", "--out", out, "--overwrite"])
    weights = [r["weight"] for r in torch.load(root / "claimed" / "model.ckpt")["merged_from"]]
    assert weights == pytest.approx([1 / 3, 2 / 3])
    assert json.loads((root / "claimed" / OWNER_RECORD).read_text())["command"] == "mme5.merge"
    with pytest.raises(OutputFolderError):
        merge([a, b], root / "claimed", weights=[1, 1])


def test_the_documented_commands_run(runs, tmp_path, monkeypatch):
    _, (a, b) = runs
    commands = {"python -m mme5.merge": main, "python -m mme5.export": export_main}
    monkeypatch.chdir(tmp_path)
    for line in doc_commands("docs/sharing.md", "Merging runs"):
        for name, run in (("a", a), ("b", b)):
            line = line.replace(f"runs/{name}/checkpoints/last.ckpt", str(run))
        prefix = next(p for p in commands if line.startswith(p))
        commands[prefix](shlex.split(line.removeprefix(prefix)))
    merged = torch.load("merged/ab/model.ckpt", weights_only=True)
    assert [run["weight"] for run in merged["merged_from"]] == pytest.approx([0.6, 0.4])
    assert (tmp_path / "exported" / "ab" / "config.json").is_file()


def merged_state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_merge(actual, expected):
    a, e = merged_state(actual), merged_state(expected)
    assert set(a) == set(e)
    for name, value in e.items():
        torch.testing.assert_close(a[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_a_merge_of_merges_and_a_run_named_twice_weigh_their_runs_as_documented(runs, tmp_path, tiny_mllama):
    """Runs of other LoRA ranks and targets merge (their deltas are averaged); a merge is a run too, weighing
    its runs by its weight times theirs; a run named twice counts twice."""
    _, (a, b) = runs
    c = lora_run(tiny_mllama, tmp_path / "c.ckpt", seed=3,
                 lora=LoraSettings(r=4, alpha=4, dropout=0.0, use_dora=False, target_modules=["q_proj"]))
    ab = merge([a, b], tmp_path / "ab")
    abc = merge([a, b, c], tmp_path / "abc", weights=[1, 1, 2])
    assert_same_merge(merge([ab, c], tmp_path / "ab-c"), abc)
    assert_same_merge(merge([a, a, b], tmp_path / "aab"), merge([a, b], tmp_path / "2ab", weights=[2, 1]))


def test_inputs_that_are_no_run_checkpoint_are_refused_naming_them(runs, tmp_path, capsys):
    _, (a, b) = runs
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / EXPORT_CONFIG).write_text("{}")
    (tmp_path / "torn.ckpt").write_bytes(a.read_bytes()[:5000])  # as a run killed while saving
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for run, message in [(exported, "an exported model folder, not a checkpoint"),
                         (tmp_path / "torn.ckpt", "not a loadable checkpoint"),
                         (tmp_path / "empty.ckpt", "not a loadable checkpoint")]:
        with pytest.raises(ValueError, match=rf"{run}: {message}"):
            merge([a, run], tmp_path / "x")
    with pytest.raises(ValueError, match=rf"--backbone {a}: a file; give the backbone's folder"):
        merge([a, b], tmp_path / "x", backbone=str(a))
    with pytest.raises(SystemExit):
        main(["--runs", str(a), str(b), "--weights", "0.5x", "1", "--out", str(tmp_path / "x")])
    assert "argument --weights: invalid float value: '0.5x'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _merge_until_killed(runs, out, claimed):
    """A merge that stops for good once it holds --out, as `kill -9` would leave it."""
    def hang(*args):
        claimed.set()
        time.sleep(600)

    mme5.merge.merged_checkpoint = hang
    merge(runs, out)


def test_a_merge_killed_mid_write_is_resumed_and_a_second_one_meanwhile_is_refused(runs, tmp_path):
    _, (a, b) = runs
    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    claimed = context.Event()
    first = context.Process(target=_merge_until_killed, args=([a, b], out, claimed))
    first.start()
    try:
        assert claimed.wait(120)
        with pytest.raises(FolderInUse, match=rf"{out} is being written by .*pid {first.pid}"):
            merge([a, b], out)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.join()
    assert not (out / "model.ckpt").exists()
    assert_same_merge(merge([a, b], out), merge([a, b], tmp_path / "uninterrupted"))


def test_the_merge_takes_the_first_runs_dtype(runs, tmp_path):
    _, (a, b) = runs
    checkpoint = torch.load(a, weights_only=True)
    checkpoint["hyper_parameters"]["dtype"] = "bfloat16"
    torch.save(checkpoint, tmp_path / "a16.ckpt")
    for first, second, dtype in ((tmp_path / "a16.ckpt", b, torch.bfloat16), (b, tmp_path / "a16.ckpt",
                                                                              torch.float32)):
        merged = torch.load(merge([first, second], tmp_path / f"{first.stem}-first"), weights_only=True)
        assert {tensor.dtype for tensor in merged["state_dict"].values()} == {dtype}
        assert merged["hyper_parameters"]["dtype"] == torch.load(first, weights_only=True)[
            "hyper_parameters"].get("dtype")
