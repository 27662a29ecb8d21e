"""Qwen2-VL: the image becomes `<|image_pad|>` tokens (one per 2x2 merged patch) between vision markers."""

from typing import ClassVar

from transformers import Qwen2VLProcessor

from mme5.backbones.base import BackboneAdapter


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor.

    The stock class cannot be built without torchvision (its video processor needs it), and
    `AutoProcessor` then silently returns only the tokenizer; images are all we embed.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class Qwen2VLAdapter(BackboneAdapter):
    """`<|vision_start|><|image_pad|><|vision_end|>` replaces the image placeholder."""

    family: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    image_prompt: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    processor_class: ClassVar[type] = Qwen2VLImageOnlyProcessor
