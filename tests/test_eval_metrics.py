import numpy as np
import pytest
import torch

from mme5.eval.metrics import gold_ranks, metrics_from_ranks
from mme5.eval.registry import META_TASKS, MMEB, aggregate, load_registry, save_registry


def brute_force_rank(row, gold):
    """Rank by explicit comparison: 1 + number of other candidates at least as good as the gold."""
    return 1 + sum(1 for j, s in enumerate(row) if j != gold and s >= row[gold])


def test_ranks_match_brute_force_including_ties():
    torch.manual_seed(0)
    scores = torch.randint(0, 4, (50, 7)).float()  # many exact ties
    gold = torch.randint(0, 7, (50,))
    expected = [brute_force_rank(scores[i].tolist(), int(gold[i])) for i in range(50)]
    assert gold_ranks(scores, gold).tolist() == expected


def reference_rank(row, gold):
    """The reference's argmax, written out: position of the gold in a stable sort by descending score."""
    order = sorted(range(len(row)), key=lambda j: -row[j])  # sorted() is stable: equal scores keep list order
    return 1 + order.index(gold)


def test_reference_tie_rule_is_the_first_maximum_in_list_order():
    torch.manual_seed(1)
    scores = torch.randint(0, 4, (50, 7)).float()
    gold = torch.randint(0, 7, (50,))
    expected = [reference_rank(scores[i].tolist(), int(gold[i])) for i in range(50)]
    assert gold_ranks(scores, gold, ties="argmax").tolist() == expected
    constant = torch.zeros(3, 5)  # MMEB: gold at index 0, so a constant model is always right
    assert gold_ranks(constant, torch.zeros(3, dtype=torch.long), ties="argmax").tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="ties must be one of"):
        gold_ranks(constant, torch.zeros(3, dtype=torch.long), ties="optimistic")


def argsort_hit(row, gold, k):
    """mmE5's XTD recall@k, written out: is the gold among the last k of numpy's ascending argsort?"""
    return gold in np.argsort(np.asarray(row, dtype=np.float32))[-k:]


# Ties at every cut: a tied block straddling k = 1, 2, 5 and 10, the gold inside it, at index 0 (XTD rows)
# or elsewhere; wide enough rows (12, 40 candidates) that numpy's sort does not keep ties in list order.
TIED = [[1, 1, 0], [1, 1, 1, 1], [0, 2, 2, 1, 2], [3, 2, 2, 2, 2, 2, 2, 0, 1, 2, 2, 2],
        [1] * 40, [2] * 5 + [1] * 35]


@pytest.mark.parametrize("row", TIED, ids=range(len(TIED)))
def test_argsort_rule_is_the_reference_xtd_recall(row):
    scores = torch.tensor([row] * len(row), dtype=torch.float32)
    gold = torch.arange(len(row))  # every position as the gold in turn
    ranks = gold_ranks(scores, gold, ties="argsort")
    for k in (1, 2, 5, 10):
        assert [r <= k for r in ranks.tolist()] == [argsort_hit(row, g, k) for g in range(len(row))]
    # the tied block at the top holds exactly k hits wherever numpy put its members
    assert (ranks <= 1).sum() == 1 and sorted(ranks.tolist()) == list(range(1, len(row) + 1))


def test_argsort_rule_differs_from_both_other_rules_at_a_tied_cut():
    """[1, 1, 0] at k = 1: the argmax rule gives the hit to index 0, the pessimistic rule to nobody, the
    argsort rule to exactly one of the tied pair; 40 tied candidates: numpy does not pick index 0 last."""
    pair = torch.tensor([[1.0, 1.0, 0.0]] * 2)
    golds = torch.tensor([0, 1])
    assert (gold_ranks(pair, golds, ties="argmax") <= 1).tolist() == [True, False]
    assert (gold_ranks(pair, golds) <= 1).tolist() == [False, False]
    assert (gold_ranks(pair, golds, ties="argsort") <= 1).sum() == 1
    flat = torch.ones(1, 40)
    at_zero = torch.tensor([0])
    assert gold_ranks(flat, at_zero, ties="argsort").item() > 1  # the gold at index 0 loses
    assert gold_ranks(flat, at_zero, ties="argmax").item() == 1


def test_argsort_rule_sorts_each_list_at_its_own_length():
    """Padding (-inf after a list's end) is not sorted: ranks equal those of the unpadded rows."""
    short = [2.0] * 17
    padded = torch.tensor([short + [float("-inf")] * 23])
    expected = gold_ranks(torch.tensor([short]), torch.tensor([5]), ties="argsort")
    assert gold_ranks(padded, torch.tensor([5]), ties="argsort").tolist() == expected.tolist()


def test_ties_never_count_as_hits():
    constant = torch.zeros(4, 10)
    ranks = gold_ranks(constant, torch.zeros(4, dtype=torch.long))
    assert ranks.tolist() == [10] * 4 and metrics_from_ranks(ranks)["precision@1"] == 0
    scores = torch.tensor([[0.9, 0.1, 0.9], [0.9, 0.1, 0.2], [0.1, 0.9, 0.0]])
    ranks = gold_ranks(scores, torch.zeros(3, dtype=torch.long))
    assert ranks.tolist() == [2, 1, 2]
    padded = torch.tensor([[0.5, float("-inf"), float("-inf")]])
    assert gold_ranks(padded, torch.tensor([0])).tolist() == [1]


def test_registry_has_the_36_mmeb_sets():
    assert len(MMEB) == 36 and len({s.name for s in MMEB}) == 36
    counts = {task: sum(s.meta_task == task for s in MMEB) for task in META_TASKS}
    assert counts == {"Classification": 10, "VQA": 10, "Retrieval": 12, "Grounding": 4}
    assert sum(s.split == "IND" for s in MMEB) == 20


def test_overall_is_the_mean_over_data_sets_vlm2vec_llava():
    # VLM2Vec LLaVA-1.6 meta-task means 61.2 / 49.9 / 67.4 / 86.1 give Overall 62.9 (MMEB leaderboard).
    means = {"Classification": 61.2, "VQA": 49.9, "Retrieval": 67.4, "Grounding": 86.1}
    scores = {s.name: means[s.meta_task] for s in MMEB}
    out = aggregate(scores, MMEB)
    assert round(out["Overall"], 1) == 62.9
    assert out["Overall"] != pytest.approx(sum(means.values()) / 4)  # not the mean of the means
    assert out["Grounding"] == pytest.approx(86.1)


def test_partial_runs_and_custom_registry(tmp_path):
    out = aggregate({"ImageNet-1K": 50.0, "RefCOCO": 70.0}, MMEB)
    assert out["Classification"] == 50.0 and out["VQA"] is None and out["OOD"] == 70.0
    save_registry(MMEB[:3], tmp_path / "r.json")
    assert load_registry(tmp_path / "r.json") == MMEB[:3]
    (tmp_path / "bad.json").write_text('{"x": {"meta_task": "Sorting", "split": "IND"}}')
    with pytest.raises(ValueError, match="Sorting"):
        load_registry(tmp_path / "bad.json")
