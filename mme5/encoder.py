"""The embedding model: an MLLM backbone, LoRA/DoRA adapters, last-token pooling, L2 normalisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import PIL.Image
import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from tqdm import tqdm

from mme5.backbones.base import BackboneAdapter, Chunk, Item, length_order
from mme5.images import load
from mme5.sharding import is_sharded_module
from mme5.video import kept_frames

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
                 gradient_checkpointing: bool = False, normalize: bool = True,
                 peft_folder: str | Path | None = None):
        """lora: new adapters to train; peft_folder: trained adapters to load (a PEFT adapter folder)."""
        super().__init__()
        self.adapter = adapter
        self.normalize = normalize
        model = adapter.model
        if gradient_checkpointing:
            # Non-reentrant: the reentrant variant breaks with PEFT (frozen inputs get no gradient).
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None and peft_folder is not None:
            raise ValueError("give lora (new adapters) or peft_folder (trained ones), not both")
        if lora is not None:
            model = get_peft_model(model, lora.peft_config())
        if peft_folder is not None:
            model = PeftModel.from_pretrained(model, peft_folder)
        self.model = model

    @property
    def dim(self) -> int:
        return self.adapter.hidden_size

    def forward(self, inputs: Mapping[str, Tensor], keep: Tensor | None = None) -> Tensor:
        """(B, D) embeddings of a processor batch; `keep` (B,) bool drops a lockstep chunk's padding rows."""
        hidden = self.adapter.last_hidden_state(self.model, inputs)  # (B, T, D)
        mask = inputs["attention_mask"].to(hidden.device)
        pooled = last_token_pool(hidden, mask).float()  # (B, D)
        if keep is not None:
            # Indexing keeps the autograd graph even when no row is kept, so every module still runs its
            # backward (a collective under FSDP) with a zero gradient.
            pooled = pooled[keep.to(pooled.device)]
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode_chunk(self, chunk: Chunk) -> Tensor:
        """(n, D) embeddings of one chunk's real rows (with autograd, as training needs)."""
        return self(chunk.inputs, chunk.keep)

    def encode_chunks(self, chunks: Sequence[Chunk]) -> Tensor:
        """Embeddings of several chunks, concatenated in order: (sum of real rows, D)."""
        if not chunks:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat([self.encode_chunk(chunk) for chunk in chunks])

    @torch.no_grad()
    def embed(self, items: Sequence[Item], batch_size: int | None = None, progress: bool = False) -> Tensor:
        """(n, D) float32 embeddings on CPU, row i for item i: the one items→embeddings path.

        Evaluation, the training callbacks, `Embedder` and the synthesis image index all call this. No
        autograd; train/eval mode is the caller's. Items are batched longest first (less padding); images
        given as bytes or paths are decoded one batch at a time, of a video only the frames the adapter keeps.
        `batch_size` None: one batch.
        Sharded (FSDP) it is a collective: every rank calls it (with no items too), ranks run as many
        batches as the rank with most, and every batch is a lockstep chunk.
        """
        order = length_order(items)
        size = batch_size or max(len(order), 1)
        batches = [order[s : s + size] for s in range(0, len(order), size)]
        lockstep = is_sharded_module(self)
        rounds = _most_over_ranks(len(batches), self.device) if lockstep else len(batches)
        out = torch.empty(len(order), self.dim)
        for round_ in tqdm(range(rounds), desc="embed", unit="batch", disable=not progress):
            rows = batches[round_] if round_ < len(batches) else []
            batch = [decoded(items[i], self.adapter.input_format.num_frames) for i in rows]
            if lockstep:
                out[rows] = self.encode_chunk(self.adapter.lockstep_chunk(batch)).float().cpu()
            elif batch:
                out[rows] = self(self.adapter.collate(batch)).float().cpu()
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapters(self) -> bool:
        return isinstance(self.model, PeftModel)


def decoded(item: Item, num_frames: int | None = None) -> Item:
    """The item with its image, or the `num_frames` frames of its video the adapter keeps
    (`mme5.video.kept_frames`; None: every frame), as PIL images (decoded from bytes or a path if needed,
    in their own mode: the adapter resizes and converts them as the family's reference does)."""
    if item.video is not None:
        return replace(item, video=tuple(_pil(frame) for frame in kept_frames(item.video, num_frames)))
    if item.image is None:
        return item
    return replace(item, image=_pil(item.image))


def _pil(image: PIL.Image.Image | bytes | str | Path) -> PIL.Image.Image:
    return image if isinstance(image, PIL.Image.Image) else load(image)


def _most_over_ranks(count: int, device: torch.device) -> int:
    """The largest `count` of all ranks (a collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return count
    value = torch.tensor([count], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
