"""The training entry point and module: recipes parse, the loss falls, resume is exact, NaN stops cleanly,
and DDP and FSDP gradients equal the full-batch gradient."""

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from mme5.backbones.tiny import build_tiny
from mme5.checkpoint import AtomicCheckpointIO, checkpoint_problem, load_encoder
from mme5.contrastive import contrastive_step
from mme5.data.collate import ContrastiveCollator
from mme5.data.datamodule import ShardDataModule
from mme5.data.shards import read_samples, shard_urls
from mme5.data.stream import StreamBatch
from mme5.demo.world import WorldConfig, build_world
from mme5.encoder import LoraSettings
from mme5.eval.mmeb import MMEB
from mme5.eval.run import evaluate
from mme5.health import batch_health
from mme5.losses import scatter_negatives
from mme5.module import EmbeddingModule, NonFiniteLossError, warmup_then_decay

ROOT = Path(__file__).resolve().parents[1]


class ParseOnly(train.TrainCLI):
    def instantiate_classes(self) -> None:  # parse and type-check the config, build nothing
        pass


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(config):
    cli = ParseOnly(args=["--config", str(config)], run=False)
    assert cli.config.model.backbone == cli.config.data.backbone
    assert cli.config.model.chunk_size == cli.config.data.chunk_size


MME5_MIX_RECIPES = sorted(c for c in (ROOT / "configs").glob("*.yaml") if "mmE5-synthetic" in c.read_text())


@pytest.mark.parametrize("config", MME5_MIX_RECIPES, ids=lambda p: p.name)
def test_recipes_on_the_mme5_mix_train_one_epoch_as_the_reference(config):
    """The reference trains one epoch (mme5.md §3); its length is the mix's size, counted from the manifests
    at start (max_steps -1), not a fixed step count that silently stops early or repeats data."""
    cli = ParseOnly(args=["--config", str(config)], run=False)
    assert (cli.config.trainer.max_steps, cli.config.trainer.max_epochs) == (-1, 1)
    assert all(s.max_samples == 50000 for s in cli.config.data.sources if "hardneg" in s.path)


# recipe → (tiny family, module-name parts that must be adapted, parts that must stay frozen)
RECIPE_TARGETS = {
    "mme5_llama32v_11b.yaml": ("mllama", ["language_model", "cross_attn", "vision_model", "down_proj"],
                               ["multi_modal_projector", "lm_head"]),
    "qwen2vl_7b.yaml": ("qwen2_vl", ["language_model", "visual.blocks", "down_proj"],
                        ["patch_embed", "merger", "lm_head"]),
    # Qwen2.5-VL's vision MLP has a down_proj too (SwiGLU): only the language model's may be adapted.
    "qwen2_5_vl_7b.yaml": ("qwen2_5_vl",
                           ["language_model", "visual.blocks", "attn.qkv", "attn.proj", "down_proj"],
                           ["patch_embed", "merger", "lm_head", "mlp.gate_proj", "visual.blocks.0.mlp"]),
    "qwen3_vl_8b.yaml": ("qwen3_vl",
                         ["language_model", "visual.blocks", "attn.qkv", "attn.proj", "gate_proj"],
                         ["patch_embed", "merger", "deepstack_merger_list", "linear_fc", "lm_head"]),
    # Qwen3.5: the Gated-DeltaNet layers' fused q,k,v and output gate too; their per-head decay and write
    # strength projections (in_proj_a, in_proj_b) and output projection stay frozen.
    "qwen3_5_9b.yaml": ("qwen3_5",
                        ["language_model", "visual.blocks", "in_proj_qkv", "in_proj_z", "self_attn.q_proj"],
                        ["patch_embed", "merger", "in_proj_a", "in_proj_b", "linear_attn.out_proj", "conv1d",
                         "lm_head"]),
    "llava_next_7b.yaml": ("llava", ["language_model", "vision_tower", "out_proj", "down_proj"],
                           ["multi_modal_projector", "patch_embedding", "lm_head"]),
    "llava_onevision_7b.yaml": ("llava_onevision",
                                ["language_model", "vision_tower", "self_attn.out_proj", "down_proj"],
                                ["multi_modal_projector", "patch_embedding", "image_newline", "lm_head",
                                 "mlp.fc1", "mlp.fc2"]),
    # Gemma 3: SigLIP's attention (out_proj) but not its MLP (fc1/fc2); the projector is a bare parameter.
    "gemma3_4b.yaml": ("gemma3", ["language_model", "vision_tower", "self_attn.k_proj", "out_proj",
                                  "down_proj"],
                       ["multi_modal_projector", "patch_embedding", "mlp.fc", "embed_tokens", "lm_head"]),
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_TARGETS))
def test_recipe_adapters_reach_the_language_and_vision_attention(recipe, tmp_path):
    """Each recipe's LoRA targets, applied to a tiny model of its family, adapt the language model's and the
    vision tower's attention (as the paper's recipe) and leave the projector and embeddings frozen."""
    from mme5.backbones import load_backbone
    from mme5.encoder import Encoder

    family, adapted, frozen = RECIPE_TARGETS[recipe]
    cli = ParseOnly(args=["--config", str(ROOT / "configs" / recipe)], run=False)
    lora = LoraSettings(**vars(cli.config.model.lora))
    encoder = Encoder(load_backbone(build_tiny(family, tmp_path / family)), lora)
    names = [name for name, _ in encoder.named_parameters() if "lora_A" in name]
    for part in adapted:
        assert any(part in name for name in names), (recipe, part)
    for part in frozen:
        assert not any(part in name for name in names), (recipe, part)


def test_command_line_overrides_reach_interpolated_paths():
    cli = ParseOnly(args=["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.default_root_dir",
                          "runs/other"], run=False)
    config = cli.config
    assert config.model.backbone == config.data.backbone == "runs/other/backbone"
    assert config.data.sources[0].path == "runs/other/world/train"
    assert {c.init_args.get("dirpath") or c.init_args.get("root") for c in config.trainer.callbacks} == {
        "runs/other/checkpoints", "runs/other/world/mmeb", "runs/other/world/mmeb-v2", "runs/other/world/xtd"}


def test_schedule_warms_up_then_decays():
    """The decay shapes; the warmup's first steps against the references are in test_parity_small.py."""
    assert warmup_then_decay(10, 10, 100, "linear") == pytest.approx(1.0)
    assert warmup_then_decay(55, 10, 100, "linear") == pytest.approx(0.5)
    assert warmup_then_decay(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert warmup_then_decay(100, 10, 100, "cosine") == pytest.approx(0.0)
    assert warmup_then_decay(55, 10, 100, "constant") == 1.0


def test_scatter_negatives_places_rows_in_their_slots():
    flat = torch.arange(6.0).view(3, 2)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    out = scatter_negatives(flat, mask)
    assert torch.equal(out[0, 0], flat[0]) and torch.equal(out[2, 1], flat[2])
    assert torch.equal(out[1], torch.zeros(2, 2))


class StopAt(L.Callback):
    """Ends fit after `step` steps, as a preemption would (the schedule still targets max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def make_run(tmp_path, backbone, shards, max_steps, stop_at=None, **module_kwargs):
    settings = dict(lora=LoraSettings(), gradient_checkpointing=True, chunk_size=4, temperature=0.05, lr=3e-3,
                    warmup=2, schedule="cosine") | module_kwargs
    module = EmbeddingModule(backbone, **settings)
    data = ShardDataModule([{"path": shards}], backbone, batch_size=8, num_negatives=2, chunk_size=4,
                           num_workers=0, shuffle_buffer=1, seed=1)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                      every_n_train_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb", version=""),
                        callbacks=[checkpoints] + ([StopAt(stop_at)] if stop_at else []),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    return trainer, module, data


def scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_fit_logs_and_resume_continues_the_same_run(tmp_path, tiny_mllama, tiny_shards):
    L.seed_everything(0)  # LoRA initialisation draws random numbers
    trainer, module, data = make_run(tmp_path, tiny_mllama, tiny_shards, max_steps=6, stop_at=4)
    trainer.fit(module, datamodule=data)
    loss = scalars(tmp_path / "tb", "train/loss")
    assert [step for step, _ in loss] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in loss)
    for tag in ("train/accuracy", "train/lr", "train/samples_per_sec", "train/data_wait_sec"):
        assert len(scalars(tmp_path / "tb", tag)) == 4
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert last["adapter_only"] and all("lora_" in key for key in last["state_dict"])  # no backbone weights
    assert last["ShardDataModule"]["positions"][0]["batches"] == 4

    # Resuming the interrupted run up to step 6 equals one uninterrupted run of 6 steps.
    resumed_trainer, resumed, resumed_data = make_run(tmp_path / "b", tiny_mllama, tiny_shards, 6)
    resumed_trainer.fit(resumed, datamodule=resumed_data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    straight_trainer, straight, straight_data = make_run(tmp_path / "c", tiny_mllama, tiny_shards, 6)
    L.seed_everything(0)
    straight_trainer.fit(straight, datamodule=straight_data)
    assert resumed_trainer.global_step == 6
    assert resumed_data.positions == straight_data.positions
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

    # The same adapters resumed on another backbone of the same shape: refused, both named.
    other = str(build_tiny("mllama", tmp_path / "other-backbone", seed=1, preset="test"))
    wrong_trainer, wrong, wrong_data = make_run(tmp_path / "d", other, tiny_shards, 6)
    refused = rf"trained on the backbone at {tiny_mllama}.*differs in its weights"
    with pytest.raises(ValueError, match=refused):
        wrong_trainer.fit(wrong, datamodule=wrong_data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_non_finite_loss_stops_with_the_last_good_state(tmp_path, tiny_mllama, tiny_shards, monkeypatch):
    trainer, module, data = make_run(tmp_path, tiny_mllama, tiny_shards, max_steps=5)
    original = module.loss_fn.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(module.loss_fn, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="global step 2"):
        trainer.fit(module, datamodule=data)
    saved = torch.load(tmp_path / "ckpt" / "last-good.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def full_batch_gradient(backbone, shards, record, chunk_size=3):
    """The single-process gradient of the mean loss over both ranks' batches, concatenated in rank order."""
    return full_batch_step(backbone, shards, record, chunk_size)[0]


def full_batch_step(backbone, shards, record, chunk_size=3, **settings):
    """`full_batch_gradient` and the step's health metrics (`mme5.health.batch_health`); `shards`: the run's
    shard folder, or a list of its sources' folders; `settings`: the module's other settings in the run."""
    learnable = "loss_fn.logit_scale" in record["initial"]
    module = EmbeddingModule(backbone, lora=LoraSettings(dropout=0.0), gradient_checkpointing=False,
                             gradient_cache=False, chunk_size=chunk_size, temperature=0.05,
                             learnable_temperature=learnable, **settings)
    module.configure_model()
    module.load_state_dict(record["initial"], strict=False)
    folders = [shards] if isinstance(shards, str | Path) else shards
    by_id = {s.id: s for folder in folders for s in read_samples(shard_urls(folder))}
    samples = [by_id[i] for ids in record["ids"] for i in ids]
    collator = ContrastiveCollator(module.encoder.adapter.collate, num_negatives=2, chunk_size=chunk_size)
    batch = collator(StreamBatch(samples, 0, {}))
    module.loss_fn.gather = False
    _, output = contrastive_step(module.encoder.encode_chunk, batch.query, batch.positive, batch.negatives,
                                 batch.negative_mask, module.loss_fn, positive_keys=batch.positive_keys,
                                 groups=module.temperature_rows(batch),
                                 matryoshka=module.matryoshka)  # plain: one forward, one backward
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}, batch_health(output)


# Gradient communication per step. DDP: none by its own reducer, one explicit flat all-reduce (the tiny model
# fits one bucket). FSDP: one reduce-scatter per block holding adapters (3 vision layers, 1 self-attention
# and 1 cross-attention decoder layer), once per step although the gradient cache runs 12 backwards. HSDP
# on a 2 x 1 mesh: shard groups of one rank have nothing to scatter; FSDP all-reduces across the replicas.
COMMUNICATION = {"ddp": {"ddp": 0, "explicit": 1, "reduce_scatter": 0},
                 "fsdp": {"ddp": 0, "explicit": 0, "reduce_scatter": 5},
                 "hsdp": {"ddp": 0, "explicit": 0, "reduce_scatter": 0}}


def run_distributed(out, backbone, shards, strategy, *options):
    """tests/scripts/distributed_step.py on 2 CPU processes; returns its record of the last step."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "tests" / "scripts" / "distributed_step.py"), backbone, shards,
               str(out), "--strategy", strategy, *options]
    done = subprocess.run(command, cwd=out, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=False)


@pytest.mark.parametrize(("strategy", "options"), [
    ("ddp", []), ("ddp", ["--no-cache"]), ("fsdp", []), ("fsdp", ["--no-cache"]), ("hsdp", []),
    # A replicated parameter beside the sharded ones, and clipping over both (a norm so high it cannot clip).
    ("fsdp", ["--learnable-temperature", "--grad-clip", "1e9"]),
], ids=["ddp-cache", "ddp-plain", "fsdp-cache", "fsdp-plain", "hsdp-cache", "fsdp-cache-temperature"])
def test_distributed_gradient_equals_the_full_batch_gradient(tmp_path, tiny_mllama, tiny_shards, strategy,
                                                             options):
    record = run_distributed(tmp_path, tiny_mllama, tiny_shards, strategy, *options)
    assert len(record["ids"]) == 2 and not set(record["ids"][0]) & set(record["ids"][1])
    replicated = {"explicit": 1} if "--learnable-temperature" in options else {}  # the temperature's
    assert record["allreduces"] == COMMUNICATION[strategy] | replicated
    # The checkpoint holds both ranks' stream positions (each rank only sees its own slot).
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert sorted(last["ShardDataModule"]["positions"]) == [0, 1]
    trained = [key for key in last["state_dict"] if "lora_" in key or key.startswith("loss_fn.")]
    assert last["adapter_only"] and trained == list(last["state_dict"])  # no backbone weight
    gradients, health = full_batch_step(tiny_mllama, tiny_shards, record)
    assert_same_gradients(record, gradients)
    # Health metrics over the global batch, not rank 0's half (its query spread, loss and chance differ).
    assert record["health"] == pytest.approx({key: float(value) for key, value in health.items()}, abs=1e-5)


def test_reference_gradient_scale_is_the_full_batch_gradient_over_ranks(tmp_path, tiny_mllama, tiny_shards):
    """`gradient_scale: per_rank` reproduces the reference's arithmetic: DeepSpeed averages the ranks'
    gradients of losses whose embeddings carry gradient only locally, i.e. the true gradient / ranks."""
    record = run_distributed(tmp_path, tiny_mllama, tiny_shards, "ddp", "--gradient-scale", "per_rank")
    expected = full_batch_gradient(tiny_mllama, tiny_shards, record)
    assert_same_gradients(record, {name: grad / 2 for name, grad in expected.items()})


def test_fsdp_in_bf16_matches_the_fp32_gradient_to_bf16_precision(tmp_path, tiny_mllama, tiny_shards):
    """bfloat16 weights, blocks gathered in bf16 under bf16-mixed autocast; adapters and gradients in fp32."""
    record = run_distributed(tmp_path, tiny_mllama, tiny_shards, "fsdp", "--bf16")
    assert {grad.dtype for grad in record["grads"].values()} == {torch.float32}
    # bf16 rounding (2^-8 relative per op) accumulated through the tiny model: 2-3.5% measured across tiny
    # backbones; a sync error (a missing average, a dropped rank) is off by 50% or more.
    assert_same_gradients(record, full_batch_gradient(tiny_mllama, tiny_shards, record), tolerance=5e-2)


def assert_same_gradients(record, expected, tolerance=1e-5):
    """Same gradients of the parameters the loss reaches. One it does not reach (LLaVA's last vision layer:
    its output is not used) has none in `expected`, and none or zeros in `record` (DDP's flat all-reduce
    fills missing gradients with zeros)."""
    names = sorted(n for n, grad in expected.items() if grad is not None)
    unreached = {n: grad for n, grad in record["grads"].items() if n not in names}
    assert set(names) <= set(record["grads"]) and set(unreached) <= set(expected)
    assert not any(grad.any() for grad in unreached.values())
    a = torch.cat([record["grads"][n].flatten() for n in names])
    e = torch.cat([expected[n].flatten() for n in names])
    assert ((a - e).norm() / e.norm()).item() < tolerance


def test_fsdp_resume_continues_the_same_run(tmp_path, tiny_mllama, tiny_shards):
    """With LoRA dropout and gradient checkpointing on, as in the paper's recipe."""
    options = ["--paper-settings", "--steps", "3"]
    straight = run_distributed(tmp_path / "straight", tiny_mllama, tiny_shards, "fsdp", *options)
    interrupted = tmp_path / "interrupted"
    run_distributed(interrupted, tiny_mllama, tiny_shards, "fsdp", *options, "--stop-at", "2")
    resumed = run_distributed(interrupted, tiny_mllama, tiny_shards, "fsdp", *options,
                              "--resume", str(interrupted / "ckpt" / "last.ckpt"))
    assert resumed["global_step"] == straight["global_step"] == 3
    assert resumed["ids"] == straight["ids"]
    assert any(not torch.equal(w, straight["initial"][n]) for n, w in straight["after"].items())
    for name, weight in straight["after"].items():
        torch.testing.assert_close(resumed["after"][name], weight, atol=1e-6, rtol=1e-5, msg=name)
    # The sharded run's checkpoint serves evaluation like any other.
    assert load_encoder(interrupted / "ckpt" / "last.ckpt").encoder.has_adapters


def test_newest_checkpoint_picks_the_latest_of_hpc_and_periodic_checkpoints(tmp_path):
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    assert train.newest_checkpoint(trainer) is None  # a first submission starts afresh
    (tmp_path / "ckpt").mkdir()
    hpc, last = tmp_path / "hpc_ckpt_2.ckpt", tmp_path / "ckpt" / "last.ckpt"
    step = tmp_path / "ckpt" / "step=5.ckpt"
    for age, path in ((200, tmp_path / "hpc_ckpt_1.ckpt"), (100, hpc), (60, step), (50, last)):
        torch.save({"global_step": age}, path)
        os.utime(path, (time.time() - age, time.time() - age))
    assert train.newest_checkpoint(trainer) == str(last)  # requeued after a node failure: no fresh hpc
    os.utime(hpc)
    assert train.newest_checkpoint(trainer) == str(hpc)  # requeued on SLURM's warning signal
    assert train.newest_checkpoint(trainer, prefer_last=True) == str(last)  # --ckpt_path last


def test_a_torn_newest_checkpoint_is_passed_over_with_a_warning(tmp_path):
    """A kill or a full disk during a write elsewhere left a truncated and an empty file: the next newest
    loadable checkpoint is chosen, and each bad file is named."""
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    (tmp_path / "ckpt").mkdir()
    good, torn, empty = (tmp_path / "ckpt" / name for name in ("step=1.ckpt", "last.ckpt", "step=2.ckpt"))
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    torch.save({"state_dict": {"w": torch.ones(1000)}}, torn)
    torn.write_bytes(torn.read_bytes()[:1500])
    empty.write_bytes(b"")
    for age, path in ((300, good), (200, empty), (100, torn)):
        os.utime(path, (time.time() - age, time.time() - age))
    with pytest.warns(UserWarning) as warned:
        for prefer_last in (False, True):
            assert train.newest_checkpoint(trainer, prefer_last=prefer_last) == str(good)
    messages = " ".join(str(w.message) for w in warned)
    assert f"{torn} is not a loadable checkpoint" in messages and f"{empty} is not a loadable" in messages


def test_checkpoints_are_written_beside_their_target_and_renamed(tmp_path, monkeypatch):
    """The checkpoint writer of train.py: a write that dies half-way leaves the previous checkpoint whole
    (and its temporary file is cleared by the next write)."""
    io_plugin, path = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    io_plugin.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)

    def dies_half_way(payload, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        io_plugin.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1 and checkpoint_problem(path) is None
    io_plugin.save_checkpoint({"global_step": 3}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_evaluation_during_fsdp_training_equals_single_process_evaluation(tmp_path, tiny_mllama, tiny_shards):
    """Ranks embed in lockstep (placeholder batches) and get the same scores as one process would."""
    world = WorldConfig(train_samples=0, eval_queries=4, eval_candidates=3, xtd_images=2)
    build_world(tmp_path / "world", world, progress=False)
    mmeb = str(tmp_path / "world" / "mmeb")
    record = run_distributed(tmp_path / "run", tiny_mllama, tiny_shards, "fsdp", "--mmeb", mmeb)
    module = EmbeddingModule(tiny_mllama, lora=LoraSettings(dropout=0.0), gradient_checkpointing=False)
    module.configure_model()
    module.load_state_dict(record["initial"], strict=False)
    summary, _ = evaluate(MMEB(mmeb, max_queries=4), module.encoder.eval().embed, batch_size=3)
    scores = {key.removeprefix("eval/mmeb/"): value for key, value in record["eval"].items()}
    assert len(summary.scalars) > 10
    for key, value in summary.scalars.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("popped", [False, True], ids=["state-dict", "popped-by-fsdp"])
def test_resuming_with_other_adapters_is_refused(tiny_mllama, popped):
    saved = EmbeddingModule(tiny_mllama, lora=LoraSettings(r=2, target_modules=["q_proj"]))
    saved.configure_model()
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    if popped:  # as ModelParallelStrategy leaves it: the weights already loaded
        del checkpoint["state_dict"]
    same = EmbeddingModule(tiny_mllama, lora=LoraSettings(r=2, target_modules=["q_proj"]))
    same.configure_model()
    same.on_load_checkpoint(checkpoint)
    other = EmbeddingModule(tiny_mllama, lora=LoraSettings(r=2, target_modules=["v_proj"]))
    other.configure_model()
    with pytest.raises(ValueError, match="does not match this model's adapters"):
        other.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("flag, value, key", [
    ("--data.batch_size", "-1", "data.batch_size"), ("--data.batch_size", "0", "data.batch_size"),
    ("--data.num_negatives", "-1", "data.num_negatives"), ("--data.num_workers", "-2", "data.num_workers"),
    ("--data.shuffle_buffer", "0", "data.shuffle_buffer"),
    ("--model.chunk_size", "-4", "data.chunk_size")])  # linked: the data module's chunks refuse it
def test_a_negative_data_size_is_refused_while_parsing(flag, value, key, capsys):
    """Case 16: a bad size is one usage error naming the key, before anything is built (it used to crash
    in the stream, or train on empty batches)."""
    with pytest.raises(SystemExit) as exit_:
        ParseOnly(args=["--config", str(ROOT / "configs" / "demo.yaml"), flag, value], run=False)
    assert exit_.value.code == 2
    assert f'error: Parser key "{key}"' in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):  # and from Python
        ShardDataModule([], "unused", batch_size=0)


def stream_of(tmp_path, samples, name="a"):
    """A shard source of these samples (in shards of 5)."""
    from mme5.data.shards import ShardWriter

    with ShardWriter(tmp_path / name, max_count=5) as writer:
        for sample in samples:
            writer.write(sample)
    return str(tmp_path / name)


def first_batch(data):
    """What the trainer does with the first batch: the data module records its slot's position and counts."""
    batch = next(iter(data.train_dataloader()))
    return data.on_before_batch_transfer(batch, 0)


def test_a_source_with_other_content_under_the_same_name_is_refused_on_resume(tmp_path, tiny_mllama):
    """Case 6: the saved stream positions point into the shards the run read; a resume over other content
    in the same folder would read other samples from the old positions. Same content resumes; another
    source name reads the new content from its start."""
    from helpers import make_sample

    from mme5.data.stream import SourceRefused

    path = stream_of(tmp_path, [make_sample(i, id=f"a{i}") for i in range(12)])

    def data(name=None):
        return ShardDataModule([{"path": path, "name": name}], tiny_mllama, batch_size=4, num_negatives=1,
                               num_workers=0, shuffle_buffer=1)

    run = data()
    batches = iter(run.train_dataloader())
    run.on_before_batch_transfer(next(batches), 0)
    state = torch.load(_saved(tmp_path, run.state_dict()), weights_only=True)  # as a checkpoint holds it
    same = data()
    same.load_state_dict(state)
    assert first_batch(same).ids == next(batches).ids  # same content: resumes where the run stopped
    stream_of(tmp_path, [make_sample(i, id=f"b{i}") for i in range(12)])  # converted again, other samples
    changed = data()
    changed.load_state_dict(state)
    with pytest.raises(SourceRefused, match=rf"data.sources\[0\] a \({path}\) is not the data this run's "
                                            r"saved stream positions point into: 3 changed: shard-000000.tar"
                                            r".*another name") as refused:
        changed.train_dataloader()
    assert "12 samples" not in str(refused.value) and "5 samples" in str(refused.value)
    renamed = data("a-reconverted")
    renamed.load_state_dict(state)
    assert first_batch(renamed).ids == first_batch(data("a-reconverted")).ids  # from its start, as a new run


def _saved(tmp_path, state):
    torch.save(state, tmp_path / "state.pt")
    return tmp_path / "state.pt"


def test_text_cut_to_max_length_is_counted_in_the_data_report(tmp_path, tiny_mllama):
    """Case 14: truncation keeps its rule and is counted: the data report (data_report.json) says how many
    items were cut, also after a resume."""
    from helpers import make_sample

    from mme5.backbones import InputFormat
    from mme5.data.schema import Modality, Side

    samples = [make_sample(i, Modality.T2I, negatives=0) for i in range(9)]
    for sample in samples[::3]:
        sample.query = Side(instruction="find it", text="a very long caption " * 100)
    data = ShardDataModule([{"path": stream_of(tmp_path, samples)}], tiny_mllama, batch_size=9,
                           num_negatives=0, num_workers=0, shuffle_buffer=1, input_format=InputFormat(64))
    first_batch(data)
    report = data.skip_report()
    assert report["truncated_items"] == 3 and report["max_length"] == 64
    resumed = ShardDataModule([{"path": stream_of(tmp_path, samples)}], tiny_mllama, batch_size=9,
                              num_negatives=0, num_workers=0, shuffle_buffer=1, input_format=InputFormat(64))
    resumed.load_state_dict(data.state_dict())
    assert resumed.skip_report()["truncated_items"] == 3  # the run's count, not the resumed process's
