"""Qwen3-VL: as Qwen2-VL, the image becomes `<|image_pad|>` tokens, one per 2x2 merged patch (of 16 px, not
14); vision features of some vision layers ("deepstack") are also added to the first language layers'
hidden states at the image positions, inside the model's forward."""

from typing import ClassVar

from transformers import Qwen3VLProcessor

from mme5.backbones.qwen2_vl import Qwen2VLAdapter
from mme5.backbones.qwen_video import FramesProcessorMixin


class Qwen3VLFramesProcessor(FramesProcessorMixin, Qwen3VLProcessor):
    """`Qwen3VLProcessor` with the torchvision-free video processor (`mme5.backbones.qwen_video`)."""


# Qwen3-VL-Embedding's pixel cap (QwenLM/Qwen3-VL-Embedding README, `Qwen3VLEmbedder(max_pixels=1843200)`:
# 1800 merged patches of 32x32 px).
QWEN3_VL_EMBEDDING_MAX_PIXELS = 1800 * 32 * 32


class Qwen3VLAdapter(Qwen2VLAdapter):
    """The published rule of Qwen2-VL (a bare `<|image_pad|>` replaces the placeholder) with Qwen3-VL's
    processor and Qwen3-VL-Embedding's pixel cap. The 3-D rope index comes from the processor's
    `mm_token_type_ids`, so image tokens need no vision markers around them."""

    family: ClassVar[str] = "qwen3_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    processor_class: ClassVar[type] = Qwen3VLFramesProcessor
    default_max_pixels: ClassVar[int] = QWEN3_VL_EMBEDDING_MAX_PIXELS
    # Small images kept: VLM2Vec's 56x56 rule has no Qwen3-VL path, and Qwen3-VL-Embedding leaves them to
    # the processor, which enlarges them to min_pixels keeping their aspect ratio.
    small_image_size: ClassVar[tuple[int, int] | None] = None
