"""Nearest neighbours by cosine similarity: the one retrieval component of the synthesis image index
(`mme5.synthesis.images.NeighbourIndex`) and hard-negative mining (`mme5.data.mine`).

Rows are L2-normalised embeddings, so a dot product is the cosine. Queries are scored against all
candidates a chunk of queries at a time (memory: chunk × candidates floats); ties are broken by the lower
candidate index, so a ranking never depends on the hardware's top-k order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def nearest(queries: Tensor, candidates: Tensor, k: int, excluded: Sequence[Sequence[int]] | None = None,
            chunk: int = 256) -> tuple[Tensor, Tensor]:
    """The `k` most similar candidates of each query, best first: (scores (Q, k), indices (Q, k)).

    excluded: per query, candidate indices that are never returned (its own positive, itself); when fewer than
    k candidates remain, the tail of a row holds score -inf and index -1.
    """
    k = min(k, candidates.shape[0])
    scores_out = torch.full((queries.shape[0], k), float("-inf"))
    indices_out = torch.full((queries.shape[0], k), -1, dtype=torch.long)
    candidates = candidates.float()
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk].float() @ candidates.T  # (c, N)
        for row, banned in enumerate((excluded or [])[start : start + chunk]):
            if len(banned):
                scores[row, torch.as_tensor(list(banned), dtype=torch.long)] = float("-inf")
        values, indices = scores.topk(k, dim=1)  # (c, k), best first; order within ties unspecified
        # Ties by the lower index: order by index, then (stably) by score.
        by_index = indices.sort(dim=1).indices
        values, indices = values.gather(1, by_index), indices.gather(1, by_index)
        by_score = values.sort(dim=1, descending=True, stable=True).indices
        values, indices = values.gather(1, by_score), indices.gather(1, by_score)
        indices = indices.masked_fill(values == float("-inf"), -1)
        scores_out[start : start + chunk], indices_out[start : start + chunk] = values, indices
    return scores_out, indices_out
