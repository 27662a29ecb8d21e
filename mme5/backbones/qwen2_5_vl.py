"""Qwen2.5-VL: Qwen2-VL's prompt and image tokens; a new vision tower (window attention, RMSNorm, SwiGLU MLP).

What the embedder sees is Qwen2-VL's: the same image processor (one `<|image_pad|>` per 2x2 merged patch),
the same `mm_token_type_ids` and 3-D rope. The vision tower's module names differ only in its MLP
(`gate_proj`/`up_proj`/`down_proj`, where Qwen2-VL has `fc1`/`fc2`): its attention is still the fused
`visual.blocks.N.attn.qkv` and `.attn.proj`, so the Qwen2-VL LoRA regex adapts it, while the plain suffix
list (`PAPER_TARGET_MODULES`) misses vision attention and catches the vision MLP's `down_proj`.
"""

from typing import ClassVar

from transformers import Qwen2_5_VLProcessor

from mme5.backbones.qwen2_vl import Qwen2VLAdapter
from mme5.backbones.qwen_video import FramesProcessorMixin


class Qwen2_5_VLFramesProcessor(FramesProcessorMixin, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` with the torchvision-free video processor (`mme5.backbones.qwen_video`)."""


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """VLM2Vec's rule as for Qwen2-VL: a bare `<|image_pad|>` replaces the placeholder (VLM2Vec's
    `VLM_IMAGE_TOKENS` maps Qwen2-VL and Qwen2.5-VL alike), VLM2Vec's pixel cap."""

    family: ClassVar[str] = "qwen2_5_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    processor_class: ClassVar[type] = Qwen2_5_VLFramesProcessor
