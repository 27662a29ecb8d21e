"""MMEB-V2's ranking metrics (VLM2Vec `src/utils/eval_utils/metrics.py`, `RankingMetrics`), vectorised.

A query's relevant documents are its candidates with relevance > 0 (the reference keeps qrels with
score > 0; an image or video query has one gold of relevance 1). Per query, at each k:
    hit@k          1 if a relevant document is in the top k
    recall@k       relevant documents in the top k / relevant documents (1.0 for a query with none)
    mrr@k          1 / position of the first relevant document in the top k, else 0
    ndcg_linear@k  sum over the top k of rel / log2(position + 1), divided by the same sum over the
                   relevances of ALL labelled documents sorted high to low and cut at k (0 when none)
Each metric is the mean over queries, a fraction in [0, 1] as the reference writes `_score.json`.

One deliberate difference: the reference zips the grades with `list(set(labels))`, which reorders the
labels by Python's string hash, so a query whose labelled documents have different grades gets them
shuffled (the result varies with PYTHONHASHSEED). Here every document keeps its own grade, as qrels say.

Ties: `ranked_order` orders candidates under `ties` ("pessimistic" or "reference", `TIE_RULES`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mme5.eval.metrics import TIE_RULES

KS = (1, 5, 10)


def ranked_order(scores: Tensor, relevance: Tensor, ties: str = "pessimistic") -> Tensor:
    """Candidate columns of each query, best first. scores, relevance: (Q, C); returns (Q, C) long.

    "pessimistic": among equal scores the less relevant candidate comes first, so ties never help (a
    constant model scores 0, as `mme5.eval.metrics.gold_ranks` ranks a single gold). "reference": the
    order of VLM2Vec's `np.argsort(-scores)` (eval.py), numpy's default sort, which is not stable: small
    lists (insertion sort) keep list order among ties, long ones need not. Rows are sorted one at a time
    in float32, cut to their own list, as the reference ranks a local query's own candidates.
    A row's padding columns must hold -inf (they then come last; "reference" sorts the other columns
    alone, as the reference sorts a list that never held them, wherever the -inf columns sit).
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    rows = scores.detach().float().cpu().numpy()
    grades = relevance.detach().float().cpu().numpy()
    orders = []
    for row, grade in zip(rows, grades, strict=True):
        if ties == "pessimistic":
            orders.append(np.lexsort((grade, -row)))  # last key first: score down, then relevance up
            continue
        listed, unlisted = np.flatnonzero(~np.isneginf(row)), np.flatnonzero(np.isneginf(row))
        orders.append(np.concatenate([listed[np.argsort(-row[listed])], unlisted]))
    return torch.as_tensor(np.stack(orders) if orders else np.empty((0, 0), int), dtype=torch.long)


def ranking_metrics(order: Tensor, relevance: Tensor, ks: tuple[int, ...] = KS,
                    listed: Tensor | None = None) -> dict[str, float]:
    """hit, recall, mrr and ndcg_linear at each k (see the module docstring): means over the queries of
    `query_metrics`."""
    return {key: _mean(values) for key, values in query_metrics(order, relevance, ks, listed).items()}


def query_metrics(order: Tensor, relevance: Tensor, ks: tuple[int, ...] = KS,
                  listed: Tensor | None = None) -> dict[str, Tensor]:
    """Each query's hit, recall, mrr and ndcg_linear at each k, (Q,) float each, of the rankings `order`
    (per query, so that rankings scored in chunks are averaged once, over all their queries).

    order: (Q, C) candidate columns best first (`ranked_order`); relevance: (Q, C) graded relevance of
    each column, 0 for irrelevant. Every labelled document must be a column (IDCG and recall count them
    all): a labelled document missing from the corpus belongs in a column scored -inf and left out of
    `listed` ((Q, C) bool, the columns the model could predict; None: all), so that it is never found,
    even when the whole list is shorter than k (the reference's prediction never holds it).
    """
    relevance = relevance.float()
    found = relevance if listed is None else relevance * listed  # unlisted columns gain nothing
    ranked = found.gather(1, order)  # (Q, C) relevance in ranked order
    ideal = relevance.sort(dim=1, descending=True).values  # (Q, C)
    relevant = ranked > 0
    num_relevant = (relevance > 0).sum(dim=1)  # (Q,)
    discount = 1.0 / torch.log2(torch.arange(2, relevance.shape[1] + 2, dtype=torch.float))  # (C,)
    position = torch.arange(1, relevance.shape[1] + 1, dtype=torch.float)  # (C,)
    out: dict[str, Tensor] = {}
    for k in ks:
        hits = relevant[:, :k].sum(dim=1)
        out[f"hit@{k}"] = (hits > 0).float()
        out[f"recall@{k}"] = torch.where(num_relevant > 0, hits / num_relevant.clamp(min=1), 1.0)
        first = torch.where(relevant[:, :k], position[:k], torch.inf).min(dim=1).values  # inf: none
        out[f"mrr@{k}"] = 1.0 / first
        dcg = (ranked[:, :k] * discount[:k]).sum(dim=1)
        idcg = (ideal[:, :k] * discount[:k]).sum(dim=1)
        out[f"ndcg_linear@{k}"] = torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), 0.0)
    return out


def _mean(values: Tensor) -> float:
    return values.float().mean().item() if values.numel() else 0.0
