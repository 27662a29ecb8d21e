"""Ranking metrics shared by MMEB and XTD, with two tie rules.

Default (pessimistic rank): the gold candidate's rank is 1 + the number of OTHER candidates whose score
is greater than OR EQUAL to the gold's. An exact tie therefore never counts as a hit for the gold: a model
that gives every candidate the same score (an untrained Mllama ignores its pixels) scores 0, not the
luck of a sort order. The reference code's rule (`ties="reference"`, its argmax) lets the first maximum in
list order win instead; with MMEB's gold at index 0 every tie is then a hit. Precision@1 (MMEB's "hit@1")
is Recall@1 with one gold per query.
"""

from __future__ import annotations

import torch
from torch import Tensor

TIE_RULES = ("pessimistic", "reference")
"""How a candidate scoring exactly as the gold counts: "pessimistic" (this project's default) ranks it
above the gold, so a constant model scores 0; "reference" is the reference code's `argmax`: the first
maximum in list order wins, so with MMEB's gold at index 0 every tie is a hit."""


def gold_ranks(scores: Tensor, gold: Tensor, ties: str = "pessimistic") -> Tensor:
    """1-based rank of each query's gold candidate under the tie rule `ties` (see TIE_RULES).

    scores: (Q, C) similarities; gold: (Q,) column of the gold candidate. Returns (Q,) long.
    A row's padding columns must hold -inf (they then never outrank a finite gold score).
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    gold_scores = scores.gather(1, gold[:, None])  # (Q, 1)
    if ties == "pessimistic":
        return (scores >= gold_scores).sum(dim=1).long()  # includes the gold itself
    columns = torch.arange(scores.shape[1], device=scores.device)
    earlier_tie = (scores == gold_scores) & (columns[None, :] < gold[:, None])
    return ((scores > gold_scores) | earlier_tie).sum(dim=1).long() + 1


def metrics_from_ranks(ranks: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """P@1, Recall@k and MRR (percentages) from 1-based gold ranks (Q,)."""
    ranks = ranks.float()
    out = {"precision@1": 100.0 * (ranks <= 1).float().mean().item()}
    out |= {f"recall@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    out["mrr"] = 100.0 * (1.0 / ranks).mean().item()
    out["queries"] = int(ranks.numel())
    return out
