"""InfoNCE against an independent brute force, exact masking, temperature and autocast handling."""

import math

import pytest
import torch
import torch.nn.functional as F

from mme5.losses import InfoNCE


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def brute_force(q, p, n, mask, logit_scale, keys=None):
    """Mean over queries of -log softmax, candidate by candidate in float64 (own negatives only); with
    `keys`, another positive with the query's own positive's key is no candidate."""
    scale = logit_scale.double().exp()
    losses, correct = [], 0
    for i in range(q.shape[0]):
        excluded = torch.tensor(float("-inf"), dtype=torch.float64)
        scores = [scale * torch.dot(q[i].double(), p[j].double())
                  if keys is None or j == i or keys[j] != keys[i] else excluded for j in range(p.shape[0])]
        for k in range(0 if n is None else n.shape[1]):
            if mask is None or mask[i, k]:
                scores.append(scale * torch.dot(q[i].double(), n[i, k].double()))
        log_normaliser = torch.stack(scores).exp().sum().log()
        losses.append(log_normaliser - scores[i])
        correct += all(scores[i] > s for j, s in enumerate(scores) if j != i)
    return torch.stack(losses).mean(), correct / q.shape[0]


@pytest.mark.parametrize("with_negatives", [False, True])
def test_matches_brute_force(with_negatives):
    q, p = unit(5, 8, seed=1), unit(5, 8, seed=2)
    n = unit(5, 3, 8, seed=3) if with_negatives else None
    mask = (
        torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 1]]).bool()
        if with_negatives
        else None
    )
    out = InfoNCE(temperature=0.05, gather=False)(q, p, n, mask)
    expected, accuracy = brute_force(q, p, n, mask, torch.tensor(math.log(20.0)))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.accuracy.item() == pytest.approx(accuracy)
    assert out.logits.shape == (5, 5 + (3 if with_negatives else 0))
    assert out.labels.tolist() == list(range(5))
    assert out.temperature.item() == pytest.approx(0.05)


def test_learnable_temperature_value_and_gradients_match_brute_force():
    q, p, n = unit(4, 6, seed=4), unit(4, 6, seed=5), unit(4, 2, 6, seed=6)
    mask = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]]).bool()
    loss_fn = InfoNCE(temperature=0.1, learnable_temperature=True, gather=False)
    q1, n1 = q.clone().requires_grad_(), n.clone().requires_grad_()
    loss_fn(q1, p, n1, mask).loss.backward()

    logit_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    q2, n2 = q.double().requires_grad_(), n.double().requires_grad_()
    expected, _ = brute_force(q2, p, n2, mask, logit_scale)
    expected.backward()
    assert loss_fn.logit_scale.grad.item() == pytest.approx(logit_scale.grad.item(), rel=1e-5)
    torch.testing.assert_close(q1.grad, q2.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n1.grad, n2.grad.float(), rtol=1e-5, atol=1e-6)


def test_learnable_temperature_is_clamped_at_minimum():
    loss_fn = InfoNCE(temperature=0.05, learnable_temperature=True, gather=False, min_temperature=0.02)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(1000.0))
    out = loss_fn(unit(3, 4), unit(3, 4, seed=1))
    assert out.temperature.item() == pytest.approx(0.02)
    out.loss.backward()
    assert loss_fn.logit_scale.grad.item() == 0.0


def test_masked_negative_equals_loss_with_only_the_real_negative():
    q, p, n = unit(3, 8, seed=7), unit(3, 8, seed=8), unit(3, 3, 8, seed=9)
    slot = torch.tensor([1, 0, 2])  # the single real negative of each sample
    mask = F.one_hot(slot, 3).bool()  # (3, 3): 1 of 3 negatives present per sample
    padded = n.clone().masked_fill(~mask[..., None], float("nan")).requires_grad_()  # junk in empty slots
    only = n[torch.arange(3), slot][:, None].clone().requires_grad_()  # (3, 1, 8)
    loss_fn = InfoNCE(temperature=0.02, learnable_temperature=True, gather=False)

    masked_loss = loss_fn(q, p, padded, mask).loss
    masked_loss.backward()
    scale_grad = loss_fn.logit_scale.grad.clone()
    loss_fn.logit_scale.grad = None
    single_loss = loss_fn(q, p, only).loss
    single_loss.backward()

    assert masked_loss.item() == single_loss.item()
    assert torch.equal(padded.grad[~mask], torch.zeros(6, 8))  # masked entries: exactly zero gradient
    torch.testing.assert_close(padded.grad[mask], only.grad[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(scale_grad, loss_fn.logit_scale.grad, rtol=0, atol=0)


def test_accuracy_needs_a_strictly_highest_positive():
    q = torch.eye(3)
    p = torch.eye(3).clone()
    p[1] = p[0]  # query 0 ties between positive 0 and positive 1; query 1 no longer matches its positive
    out = InfoNCE(gather=False)(q, p)
    assert out.accuracy.item() == pytest.approx(1 / 3)


def test_runs_in_float32_under_bf16_autocast():
    q, p, n = unit(4, 8, seed=10), unit(4, 8, seed=11), unit(4, 2, 8, seed=12)
    loss_fn = InfoNCE(gather=False)
    expected = loss_fn(q, p, n).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(q.bfloat16(), p.bfloat16(), n.bfloat16())
    assert out.logits.dtype == torch.float32
    reference = loss_fn(q.bfloat16().float(), p.bfloat16().float(), n.bfloat16().float()).loss
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(expected.item(), rel=0.05)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="negative_mask"):
        InfoNCE(gather=False)(unit(2, 4), unit(2, 4), unit(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        InfoNCE(gather=False)(unit(2, 4), unit(3, 4))


def test_false_negatives_are_masked_as_a_brute_force_leaves_them_out():
    """Positives with the same content as a query's own positive are no candidates of that query; its own
    positive always is, even when every positive of the batch is the same."""
    q, p, n = unit(6, 8, seed=1), unit(6, 8, seed=2), unit(6, 2, 8, seed=3)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 0]]).bool()
    for keys in ([7, 8, 7, 9, 8, 7], [5] * 6, list(range(6))):
        keys = torch.tensor(keys)
        out = InfoNCE(temperature=0.05, gather=False, mask_false_negatives=True)(q, p, n, mask, keys)
        expected, accuracy = brute_force(q, p, n, mask, torch.tensor(math.log(20.0)), keys.tolist())
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert out.accuracy.item() == pytest.approx(accuracy)
        assert torch.isfinite(out.logits[torch.arange(6), out.labels]).all()  # the own positive stays
        duplicates = sum(int((keys == keys[i]).sum()) - 1 for i in range(6)) / 6
        assert out.false_negatives.item() == pytest.approx(duplicates)
    unmasked = InfoNCE(temperature=0.05, gather=False)(q, p, n, mask, torch.tensor([5] * 6))
    reference = brute_force(q, p, n, mask, torch.tensor(math.log(20.0)))[0]
    assert unmasked.loss.item() == pytest.approx(reference.item(), rel=1e-5)  # off: duplicates stay negatives
    with pytest.raises(ValueError, match="needs positive_keys"):
        InfoNCE(mask_false_negatives=True, gather=False)(q, p)
