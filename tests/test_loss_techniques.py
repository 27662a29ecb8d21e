"""Training techniques on the InfoNCE score matrix (issue 26 items 1-3), each against a float64 brute force:
hardness-weighted negatives (and sentence-transformers' own loss), false-negative elimination by similarity,
task-specific learnable temperatures; each through the gradient cache and 2-process DDP."""

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_gradcache import (
    CHUNK,
    GROUPS,
    LOCAL_B,
    WORLD,
    Encoder,
    assert_rel_close,
    grads,
    local_batch,
    make_batch,
)
from test_train import full_batch_step, make_run, run_distributed, scalars
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mme5.contrastive import temperature_group_rows
from mme5.gradcache import GradCache, split_batch
from mme5.losses import InfoNCE
from mme5.model_card import model_card
from mme5.resume import ResumeRefused, check_recipe


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def brute_force(q, p, n, mask, log_scales, keys=None, hardness=None, alpha=0.0, threshold=None, margin=None):
    """Mean over queries of -log softmax in float64, candidate by candidate; `log_scales` (B,): each query's
    log(1 / tau). Returns (loss, {rule: dropped candidates per query})."""
    losses, dropped = [], {"content": 0, "threshold": 0, "margin": 0}
    for i in range(q.shape[0]):
        # (cosine, is in-batch, embedding, in-batch index) of every real candidate but the own positive
        others = [(q[i].double() @ p[j].double(), True, p[j], j) for j in range(p.shape[0]) if j != i]
        others += [(q[i].double() @ n[i, k].double(), False, n[i, k], None)
                   for k in range(0 if n is None else n.shape[1]) if mask is None or mask[i, k]]
        own = q[i].double() @ p[i].double()
        scale = log_scales[i].double().exp()
        logits = [scale * own]
        for cos, in_batch, embedding, j in others:
            rules = {"content": keys is not None and in_batch and keys[j] == keys[i],
                     "threshold": threshold is not None and float((embedding @ p[i]).detach()) > threshold,
                     "margin": margin is not None and float(cos.detach()) > float(own.detach()) + margin}
            for rule, hit in rules.items():
                dropped[rule] += hit
            if any(rules.values()):
                continue
            penalised = hardness == "all_negatives" or (hardness == "in_batch_negatives") == in_batch
            logits.append(scale * cos + (alpha * cos.detach() if hardness and penalised else 0.0))
        losses.append(torch.stack(logits).logsumexp(0) - logits[0])
    return torch.stack(losses).mean(), {rule: count / q.shape[0] for rule, count in dropped.items()}


def batch_case(seed=0):
    """5 queries, their positives (positive 3 almost equal to positive 0), 3 negatives each, some missing."""
    q, p, n = unit(5, 8, seed=seed), unit(5, 8, seed=seed + 1), unit(5, 3, 8, seed=seed + 2)
    p[3] = F.normalize(p[0] + 0.1 * unit(8, seed=seed + 3), dim=0)
    n[1, 0] = F.normalize(p[1] + 0.1 * unit(8, seed=seed + 4), dim=0)  # a hard negative near its positive
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 1]]).bool()
    return q, p, n, mask


# ----------------------------------------------------------------------------- 1. hardness weighting


@pytest.mark.parametrize("mode", ["in_batch_negatives", "hard_negatives", "all_negatives"])
def test_hardness_weighting_matches_a_brute_force_in_value_and_gradient(mode):
    q, p, n, mask = batch_case()
    leaves = [x.clone().requires_grad_() for x in (q, p, n)]
    out = InfoNCE(temperature=0.05, gather=False, hardness_mode=mode, hardness_strength=5.0)(*leaves, mask)
    out.loss.backward()
    doubles = [x.double().requires_grad_() for x in (q, p, n)]
    expected, _ = brute_force(*doubles, mask, torch.full((5,), math.log(20.0)), hardness=mode, alpha=5.0)
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for leaf, double in zip(leaves, doubles, strict=True):  # the penalty is stop-gradient: its cosines' not
        torch.testing.assert_close(leaf.grad, double.grad.float(), rtol=1e-5, atol=1e-6)
    plain = InfoNCE(temperature=0.05, gather=False)(q, p, n, mask).loss
    assert out.loss.item() > plain.item() + 1e-3  # the penalty moved the loss


def sentence_transformers_loss(mode, embeddings):
    """sentence-transformers' own MultipleNegativesRankingLoss on `embeddings` [queries, positives,
    negative 1, ...] (no model runs: its loss-from-embeddings step), at temperature 0.05 and α 9."""
    losses = pytest.importorskip("sentence_transformers.losses")
    loss = losses.MultipleNegativesRankingLoss(nn.Identity(), scale=20.0, hardness_mode=mode,
                                               hardness_strength=9.0)
    return loss.compute_loss_from_embeddings(embeddings, labels=None)


def test_in_batch_hardness_equals_sentence_transformers_on_the_same_embeddings():
    """In value and in gradient w.r.t. unnormalised embeddings (its cosine normalises them; ours takes unit
    vectors, which the encoder normalises)."""
    q, p = torch.randn(6, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(), unit(6, 8, seed=4)
    ours = InfoNCE(temperature=0.05, gather=False, hardness_mode="in_batch_negatives", hardness_strength=9.0)
    loss = ours(F.normalize(q, dim=-1), p).loss
    (ours_grad,) = torch.autograd.grad(loss, q)
    theirs = sentence_transformers_loss("in_batch_negatives", [q, p])
    (their_grad,) = torch.autograd.grad(theirs, q)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6)  # both float32 (loss ~17)
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hard_negatives", "all_negatives"])
def test_hard_negative_hardness_equals_sentence_transformers_where_both_define_the_same_softmax(mode):
    """sentence-transformers scores a query against every sample's hard negatives, mmE5 against its own: the
    two softmaxes agree for one query at a time, so compare query by query."""
    q, p, n, _ = batch_case(seed=5)
    ours = InfoNCE(temperature=0.05, gather=False, hardness_mode=mode, hardness_strength=9.0)
    for i in range(q.shape[0]):
        theirs = sentence_transformers_loss(mode, [q[i:i + 1], p[i:i + 1], *n[i:i + 1].unbind(1)])
        loss = ours(q[i:i + 1], p[i:i + 1], n[i:i + 1]).loss
        assert loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6)


def test_hardness_settings_that_would_do_nothing_are_refused():
    with pytest.raises(ValueError, match="hardness_mode must be one of"):
        InfoNCE(hardness_mode="hard", hardness_strength=1.0)
    for mode, strength in (("in_batch_negatives", 0.0), (None, 9.0), ("hard_negatives", -1.0)):
        with pytest.raises(ValueError, match="go together"):
            InfoNCE(hardness_mode=mode, hardness_strength=strength)


# ----------------------------------------------------------------------------- 2. false negatives


@pytest.mark.parametrize("rules", [{"threshold": 0.95}, {"margin": 0.1}, {"threshold": 0.3, "margin": 0.05},
                                   {"threshold": 0.5, "margin": 0.2, "keys": [7, 8, 7, 9, 8]}])
def test_false_negative_rules_drop_what_a_brute_force_drops(rules):
    q, p, n, mask = batch_case(seed=2)
    keys = torch.tensor(rules["keys"]) if "keys" in rules else None
    loss_fn = InfoNCE(temperature=0.05, gather=False, mask_false_negatives=keys is not None,
                      false_negative_threshold=rules.get("threshold"),
                      false_negative_margin=rules.get("margin"))
    leaves = [x.clone().requires_grad_() for x in (q, p, n)]
    out = loss_fn(*leaves, mask, keys)
    out.loss.backward()
    doubles = [x.double().requires_grad_() for x in (q, p, n)]
    expected, dropped = brute_force(*doubles, mask, torch.full((5,), math.log(20.0)), keys=keys,
                                    threshold=rules.get("threshold"), margin=rules.get("margin"))
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for leaf, double in zip(leaves, doubles, strict=True):
        torch.testing.assert_close(leaf.grad, double.grad.float(), rtol=1e-5, atol=1e-6)
    active = {rule for rule in ("threshold", "margin") if rule in rules}
    active |= {"content"} if keys is not None else set()
    assert set(out.false_negatives_by_rule) == active
    for rule in active:
        assert dropped[rule] > 0  # the case exercises the rule
        assert out.false_negatives_by_rule[rule].item() == pytest.approx(dropped[rule])
    rows = torch.arange(5)
    assert torch.isfinite(out.logits[rows, out.labels]).all()  # the own positive is never dropped
    masked = (~torch.isfinite(out.logits)).sum().item() - (~mask).sum().item()
    assert out.false_negatives.item() == pytest.approx(masked / 5)  # the union of the rules


def test_false_negative_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="false_negative_threshold is a cosine"):
        InfoNCE(false_negative_threshold=1.5)
    with pytest.raises(ValueError, match="false_negative_margin must be at least 0"):
        InfoNCE(false_negative_margin=-0.1)


# ----------------------------------------------------------------------------- 3. task temperatures


def test_task_temperatures_give_each_row_its_groups_temperature_as_a_brute_force():
    q, p, n, mask = batch_case(seed=7)
    names = ("retrieval", "vqa", "classification")
    loss_fn = InfoNCE(temperature=0.05, gather=False, temperature_groups=names)
    with torch.no_grad():
        loss_fn.group_logit_scales.copy_(torch.tensor([math.log(20.0), math.log(50.0), math.log(10.0)]))
    groups = torch.tensor([2, 0, 0, 1, 2])
    out = loss_fn(q, p, n, mask, groups=groups)
    out.loss.backward()
    log_scales = torch.tensor([math.log(20.0), math.log(50.0), math.log(10.0)], dtype=torch.float64,
                              requires_grad=True)
    expected, _ = brute_force(q, p, n, mask, log_scales[groups])
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(loss_fn.group_logit_scales.grad, log_scales.grad.float(), rtol=1e-5, atol=1e-7)
    temperatures = {g: t.item() for g, t in loss_fn.group_temperatures().items()}
    assert temperatures == pytest.approx({"retrieval": 0.05, "vqa": 0.02, "classification": 0.1})
    assert out.temperature.item() == pytest.approx((0.1 + 0.05 + 0.05 + 0.02 + 0.1) / 5)


def test_task_temperatures_are_bounded_like_the_learnable_temperature():
    loss_fn = InfoNCE(temperature=0.05, gather=False, min_temperature=0.02, temperature_groups=("a", "b"))
    with torch.no_grad():
        loss_fn.group_logit_scales[1] = math.log(1000.0)
    loss_fn(unit(3, 4), unit(3, 4, seed=1), groups=torch.tensor([0, 1, 1])).loss.backward()
    assert loss_fn.group_temperatures()["b"].item() == pytest.approx(0.02)
    assert loss_fn.group_logit_scales.grad[1].item() == 0.0 and loss_fn.group_logit_scales.grad[0].item() != 0
    with pytest.raises(ValueError, match="need each query's group index"):
        loss_fn(unit(3, 4), unit(3, 4, seed=1))
    with pytest.raises(ValueError, match="replaces learnable_temperature"):
        InfoNCE(learnable_temperature=True, temperature_groups=("a",))


def test_rows_find_their_group_by_task_or_by_a_source_mapping():
    by_task = InfoNCE(temperature_groups=("classification", "retrieval"))
    tasks = ["retrieval", "classification", "retrieval"]
    rows = temperature_group_rows(by_task, tasks, ["x", "y", "z"], None)
    assert rows.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"rows of task \['vqa'\] have no temperature group"):
        temperature_group_rows(by_task, ["vqa"], ["x"], None)
    by_source = InfoNCE(temperature_groups=("docs", "photos"))
    mapping = {"coco": "photos", "docvqa": "docs", "flickr": "photos"}
    rows = temperature_group_rows(by_source, ["vqa", "retrieval"], ["docvqa", "flickr"], mapping)
    assert rows.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"maps no group to the sources \['mscoco'\]"):
        temperature_group_rows(by_source, ["retrieval"], ["mscoco"], mapping)
    assert temperature_group_rows(InfoNCE(), ["vqa"], ["x"], None) is None


# ----------------------------------------------------------------------------- composition

TECHNIQUES = {
    "hardness-in-batch": {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0},
    "hardness-all": {"hardness_mode": "all_negatives", "hardness_strength": 5.0},
    "false-negatives": {"false_negative_threshold": 0.3, "false_negative_margin": 0.05},
    "task-temperatures": {"temperature_groups": ("a", "b", "c")},
}
ROW_GROUPS = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])  # (WORLD * LOCAL_B,) each sample's temperature group


def loss_on(loss: InfoNCE, mask: torch.Tensor, groups: torch.Tensor):
    """The loss on {group: embeddings} of `test_gradcache.make_batch`, negatives reshaped to (B, K, D)."""

    def loss_fn(emb: dict[str, torch.Tensor]):
        negatives = emb["negatives"].view(*mask.shape, -1)
        rows = groups if loss.group_names else None
        return loss(emb["query"], emb["positive"], negatives, mask, groups=rows)

    return loss_fn


def technique_loss(name: str, **options) -> InfoNCE:
    loss = InfoNCE(temperature=0.05, **TECHNIQUES[name], **options)
    if loss.group_logit_scales is not None:  # groups start apart, so a row using another's shows
        with torch.no_grad():
            loss.group_logit_scales.copy_(torch.tensor([math.log(20.0), math.log(40.0), math.log(10.0)]))
    return loss


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_each_technique_through_the_gradient_cache_gives_the_full_batch_gradient(name):
    torch.manual_seed(0)
    model, batch = Encoder(), make_batch(8)
    loss = technique_loss(name, gather=False)
    loss_fn = loss_on(loss, batch["mask"], ROW_GROUPS)
    torch.manual_seed(1)
    emb = {group: torch.cat([model(c) for c in split_batch(batch[group], 3)]) for group in GROUPS}
    expected_output = loss_fn(emb)
    expected_output.loss.backward()
    expected = grads(model, loss)
    torch.manual_seed(1)
    inputs = {group: batch[group] for group in GROUPS}
    _, output = GradCache(3).step(model, inputs, loss_fn, list(loss.parameters()))
    assert_rel_close(grads(model, loss), expected, 1e-5)
    assert output.loss.item() == pytest.approx(expected_output.loss.item(), rel=1e-6)
    if name == "false-negatives":
        assert output.false_negatives.item() > 0


def _ddp_worker(rank: int, out_dir: str) -> None:
    """Every technique's gradient-cache step under 2-process DDP (see test_gradcache's worker)."""
    store, timeout = f"file://{Path(out_dir) / 'store'}", timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timeout)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(Encoder())
    batch = local_batch(make_batch(WORLD * LOCAL_B), rank)
    groups = ROW_GROUPS[rank * LOCAL_B:(rank + 1) * LOCAL_B]
    results = {}
    for name in TECHNIQUES:
        loss = technique_loss(name)
        torch.manual_seed(100 + rank)
        inputs = {group: batch[group] for group in GROUPS}
        GradCache(CHUNK, no_sync=ddp.no_sync).step(ddp, inputs, loss_on(loss, batch["mask"], groups),
                                                    list(loss.parameters()))
        for p in loss.parameters():  # the loss's own parameters are averaged like the model's (DDP's job)
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        results[name] = grads(ddp, loss)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # as test_gradcache's worker: no teardown in destructors


def _full_batch_gradients(name: str) -> list[torch.Tensor]:
    """The gradient of the mean loss over both ranks' batches in one process, slices encoded as they were."""
    torch.manual_seed(0)
    model, full = Encoder(), make_batch(WORLD * LOCAL_B)
    emb: dict[str, list[torch.Tensor]] = {group: [] for group in GROUPS}
    for rank in range(WORLD):
        torch.manual_seed(100 + rank)
        local = local_batch(full, rank)
        for group in GROUPS:
            emb[group] += [model(c) for c in split_batch(local[group], CHUNK)]
    loss = technique_loss(name, gather=False)
    loss_on(loss, full["mask"], ROW_GROUPS)({group: torch.cat(c) for group, c in emb.items()}).loss.backward()
    return grads(model, loss)


def test_each_technique_under_two_process_ddp_gives_the_full_batch_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for name in TECHNIQUES:
        expected = _full_batch_gradients(name)
        for result in results:
            assert_rel_close(result[name], expected, 1e-5)


# ----------------------------------------------------------------------------- records


def test_a_technique_changed_on_resume_is_refused_and_older_records_resume_unchanged():
    """The techniques are recipe settings: each changes the trained model (task temperatures its parameters
    too), so a resume with another value is refused by name. A record from before they existed trained
    without them: resuming it with the defaults is the same recipe."""
    backbone = {"config": "c", "weights": "w"}
    before = {"hyper_parameters": {"temperature": 0.02}}
    defaults = {"temperature": 0.02, "hardness_mode": None, "hardness_strength": 0.0,
                "false_negative_threshold": None, "false_negative_margin": None, "task_temperatures": False,
                "temperature_groups": None}
    check_recipe("last.ckpt", before, defaults, backbone, "mme5")
    changes = {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0,
               "false_negative_threshold": 0.95, "false_negative_margin": 0.1, "task_temperatures": True,
               "temperature_groups": {"coco": "photos"}, "matryoshka_dims": [8, 4],
               "matryoshka_weights": [1.0, 0.5]}
    for key, value in changes.items():
        with pytest.raises(ResumeRefused, match=rf"model.{key}"):
            check_recipe("last.ckpt", {"hyper_parameters": defaults}, defaults | {key: value}, backbone,
                         "mme5")


def test_the_model_card_lists_the_techniques_switched_on():
    hparams = {"temperature": 0.02, "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0,
               "false_negative_threshold": None, "task_temperatures": False}
    card = model_card(name="m", family="mllama", backbone="b", recipe={"hyper_parameters": hparams},
                      instructions={}, input_format={}, adapter_only=False)
    assert "| hardness_mode | in_batch_negatives |" in card and "| hardness_strength | 9.0 |" in card
    assert "false_negative_threshold" not in card and "task_temperatures" not in card


# ----------------------------------------------------------------------------- the training module

# As tests/scripts/distributed_step.py's --techniques. The untrained tiny backbone embeds everything at cosine
# 0.98-0.995 to everything: a threshold or margin of the papers' size would drop every candidate (loss 0).
MODULE_TECHNIQUES = {"hardness_mode": "all_negatives", "hardness_strength": 5.0,
                     "false_negative_threshold": 0.995, "false_negative_margin": 0.005,
                     "task_temperatures": True}


def test_training_with_every_technique_logs_them_and_checkpoints_them(tmp_path, tiny_mllama, tiny_shards):
    trainer, module, data = make_run(tmp_path, tiny_mllama, tiny_shards, 2, **MODULE_TECHNIQUES)
    trainer.fit(module, datamodule=data)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert {key: saved["hyper_parameters"][key] for key in MODULE_TECHNIQUES} == MODULE_TECHNIQUES
    assert saved["state_dict"]["loss_fn.group_logit_scales"].shape == (4,)  # one per task type
    for tag in ("train/false_negatives", "train/false_negatives/threshold", "train/false_negatives/margin",
                "train/temperature/retrieval", "train/temperature/vqa"):
        assert [step for step, _ in scalars(tmp_path / "tb", tag)] == [0, 1], tag


@pytest.mark.slow
def test_every_technique_under_lightning_fsdp_gives_the_full_batch_gradient(tmp_path, tiny_mllama,
                                                                            tiny_shards):
    """The module's path: chunks through the gradient cache, FSDP2 on 2 processes, the group temperatures a
    replicated parameter beside the sharded adapters."""
    record = run_distributed(tmp_path, tiny_mllama, tiny_shards, "fsdp", "--techniques")
    assert "loss_fn.group_logit_scales" in record["grads"]
    gradients, _ = full_batch_step(tiny_mllama, tiny_shards, record, **MODULE_TECHNIQUES)
    names = sorted(gradients)
    actual = torch.cat([record["grads"][n].flatten() for n in names])
    expected = torch.cat([gradients[n].flatten() for n in names])
    assert expected.norm() > 0  # some candidates are left to learn from
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5
