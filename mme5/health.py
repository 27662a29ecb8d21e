"""Training health: whether the contrastive model learns, from the batch each step has just scored.

`batch_health` turns one InfoNCE output into a few numbers (logged as `health/*`); `HealthMonitor` warns when
they say the run learns nothing: the loss stays at its chance value (the model scores a query's positive
like every other candidate), or the embeddings of different items collapse to one point. Both happen
silently otherwise: the loss of a collapsed run sits at ln(candidates), which looks like any plateau.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from mme5.distributed import sum_over_ranks
from mme5.losses import ContrastiveOutput

LOSS_OVER_CHANCE = "health/loss_over_chance"
CHANCE_LOSS = "health/chance_loss"
QUERY_COS = "health/query_mean_cos"
TARGET_COS = "health/target_mean_cos"
MARGIN = "health/margin"


def mean_pairwise_cosine(total: Tensor, count: Tensor) -> Tensor:
    """Mean cosine over the pairs of different rows of n unit vectors, from their sum `total` (D,) alone.

    sum_{i != j} x_i . x_j = |sum_i x_i|^2 - sum_i |x_i|^2 = |total|^2 - n, so the global batch's spread
    needs one all-reduce of a D-vector under DDP, not a gather and an n x n Gram matrix. Rows with the
    same content (a label text repeated in the batch) count as pairs at cosine 1.
    """
    return (total.square().sum() - count) / (count * (count - 1)).clamp(min=1)


@torch.no_grad()
def batch_health(output: ContrastiveOutput) -> dict[str, Tensor]:
    """The health metrics of one step over the global batch (every rank gets the same values).

    Computed from what the loss already produced (its embeddings, which under the gradient cache are the
    cached ones, and its scores), with one all-reduce of 2 D + 5 numbers under DDP:
    - loss_over_chance: the mean loss over ln(candidates a query sees after masking), averaged over
      queries: the loss of scores that cannot tell the candidates apart. ~1 learns nothing, 0 is perfect.
    - chance_loss: that chance value itself.
    - query_mean_cos, target_mean_cos: mean cosine between different queries, between different positives
      (the spread; near 1 = collapsed, every input embeds alike).
    - margin: positive minus hardest other candidate, in cosine, averaged over queries that have one.
    """
    scores, labels = output.scores, output.labels  # (B, C) cosines, -inf where masked; (B,)
    rows = torch.arange(scores.shape[0], device=scores.device)
    chance = torch.isfinite(scores).sum(1).float().log()  # (B,) ln(candidates seen)
    others = scores.clone()
    others[rows, labels] = float("-inf")
    hardest = others.max(1).values  # (B,) -inf where the positive is the only candidate
    has_rival = torch.isfinite(hardest)
    margin = (scores[rows, labels] - hardest)[has_rival]  # cosine units
    count = torch.tensor(float(scores.shape[0]), device=scores.device)
    sums = sum_over_ranks(torch.cat([
        F.normalize(output.query.float(), dim=-1).sum(0),  # (D,)
        F.normalize(output.positive.float(), dim=-1).sum(0),  # (D,)
        torch.stack([count, output.loss.detach().float() * count, chance.sum(), margin.sum(),
                     has_rival.sum().float()]),
    ]))
    dim = output.query.shape[1]
    queries, loss_sum, chance_sum, margin_sum, rivals = sums[2 * dim:]
    return {
        LOSS_OVER_CHANCE: loss_sum / chance_sum.clamp(min=1e-12),
        CHANCE_LOSS: chance_sum / queries,
        QUERY_COS: mean_pairwise_cosine(sums[:dim], queries),
        TARGET_COS: mean_pairwise_cosine(sums[dim:2 * dim], queries),
        MARGIN: margin_sum / rivals.clamp(min=1),
    }


CAUSES = (
    "Likely causes: a learning rate too low to move the model, or so high that it diverged (model.lr; see "
    "train/lr in TensorBoard); a temperature too high for the scores to separate (model.temperature); a "
    "frozen or uninformative vision side (LoRA targets that miss the vision tower, images the vision tower "
    "cannot tell apart, e.g. small grey scans on the tiny demo backbone); positives that cannot be told "
    "apart within one batch (many samples sharing a label text: set model.mask_false_negatives; identical "
    "queries with different targets). README, Training: health metrics."
)


@dataclass
class Episode:
    """A stretch of consecutive steps showing one symptom."""

    symptom: str
    first: int  # global step
    last: int
    value: float  # the metric at `last`
    warned_at: int | None = None

    @property
    def steps(self) -> int:
        return self.last - self.first + 1


class HealthMonitor(L.Callback):
    """Warns when training learns nothing: the loss stays at chance, or the embeddings collapse.

    Reads the `health/*` metrics the module logs each step (`batch_health`). A symptom must last `patience`
    consecutive steps after the first `warmup_steps` (every run starts at or above chance: a random model's
    sharp scores are often confidently wrong) before it is reported;
    while it lasts it is reported again every `repeat_every` steps, and every reported symptom is repeated
    in the summary at the end of training.

    Args:
        warmup_steps: steps before any check; the loss of every run starts at its chance value.
        patience: consecutive steps a symptom must last before a warning.
        chance_tolerance: the loss counts as at chance while loss / chance >= 1 - chance_tolerance.
        collapse_cosine: embeddings count as collapsed while the mean cosine between different queries (or
            between different targets) of the batch exceeds this.
        repeat_every: a symptom that lasts is reported again every this many steps.
    """

    def __init__(self, warmup_steps: int = 50, patience: int = 50, chance_tolerance: float = 0.05,
                 collapse_cosine: float = 0.99, repeat_every: int = 200):
        if min(patience, repeat_every) < 1 or warmup_steps < 0:
            raise ValueError(f"need patience, repeat_every >= 1 and warmup_steps >= 0; got {patience}, "
                             f"{repeat_every}, {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.patience = patience
        self.chance_tolerance = chance_tolerance
        self.collapse_cosine = collapse_cosine
        self.repeat_every = repeat_every
        self._open: dict[str, Episode] = {}  # symptom -> its current stretch
        self.reported: list[Episode] = []  # every stretch that was warned about, in order
        self._last: dict[str, float] = {}  # the metrics of the last step seen

    def _symptoms(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """{symptom: the metric showing it} for the symptoms this step's metrics show."""
        present = {}
        if metrics.get(LOSS_OVER_CHANCE, 0.0) >= 1 - self.chance_tolerance:
            present["chance"] = metrics[LOSS_OVER_CHANCE]
        for symptom, key in (("query_collapse", QUERY_COS), ("target_collapse", TARGET_COS)):
            if metrics.get(key, 0.0) > self.collapse_cosine:
                present[symptom] = metrics[key]
        return present

    def observe(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """Record one step's metrics; returns the warnings due at this step."""
        self._last = dict(metrics)
        if step <= self.warmup_steps:
            return []
        present = self._symptoms(metrics)
        self._open = {name: episode for name, episode in self._open.items() if name in present}
        due = []
        for name, value in present.items():
            episode = self._open.setdefault(name, Episode(name, step, step, value))
            episode.last, episode.value = step, value
            if episode.steps < self.patience:
                continue
            if episode.warned_at is None:
                self.reported.append(episode)
            elif step - episode.warned_at < self.repeat_every:
                continue
            episode.warned_at = step
            due.append(f"training health at step {step}: {self.describe(episode)}. {CAUSES}")
        return due

    def describe(self, episode: Episode) -> str:
        """One sentence on a stretch of a symptom, with its numbers."""
        span = f"for {episode.steps} steps (steps {episode.first}-{episode.last})"
        if episode.symptom == "chance":
            return (f"the loss has not dropped below {1 - self.chance_tolerance:.0%} of its chance value "
                    f"{span}: loss / chance = {episode.value:.3f}, the model does not tell a query's "
                    "positive from the other candidates")
        side = "queries" if episode.symptom == "query_collapse" else "targets"
        return (f"the {side}' embeddings have collapsed {span}: mean cosine between different {side} of a "
                f"batch {episode.value:.4f} > {self.collapse_cosine}, different inputs embed alike")

    def summary(self) -> str:
        """The run's health in a few lines: every reported symptom, or the last step's metrics."""
        if self.reported:
            lines = "\n".join(f"  - {self.describe(episode)}" for episode in self.reported)
            return f"training health: {len(self.reported)} problem(s) during this run:\n{lines}\n{CAUSES}"
        shown = ", ".join(f"{key.removeprefix('health/')} {value:.3f}" for key, value in self._last.items())
        return f"training health: no warning; at the last step {shown or 'no health metrics were logged'}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logged = {key: value for key, value in trainer.callback_metrics.items() if key.startswith("health/")}
        if not logged:
            return
        # One device sync a step, not one per metric.
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in logged.values()]).tolist()
        for message in self.observe(trainer.global_step, dict(zip(logged, values, strict=True))):
            rank_zero_warn(message)

    def state_dict(self) -> dict[str, Any]:
        """The stretches so far (plain types), so that a resumed run's checks and summary cover all of it."""
        return {"reported": [asdict(e) for e in self.reported],
                "open": {name: asdict(e) for name, e in self._open.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported = [Episode(**e) for e in state_dict["reported"]]
        by_start = {(e.symptom, e.first): e for e in self.reported}  # a lasting stretch is one object
        self._open = {name: by_start.get((e["symptom"], e["first"])) or Episode(**e)
                      for name, e in state_dict["open"].items()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (rank_zero_warn if self.reported else rank_zero_info)(self.summary())
