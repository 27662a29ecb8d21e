"""Qwen3.5: Qwen3-VL's processor and image tokens (no deepstack) in front of a hybrid language model, Gated
DeltaNet linear-attention layers with a full-attention layer every 4th (transformers 5.24 runs both on CPU
through its torch fallbacks when flash-linear-attention and causal-conv1d are not installed).

What the embedder needs of the linear-attention layers (each answer tested, tests/test_backbones.py unless
said otherwise):
- Last-token pooling with left padding: nothing to change. The model multiplies each linear-attention
  layer's input by the 2-D attention mask, so a pad position has zero q, k, v: the delta-rule state stays
  zero over left pads and the causal conv sees zeros there, which is its own zero padding of a row alone.
  An item embeds the same alone and in a left-padded mixed batch (1e-5), also when it crosses a 64-token
  chunk of the chunked delta rule, and the pad token's embedding has no effect.
- Gradient cache: `last_hidden_state` calls the model with `use_cache=False`, so no conv or recurrent state
  is created, and the re-forward of a chunk is the first forward (tests/test_encoder.py: gradient cache =
  full batch, with and without gradient checkpointing).
- FSDP: both layer types are one class, `Qwen3_5DecoderLayer` (in `_no_split_modules`, which mme5.sharding
  wraps), holding either `linear_attn` or `self_attn`; the vision blocks are `Qwen3_5VisionBlock`.
- Gradient checkpointing: `Qwen3_5DecoderLayer` is a `GradientCheckpointingLayer`, both kinds alike.
"""

from typing import ClassVar

from mme5.backbones.qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3-VL's adapter: the published rule of Qwen2-VL (a bare `<|image_pad|>` replaces the placeholder),
    Qwen3-VL's processor (the class Qwen3.5 checkpoints name) and pixel cap (WeMM-Embedding's own
    preprocessing was not read: Qwen3-VL-Embedding's cap stands)."""

    family: ClassVar[str] = "qwen3_5"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_5",)
