"""InfoNCE over the positives of every rank plus each query's own hard negatives (mmE5 recipe)."""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from mme5.distributed import rank_and_world


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather `x` (B, ...) from every rank into (world * B, ...), rank-major, keeping gradients.

    Backward sums, over ranks, the gradients that reach each rank's slice (a reduce-scatter), so every
    rank's encoder receives the gradient of all ranks' losses w.r.t. its own rows. Identity when
    torch.distributed is not initialised or the world has one rank.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
    if any(int(s) != x.shape[0] for s in sizes):
        raise ValueError(
            f"gather_with_grad needs equal local batch sizes on every rank; got {[int(s) for s in sizes]} "
            f"(rank {rank} has {x.shape[0]}). Drop the last partial batch or pad per rank."
        )
    # The public sync-grad gather warns that it is deprecated in favour of a private module; keep the
    # public one and silence the warning here instead of in every caller.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(x), dim=0)


def gather_keys(keys: Tensor) -> Tensor:
    """All ranks' (B,) integer keys, rank-major (no gradient; equal sizes, as `gather_with_grad` checks)."""
    world = rank_and_world()[1]
    if world == 1:
        return keys
    parts = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(parts, keys)
    return torch.cat(parts)


def scatter_negatives(flat: Tensor | None, mask: Tensor) -> Tensor | None:
    """Place the real negatives' embeddings (N, D) into their (B, K, D) slots; empty slots hold zeros.

    `mask` (B, K) bool marks the real slots, row-major: the order in which the negatives were embedded.
    """
    if flat is None or mask.shape[1] == 0:
        return None
    negatives = flat.new_zeros(*mask.shape, flat.shape[-1])  # (B, K, D)
    negatives[mask.to(flat.device)] = flat
    return negatives


@dataclass
class ContrastiveOutput:
    """What one InfoNCE call produced; everything but `loss` is detached, for logging."""

    loss: Tensor  # () mean over local queries
    logits: Tensor  # (B, B_global + K) scaled similarities; masked negatives are -inf
    labels: Tensor  # (B,) column of each query's positive
    accuracy: Tensor  # () fraction of local queries whose positive strictly beats every other candidate
    temperature: Tensor  # () effective temperature used
    query: Tensor  # (B, D) the local queries' embeddings, float32
    positive: Tensor  # (B, D) the local positives' embeddings, float32
    false_negatives: Tensor | None = None  # () in-batch candidates masked per query (mean), when masking


class InfoNCE(nn.Module):
    """Contrastive loss of mmE5: candidates = all ranks' positives + the query's own hard negatives.

    Embeddings must already be L2-normalised (cosine = dot product). Similarities are computed in float32
    with autocast off: at temperature 0.02 the logits reach 50, where bf16 keeps fewer than 3 digits.

    Gradient under DDP: each rank's loss is the mean over its B local queries and the positives are gathered
    with a sync-grad all-gather, so rank r's backward yields d(sum_s L_s)/d(theta) through rank r's own
    embeddings; DDP's average over the W ranks then equals exactly the gradient of the mean loss over all
    W * B queries of the global batch (as one process computing the loss on the concatenated batch would).

    `mask_false_negatives`: an in-batch candidate (another sample's positive, from any rank) with the same
    content as the query's own positive (`positive_keys`, e.g. the label text "dog" of many classification
    samples) is not a negative: it is masked out of that query's softmax. The query's own positive never is.
    Off reproduces the reference, which counts such duplicates as negatives.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        gather: bool = True,
        min_temperature: float = 0.01,
        mask_false_negatives: bool = False,
    ) -> None:
        """`min_temperature` bounds a learnable temperature from below (CLIP's bound is 0.01)."""
        super().__init__()
        self.mask_false_negatives = mask_false_negatives
        if not 0 < min_temperature <= temperature:
            raise ValueError(f"need 0 < min_temperature <= temperature, got {min_temperature}, {temperature}")
        self.gather = gather
        self.temperature = temperature
        self.max_logit_scale = math.log(1 / min_temperature)
        # log(1 / tau): the parametrisation in which a learnable temperature trains smoothly. A fixed one is
        # a Python float, so that casting the module to bf16 cannot round it.
        self.logit_scale: nn.Parameter | None = None
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        negative_mask: Tensor | None = None,
        positive_keys: Tensor | None = None,
    ) -> ContrastiveOutput:
        """query, positive: (B, D); negatives: (B, K, D) or None; negative_mask: (B, K) bool, True = real;
        positive_keys: (B,) integer content keys of the positives (needed with `mask_false_negatives`).

        Missing negatives are masked out (logit -inf, zero gradient), never filled with copies.
        """
        if self.mask_false_negatives and positive_keys is None:
            raise ValueError("mask_false_negatives needs positive_keys (the positives' content keys)")
        if query.shape != positive.shape:
            raise ValueError(f"query {tuple(query.shape)} and positive {tuple(positive.shape)} differ")
        with torch.autocast(device_type=query.device.type, enabled=False):
            query, positive = query.float(), positive.float()
            scale = self._scale(query.device)  # ()
            candidates = gather_with_grad(positive) if self.gather else positive  # (B_global, D)
            logits = scale * (query @ candidates.T)  # (B, B_global)
            rank = rank_and_world()[0] if self.gather else 0
            labels = rank * query.shape[0] + torch.arange(query.shape[0], device=query.device)  # (B,)
            false_negatives = None
            if self.mask_false_negatives:
                duplicates = self._duplicates(positive_keys.to(query.device), labels)  # (B, B_global)
                logits = logits.masked_fill(duplicates, float("-inf"))  # after scaling, as below
                false_negatives = duplicates.sum(1).float().mean()
            if negatives is not None and negatives.shape[1] > 0:
                logits = torch.cat([logits, self._negative_logits(query, negatives, negative_mask, scale)], 1)
            loss = F.cross_entropy(logits, labels)
        return ContrastiveOutput(
            loss=loss,
            logits=logits.detach(),
            labels=labels,
            accuracy=_ranking_accuracy(logits.detach(), labels),
            temperature=(1 / scale).detach(),
            query=query.detach(),
            positive=positive.detach(),
            false_negatives=false_negatives,
        )

    def _duplicates(self, keys: Tensor, labels: Tensor) -> Tensor:
        """(B, B_global) True where an in-batch candidate's content equals the query's own positive's, the
        positive itself excepted."""
        candidates = gather_keys(keys) if self.gather else keys
        same = keys[:, None] == candidates[None, :]
        same[torch.arange(keys.shape[0], device=keys.device), labels] = False
        return same

    def _scale(self, device: torch.device) -> Tensor:
        """1 / tau as a float32 scalar; a learnable one is clamped to 1 / min_temperature."""
        if self.logit_scale is None:
            return torch.tensor(1 / self.temperature, device=device)
        # Beyond the bound the gradient is zero: the optimiser cannot push tau below min_temperature.
        return self.logit_scale.float().clamp(max=self.max_logit_scale).exp()

    @staticmethod
    def _negative_logits(query: Tensor, negatives: Tensor, mask: Tensor | None, scale: Tensor) -> Tensor:
        """Scaled similarity of each query to its own K negatives, (B, K), -inf where mask is False."""
        if negatives.shape[0] != query.shape[0] or negatives.shape[2] != query.shape[1]:
            raise ValueError(f"negatives {tuple(negatives.shape)} do not match query {tuple(query.shape)}")
        negatives = negatives.float()
        if mask is not None:
            if mask.shape != negatives.shape[:2]:
                raise ValueError(f"negative_mask {tuple(mask.shape)} != {tuple(negatives.shape[:2])}")
            # Zero the empty slots first so that whatever they hold (even NaN) cannot leak into gradients.
            negatives = negatives.masked_fill(~mask[..., None], 0.0)
        logits = scale * torch.einsum("bd,bkd->bk", query, negatives)  # (B, K)
        # Mask after scaling: -inf * scale has a NaN gradient w.r.t. a learnable scale.
        return logits if mask is None else logits.masked_fill(~mask, float("-inf"))


def _ranking_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose label column is strictly above every other column of `logits` (B, C)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    target = logits[rows, labels]  # (B,)
    others = logits.clone()
    others[rows, labels] = float("-inf")
    return (target > others.max(dim=1).values).float().mean()
