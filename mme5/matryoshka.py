"""Matryoshka representation learning: one embedding whose leading dimensions are embeddings too.

Training adds the contrastive loss over each prefix of the embedding (Kusupati et al., 2022), each prefix
L2-normalised, weighted as sentence-transformers' `MatryoshkaLoss` (a weighted sum, weights 1 by default).
At use, `truncate` keeps the first `dim` dimensions and normalises again: the cosine of truncated vectors
is then what the loss trained at that size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

from mme5.losses import ContrastiveOutput


def truncate(embeddings: Tensor, dim: int | None, normalize: bool = True) -> Tensor:
    """The first `dim` dimensions of (..., D) embeddings, L2-normalised again unless `normalize` is False.
    None keeps them whole (and as they are)."""
    if dim is None:
        return embeddings
    if not 0 < dim <= embeddings.shape[-1]:
        raise ValueError(f"cannot truncate {embeddings.shape[-1]}-dimensional embeddings to {dim} dimensions")
    prefix = embeddings[..., :dim]
    return F.normalize(prefix, dim=-1) if normalize else prefix


def check_dims(dims: Sequence[int], weights: Sequence[float] | None = None, where: str = "matryoshka_dims"
               ) -> None:
    """Refuse dimensions that are not distinct positive integers, and weights not one positive per dim."""
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"{where}: expected a list of positive integers, got {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{where}: {list(dims)} names a dimension twice")
    if weights is not None and (len(weights) != len(dims) or any(not w > 0 for w in weights)):
        raise ValueError(f"{where}: {list(dims)} needs one positive weight per dimension, got weights "
                         f"{list(weights)}")


@dataclass
class MatryoshkaOutput(ContrastiveOutput):
    """The summed loss in `loss`; the other fields are those of the largest dimension; `dim_losses` holds
    each dimension's own (unweighted, detached) loss, for logging."""

    dim_losses: dict[int, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Matryoshka:
    """The weighted sum of a contrastive loss over prefixes of the embeddings.

    `loss(query, positive, negatives)` is the loss at full size ((B, D), (B, D), (B, K, D) or None); it is
    called once per dimension with the prefixes, normalised. Under the gradient cache the sum is what
    `GradCache` differentiates (one cached gradient per embedding, summing every prefix's share); under
    DDP every prefix's loss gathers its own prefix of the positives.
    """

    dims: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_dims(self.dims, self.weights)

    @classmethod
    def of(cls, dims: Sequence[int] | None, weights: Sequence[float] | None = None) -> Matryoshka | None:
        """The loss of the settings `model.matryoshka_dims` / `model.matryoshka_weights`; None when off."""
        if dims is None:
            if weights is not None:
                raise ValueError("model.matryoshka_weights needs model.matryoshka_dims")
            return None
        return cls(tuple(dims), None if weights is None else tuple(weights))

    def __call__(self, loss: Callable[[Tensor, Tensor, Tensor | None], ContrastiveOutput], query: Tensor,
                 positive: Tensor, negatives: Tensor | None) -> MatryoshkaOutput:
        if max(self.dims) > query.shape[-1]:
            raise ValueError(f"model.matryoshka_dims {list(self.dims)}: the embeddings have only "
                             f"{query.shape[-1]} dimensions")
        weights = self.weights or (1.0,) * len(self.dims)
        outputs = {dim: loss(truncate(query, dim), truncate(positive, dim),
                             None if negatives is None else truncate(negatives, dim)) for dim in self.dims}
        total = sum(w * outputs[dim].loss for dim, w in zip(self.dims, weights, strict=True))
        largest = outputs[max(self.dims)]
        fields = {name: getattr(largest, name) for name in largest.__dataclass_fields__}
        dim_losses = {dim: output.loss.detach() for dim, output in outputs.items()}
        return MatryoshkaOutput(**(fields | {"loss": total}), dim_losses=dim_losses)
