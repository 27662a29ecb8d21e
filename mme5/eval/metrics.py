"""Ranking metrics shared by MMEB and XTD, with one tie rule.

Tie rule (pessimistic rank): the gold candidate's rank is 1 + the number of OTHER candidates whose score
is greater than OR EQUAL to the gold's. An exact tie therefore never counts as a hit for the gold: a model
that gives every candidate the same score (an untrained Mllama ignores its pixels) scores 0, not the
luck of a sort order. Precision@1 (MMEB's "hit@1") is Recall@1 with one gold per query.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def pessimistic_ranks(scores: Tensor, gold: Tensor) -> Tensor:
    """1-based rank of each query's gold candidate, ties counted against it.

    scores: (Q, C) similarities; gold: (Q,) column of the gold candidate. Returns (Q,) long.
    A row's padding columns must hold -inf (they then never outrank a finite gold score).
    """
    gold_scores = scores.gather(1, gold[:, None])  # (Q, 1)
    at_least_as_good = (scores >= gold_scores).sum(dim=1)  # (Q,) includes the gold itself
    return at_least_as_good.long()


class RankingMetrics(Metric):
    """Accumulates gold ranks over batches (and ranks of a process group) → P@1, Recall@k, MRR in %.

    `update(scores, gold)` takes (Q, C) scores and (Q,) gold columns; `compute()` returns a dict.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), **kwargs):
        super().__init__(**kwargs)
        self.ks = ks
        self.add_state("ranks", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, gold: Tensor) -> None:
        self.ranks.append(pessimistic_ranks(scores.float(), gold.long()))

    def compute(self) -> dict[str, float]:
        ranks = self.ranks if isinstance(self.ranks, Tensor) else torch.cat(self.ranks)
        return metrics_from_ranks(ranks, self.ks)


def metrics_from_ranks(ranks: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """P@1, Recall@k and MRR (percentages) from 1-based gold ranks (Q,)."""
    ranks = ranks.float()
    out = {"precision@1": 100.0 * (ranks <= 1).float().mean().item()}
    out |= {f"recall@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    out["mrr"] = 100.0 * (1.0 / ranks).mean().item()
    out["queries"] = int(ranks.numel())
    return out
