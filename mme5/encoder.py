"""The embedding model: an MLLM backbone, LoRA/DoRA adapters, last-token pooling, L2 normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from mme5.backbones.base import BackboneAdapter

# The paper's adapter targets: q/k/v/o projections of text self-attention, text cross-attention and
# vision attention, plus the text MLP's down projection. PEFT matches these names as module-name suffixes.
PAPER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@dataclass
class LoraSettings:
    """LoRA / DoRA adapter settings (defaults: the paper's recipe).

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input.
        use_dora: weight-decomposed LoRA (DoRA).
        init: "gaussian" (the paper's) or "default" (PEFT's Kaiming-uniform A, zero B).
        target_modules: module-name suffixes, or one regular expression matched against full module names
            (e.g. `.*language_model.*\\.(q_proj|v_proj)`).
    """

    r: int = 8
    alpha: int = 64
    dropout: float = 0.1
    use_dora: bool = True
    init: str = "gaussian"
    target_modules: list[str] | str = field(default_factory=lambda: list(PAPER_TARGET_MODULES))

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            use_dora=self.use_dora,
            init_lora_weights="gaussian" if self.init == "gaussian" else True,
            target_modules=self.target_modules,
        )


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state at each row's last real token, for left or right padding alike.

    hidden: (B, T, D); attention_mask: (B, T) with 1 on real tokens. Returns (B, D).
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    last = (attention_mask.long() * positions).argmax(dim=1)  # (B,) highest index holding a real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Encoder(nn.Module):
    """Maps a processor batch to L2-normalised embeddings (B, D) in float32."""

    def __init__(self, adapter: BackboneAdapter, lora: LoraSettings | None = None,
                 gradient_checkpointing: bool = False, normalize: bool = True):
        super().__init__()
        self.adapter = adapter
        self.normalize = normalize
        model = adapter.model
        if gradient_checkpointing:
            # Non-reentrant: the reentrant variant breaks with PEFT (frozen inputs get no gradient).
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            model = get_peft_model(model, lora.peft_config())
        self.model = model

    @property
    def dim(self) -> int:
        return self.adapter.hidden_size

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, D) embeddings; a `keep` (B,) bool entry (lockstep chunks) drops the placeholder rows."""
        keep = batch.get("keep")
        if keep is not None:
            batch = {k: v for k, v in batch.items() if k != "keep"}
        hidden = self.adapter.last_hidden_state(self.model, batch)  # (B, T, D)
        mask = batch["attention_mask"].to(hidden.device)
        pooled = last_token_pool(hidden, mask).float()  # (B, D)
        if keep is not None:
            # Indexing keeps the autograd graph even when no row is kept, so every module still runs its
            # backward (a collective under FSDP) with a zero gradient.
            pooled = pooled[keep.to(pooled.device)]
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode_chunks(self, chunks: list[dict[str, Tensor]]) -> Tensor:
        """Embeddings of several processor batches, concatenated in order: (sum of chunk sizes, D)."""
        if not chunks:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat([self(chunk) for chunk in chunks])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapters(self) -> bool:
        return isinstance(self.model, PeftModel)
