"""InfoNCE over the positives of every rank plus each query's own hard negatives (mmE5 recipe)."""

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

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


HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


@dataclass
class ContrastiveOutput:
    """What one InfoNCE call produced; everything but `loss` is detached, for logging."""

    loss: Tensor  # () mean over local queries
    logits: Tensor  # (B, B_global + K) what the softmax saw: scaled similarities (+ hardness); masked: -inf
    scores: Tensor  # (B, B_global + K) cosine similarities; masked candidates -inf
    labels: Tensor  # (B,) column of each query's positive
    accuracy: Tensor  # () fraction of local queries whose positive's cosine strictly beats every other one
    temperature: Tensor  # () temperature used, averaged over the local queries
    query: Tensor  # (B, D) the local queries' embeddings, float32
    positive: Tensor  # (B, D) the local positives' embeddings, float32
    false_negatives: Tensor | None = None  # () candidates masked per query (mean), when a rule masks
    false_negatives_by_rule: dict[str, Tensor] = field(default_factory=dict)  # rule -> () as above


class InfoNCE(nn.Module):
    """Contrastive loss of mmE5: candidates = all ranks' positives + the query's own hard negatives.

    Embeddings must already be L2-normalised (cosine = dot product). Similarities are computed in float32
    with autocast off: at temperature 0.02 the logits reach 50, where bf16 keeps fewer than 3 digits.

    Gradient under DDP: each rank's loss is the mean over its B local queries and the positives are gathered
    with a sync-grad all-gather, so rank r's backward yields d(sum_s L_s)/d(theta) through rank r's own
    embeddings; DDP's average over the W ranks then equals exactly the gradient of the mean loss over all
    W * B queries of the global batch (as one process computing the loss on the concatenated batch would).

    False negatives (each rule off by default; the query's own positive is never dropped; the masks are
    computed without gradient):
    - `mask_false_negatives`: an in-batch candidate (another sample's positive, from any rank) with the same
      content as the query's own positive (`positive_keys`, e.g. the label text "dog" of many classification
      samples). Off reproduces the reference, which counts such duplicates as negatives.
    - `false_negative_threshold` δ: a candidate whose cosine to the query's own positive exceeds δ
      (RzenEmbed, δ = 0.95).
    - `false_negative_margin` m: a candidate the query scores above its own positive plus m, in cosine
      (Qwen3-VL-Embedding, m = 0.1).

    `hardness_mode` / `hardness_strength` α: add α · stop_grad(cos) to the logit of each selected negative,
    after the temperature (sentence-transformers 6.2 `MultipleNegativesRankingLoss`; Lan et al. 2025 Eq. 5):
    a harder negative weighs more in the softmax. "in_batch_negatives": other samples' positives;
    "hard_negatives": the query's own hard negatives; "all_negatives": both.

    `temperature_groups`: one learnable temperature per named group (RzenEmbed), bounded like the learnable
    temperature; `forward`'s `groups` says each query's group, and a query's row uses its group's.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        gather: bool = True,
        min_temperature: float = 0.01,
        mask_false_negatives: bool = False,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        false_negative_threshold: float | None = None,
        false_negative_margin: float | None = None,
        temperature_groups: Sequence[str] | None = None,
    ) -> None:
        """`min_temperature` bounds a learnable temperature from below (CLIP's bound is 0.01)."""
        super().__init__()
        if not 0 < min_temperature <= temperature:
            raise ValueError(f"need 0 < min_temperature <= temperature, got {min_temperature}, {temperature}")
        _check_techniques(hardness_mode, hardness_strength, false_negative_threshold, false_negative_margin,
                          temperature_groups, learnable_temperature)
        self.mask_false_negatives = mask_false_negatives
        self.hardness_mode, self.hardness_strength = hardness_mode, hardness_strength
        self.false_negative_threshold = false_negative_threshold
        self.false_negative_margin = false_negative_margin
        self.gather = gather
        self.temperature = temperature
        self.max_logit_scale = math.log(1 / min_temperature)
        # log(1 / tau): the parametrisation in which a learnable temperature trains smoothly. A fixed one is
        # a Python float, so that casting the module to bf16 cannot round it.
        self.logit_scale: nn.Parameter | None = None
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        self.group_names = tuple(temperature_groups or ())
        self.group_logit_scales: nn.Parameter | None = None  # (G,) log(1 / tau_g)
        if temperature_groups is not None:
            start = math.log(1 / temperature)
            self.group_logit_scales = nn.Parameter(torch.full((len(self.group_names),), start))

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        negative_mask: Tensor | None = None,
        positive_keys: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> ContrastiveOutput:
        """query, positive: (B, D); negatives: (B, K, D) or None; negative_mask: (B, K) bool, True = real;
        positive_keys: (B,) integer content keys of the positives (needed with `mask_false_negatives`);
        groups: (B,) each query's index into `group_names` (needed with `temperature_groups`).

        Missing negatives are masked out (logit -inf, zero gradient), never filled with copies.
        """
        if self.mask_false_negatives and positive_keys is None:
            raise ValueError("mask_false_negatives needs positive_keys (the positives' content keys)")
        if query.shape != positive.shape:
            raise ValueError(f"query {tuple(query.shape)} and positive {tuple(positive.shape)} differ")
        with torch.autocast(device_type=query.device.type, enabled=False):
            query, positive = query.float(), positive.float()
            candidates = gather_with_grad(positive) if self.gather else positive  # (B_global, D)
            rank = rank_and_world()[0] if self.gather else 0
            labels = rank * query.shape[0] + torch.arange(query.shape[0], device=query.device)  # (B,)
            cosines = query @ candidates.T  # (B, B_global)
            real = torch.ones_like(cosines, dtype=torch.bool)
            if negatives is not None and negatives.shape[1] > 0:
                negatives, negative_mask = self._checked_negatives(query, negatives, negative_mask)
                cosines = torch.cat([cosines, torch.einsum("bd,bkd->bk", query, negatives)], 1)  # (B, C)
                real = torch.cat([real, negative_mask], 1)
            else:
                negatives = None
            dropped = self._false_negatives(cosines.detach(), real, labels, positive, candidates, negatives,
                                            positive_keys)
            keep = real
            for mask in dropped.values():
                keep = keep & ~mask
            scale = self._scale(groups, query)  # () or (B, 1)
            logits = scale * cosines + self._hardness(cosines.detach(), labels, candidates.shape[0])
            # Mask after scaling: -inf * scale has a NaN gradient w.r.t. a learnable scale.
            logits = logits.masked_fill(~keep, float("-inf"))
            loss = F.cross_entropy(logits, labels)
        scores = cosines.detach().masked_fill(~keep, float("-inf"))
        per_query = {rule: mask.sum(1).float().mean() for rule, mask in dropped.items()}
        return ContrastiveOutput(
            loss=loss,
            logits=logits.detach(),
            scores=scores,
            labels=labels,
            accuracy=_ranking_accuracy(scores, labels),
            temperature=(1 / scale).detach().mean(),
            query=query.detach(),
            positive=positive.detach(),
            false_negatives=(real & ~keep).sum(1).float().mean() if dropped else None,
            false_negatives_by_rule=per_query,
        )

    @torch.no_grad()
    def _false_negatives(self, cosines: Tensor, real: Tensor, labels: Tensor, positive: Tensor,
                         candidates: Tensor, negatives: Tensor | None, keys: Tensor | None
                         ) -> dict[str, Tensor]:
        """{rule: (B, C) bool} the real candidates each active rule drops, the own positive never."""
        rules: dict[str, Tensor] = {}
        if self.mask_false_negatives:
            same = self._duplicates(keys.to(cosines.device), labels)  # (B, B_global)
            rules["content"] = F.pad(same, (0, cosines.shape[1] - same.shape[1]))
        if self.false_negative_threshold is not None:
            to_positive = positive @ candidates.T  # (B, B_global) cos(candidate, own positive)
            if negatives is not None:
                to_positive = torch.cat([to_positive, torch.einsum("bd,bkd->bk", positive, negatives)], 1)
            rules["threshold"] = to_positive > self.false_negative_threshold
        if self.false_negative_margin is not None:
            own = cosines.gather(1, labels[:, None])  # (B, 1)
            rules["margin"] = cosines > own + self.false_negative_margin
        rows = torch.arange(labels.shape[0], device=labels.device)
        for mask in rules.values():
            mask[rows, labels] = False
            mask &= real
        return rules

    def _hardness(self, cosines: Tensor, labels: Tensor, in_batch: int) -> Tensor | float:
        """α · cos on the selected negatives' columns of (B, C) `cosines` (no gradient), 0 elsewhere."""
        if self.hardness_mode is None:
            return 0.0
        selected = torch.zeros_like(cosines, dtype=torch.bool)
        if self.hardness_mode in ("in_batch_negatives", "all_negatives"):
            selected[:, :in_batch] = True
            selected[torch.arange(labels.shape[0], device=labels.device), labels] = False
        if self.hardness_mode in ("hard_negatives", "all_negatives"):
            selected[:, in_batch:] = True
        return self.hardness_strength * cosines * selected

    def _duplicates(self, keys: Tensor, labels: Tensor) -> Tensor:
        """(B, B_global) True where an in-batch candidate's content equals the query's own positive's, the
        positive itself excepted."""
        candidates = gather_keys(keys) if self.gather else keys
        same = keys[:, None] == candidates[None, :]
        same[torch.arange(keys.shape[0], device=keys.device), labels] = False
        return same

    def _scale(self, groups: Tensor | None, query: Tensor) -> Tensor:
        """1 / tau as float32: a scalar, or (B, 1) per query's group; a learnable one is clamped to
        1 / min_temperature (beyond the bound the gradient is zero: tau cannot go below min_temperature)."""
        if self.group_logit_scales is not None:
            if groups is None or groups.shape != query.shape[:1]:
                found = None if groups is None else tuple(groups.shape)
                raise ValueError(f"temperature_groups {self.group_names} need each query's group index, "
                                 f"({query.shape[0]},); got {found}")
            scales = self.group_logit_scales.float().clamp(max=self.max_logit_scale).exp()  # (G,)
            return scales[groups.to(query.device)][:, None]
        if self.logit_scale is None:
            return torch.tensor(1 / self.temperature, device=query.device)
        return self.logit_scale.float().clamp(max=self.max_logit_scale).exp()

    def group_temperatures(self) -> dict[str, Tensor]:
        """{group: its current temperature} (detached; empty without `temperature_groups`)."""
        if self.group_logit_scales is None:
            return {}
        taus = 1 / self.group_logit_scales.detach().float().clamp(max=self.max_logit_scale).exp()
        return dict(zip(self.group_names, taus, strict=True))

    @staticmethod
    def _checked_negatives(query: Tensor, negatives: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, K, D) float32 negatives with the empty slots zeroed, and the (B, K) mask (all True if None)."""
        if negatives.shape[0] != query.shape[0] or negatives.shape[2] != query.shape[1]:
            raise ValueError(f"negatives {tuple(negatives.shape)} do not match query {tuple(query.shape)}")
        negatives = negatives.float()
        if mask is None:
            return negatives, torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device)
        if mask.shape != negatives.shape[:2]:
            raise ValueError(f"negative_mask {tuple(mask.shape)} != {tuple(negatives.shape[:2])}")
        mask = mask.to(negatives.device)
        # Zero the empty slots first so that whatever they hold (even NaN) cannot leak into gradients.
        return negatives.masked_fill(~mask[..., None], 0.0), mask


def _check_techniques(hardness_mode: str | None, hardness_strength: float, threshold: float | None,
                      margin: float | None, temperature_groups: Sequence[str] | None,
                      learnable_temperature: bool) -> None:
    """Refuse settings of the training techniques that would silently do nothing or something else."""
    if hardness_mode not in (None, *HARDNESS_MODES):
        raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES} or null, got {hardness_mode!r}")
    if hardness_strength < 0 or (hardness_mode is None) != (hardness_strength == 0):
        raise ValueError("hardness_mode and hardness_strength go together: a mode needs a strength > 0, a "
                         f"strength a mode; got {hardness_mode!r}, {hardness_strength}")
    if threshold is not None and not -1 < threshold < 1:
        raise ValueError(f"false_negative_threshold is a cosine in (-1, 1), got {threshold}")
    if margin is not None and margin < 0:
        raise ValueError(f"false_negative_margin must be at least 0 (a cosine difference), got {margin}")
    if temperature_groups is not None and (learnable_temperature or not temperature_groups):
        raise ValueError("temperature_groups: one learnable temperature per group, at least one group; it "
                         "replaces learnable_temperature (set that to false)")


def _ranking_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose label column is strictly above every other column of `logits` (B, C)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    target = logits[rows, labels]  # (B,)
    others = logits.clone()
    others[rows, labels] = float("-inf")
    return (target > others.max(dim=1).values).float().mean()
