"""Ranking metrics shared by MMEB and XTD, with the tie rules they can be scored under.

Default (pessimistic rank): the gold candidate's rank is 1 + the number of OTHER candidates whose score
is greater than OR EQUAL to the gold's. An exact tie therefore never counts as a hit for the gold: a model
that gives every candidate the same score (an untrained Mllama ignores its pixels) scores 0, not the
luck of a sort order. `ties="reference"` scores each benchmark as the reference code does, and its code
breaks ties differently per benchmark (see RANK_RULES). Precision@1 (MMEB's "hit@1") is Recall@1 with one
gold per query.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

TIE_RULES = ("pessimistic", "reference")
"""What `--ties` offers: "pessimistic" (this project's default), or "reference": the rule the reference
code applies to that benchmark (a benchmark's `reference_ties`, one of RANK_RULES)."""

RANK_RULES = ("pessimistic", "argmax", "argsort", "descending")
"""How `gold_ranks` counts a candidate scoring exactly as the gold: "pessimistic" ranks it above the gold,
so a constant model scores 0; "argmax" (the reference's MMEB, `np.argmax`) lets the first maximum in list
order win, so with MMEB's gold at index 0 every tie is a hit; "argsort" (the reference's XTD,
`np.argsort(scores)[-k:]`) keeps the order numpy's default sort leaves among ties, which is not stable
(it depends on the list's length, and on numpy's version and CPU), so the gold at index 0 can lose;
"descending" (VLM2Vec-V2's MMEB-V2, `np.argsort(-scores)`) is the gold's place in that order, as unstable."""


def gold_ranks(scores: Tensor, gold: Tensor, ties: str = "pessimistic") -> Tensor:
    """1-based rank of each query's gold candidate under the tie rule `ties` (see RANK_RULES).

    scores: (Q, C) similarities; gold: (Q,) column of the gold candidate. Returns (Q,) long.
    A row's padding columns must hold -inf (they then never outrank a finite gold score).
    """
    if ties not in RANK_RULES:
        raise ValueError(f"ties must be one of {RANK_RULES}, got {ties!r}")
    if ties in ("argsort", "descending"):
        return argsort_ranks(scores, gold, descending=ties == "descending")
    gold_scores = scores.gather(1, gold[:, None])  # (Q, 1)
    if ties == "pessimistic":
        return (scores >= gold_scores).sum(dim=1).long()  # includes the gold itself
    columns = torch.arange(scores.shape[1], device=scores.device)
    earlier_tie = (scores == gold_scores) & (columns[None, :] < gold[:, None])
    return ((scores > gold_scores) | earlier_tie).sum(dim=1).long() + 1


def argsort_ranks(scores: Tensor, gold: Tensor, descending: bool = False) -> Tensor:
    """The gold's place counted from the end of `np.argsort` of its row, so that rank <= k exactly when the
    gold is in the reference's `np.argsort(scores)[-k:]` (`descending`: its place from the start of
    `np.argsort(-scores)`). Each row is sorted alone, in float32 and cut to its own list (padding dropped)
    as the reference scores one query at a time: numpy's order among ties depends on the array sorted."""
    ranks = []
    for row, column in zip(scores.detach().float().cpu().numpy(), gold.tolist(), strict=True):
        row = row[~np.isneginf(row)]  # padding sits after the list's end
        if descending:
            ranks.append(1 + int(np.flatnonzero(np.argsort(-row) == column)[0]))
            continue
        order = np.argsort(row)
        ranks.append(len(row) - int(np.flatnonzero(order == column)[0]))
    return torch.tensor(ranks, dtype=torch.long, device=scores.device)


def metrics_from_ranks(ranks: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """P@1, Recall@k and MRR (percentages) from 1-based gold ranks (Q,)."""
    ranks = ranks.float()
    out = {"precision@1": 100.0 * (ranks <= 1).float().mean().item()}
    out |= {f"recall@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    out["mrr"] = 100.0 * (1.0 / ranks).mean().item()
    out["queries"] = int(ranks.numel())
    return out
