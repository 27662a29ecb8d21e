"""The contrastive training step: groups of chunks → embeddings → negatives in their slots → InfoNCE →
backward, through the gradient cache or in one plain pass. The LightningModule, the benchmarks and the
tests all take this one path."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mme5.gradcache import GradCache
from mme5.losses import ContrastiveOutput, InfoNCE, scatter_negatives
from mme5.matryoshka import Matryoshka


def contrastive_step(
    encode: Callable[[Any], Tensor],
    query: Sequence[Any],
    positive: Sequence[Any],
    negatives: Sequence[Any],
    negative_mask: Tensor,
    loss_fn: InfoNCE,
    cache: GradCache | None = None,
    backward: Callable[[Tensor], Any] = Tensor.backward,
    positive_keys: Tensor | None = None,
    groups: Tensor | None = None,
    matryoshka: Matryoshka | None = None,
) -> tuple[Tensor, ContrastiveOutput]:
    """Accumulate into `.grad` the gradient of InfoNCE over one batch; returns (detached loss, output).

    query, positive, negatives: chunks that `encode` maps to (n, D) embeddings (B, B and N rows; N real
    negatives, row-major in `negative_mask` (B, K) order). With `cache` the gradient cache encodes them
    twice, one chunk's activations at a time (its own `backward` then applies); without it, one forward of
    everything and one `backward`. Both give the same gradient. `positive_keys` (B,): the positives' content
    keys, for a loss that masks false negatives; `groups` (B,): each query's temperature group, for a loss
    with `temperature_groups`. `matryoshka`: sum the loss over prefixes of the embeddings.
    """
    inputs = {"query": query, "positive": positive}
    if negatives:
        inputs["negatives"] = negatives

    def loss_of(embeddings: dict[str, Tensor]) -> ContrastiveOutput:
        scattered = scatter_negatives(embeddings.get("negatives"), negative_mask)
        mask = negative_mask.to(embeddings["query"].device) if scattered is not None else None

        def loss(query: Tensor, positive: Tensor, negatives: Tensor | None) -> ContrastiveOutput:
            return loss_fn(query, positive, negatives, mask, positive_keys, groups)

        arguments = (embeddings["query"], embeddings["positive"], scattered)
        return loss(*arguments) if matryoshka is None else matryoshka(loss, *arguments)

    if cache is not None:
        return cache.step(encode, inputs, loss_of, loss_parameters=list(loss_fn.parameters()))
    output = loss_of({name: _encode_all(encode, chunks) for name, chunks in inputs.items()})
    backward(output.loss)
    return output.loss.detach(), output


def _encode_all(encode: Callable[[Any], Tensor], chunks: Sequence[Any]) -> Tensor:
    return torch.cat([encode(chunk) for chunk in chunks])


def temperature_group_rows(loss_fn: InfoNCE, tasks: Sequence[str], sources: Sequence[str],
                           source_groups: Mapping[str, str] | None) -> Tensor | None:
    """(B,) each row's index into `loss_fn.group_names`: its source's group under `source_groups`, else its
    task; None when the loss has no temperature groups."""
    if not loss_fn.group_names:
        return None
    if source_groups is None:
        names, field = tasks, "task"
    else:
        unmapped = sorted(set(sources) - set(source_groups))
        if unmapped:
            raise ValueError(f"model.temperature_groups maps no group to the sources {unmapped} of this "
                             f"batch; it maps {sorted(source_groups)}")
        names, field = [source_groups[source] for source in sources], "group"
    index = {name: i for i, name in enumerate(loss_fn.group_names)}
    if unknown := sorted(set(names) - set(index)):
        raise ValueError(f"rows of {field} {unknown} have no temperature group; groups: {list(index)}")
    return torch.tensor([index[name] for name in names], dtype=torch.long)
