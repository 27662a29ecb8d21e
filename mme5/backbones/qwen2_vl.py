"""Qwen2-VL: the image becomes `<|image_pad|>` tokens (one per 2x2 merged patch) between vision markers."""

from typing import ClassVar

from transformers import Qwen2VLProcessor

from mme5.backbones.base import BackboneAdapter


class ImageOnlyProcessorMixin:
    """A Qwen-VL processor without its video processor (put first in the bases of the processor class).

    The stock classes cannot be built without torchvision (their video processors need it), and
    `AutoProcessor` then silently returns only the tokenizer; images are all we embed. A checkpoint's
    processor must be reloaded with the same class.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class Qwen2VLImageOnlyProcessor(ImageOnlyProcessorMixin, Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor."""


# VLM2Vec's resolution cap for Qwen2-VL (its v2 arguments), so that memory per item is bounded.
VLM2VEC_MAX_PIXELS = 28 * 28 * 1280
MIN_SIDE = 28  # one merged patch: VLM2Vec-V2 enlarges an image with a side below this


class Qwen2VLAdapter(BackboneAdapter):
    """VLM2Vec's rule: only the placeholder is replaced, by a bare `<|image_pad|>` (the token VLM2Vec's
    released Qwen2-VL checkpoints were trained with; `InputFormat.image_token` may say
    `<|vision_start|><|image_pad|><|vision_end|>`, Qwen2-VL's chat format). The processor expands it to one
    token per merged patch."""

    family: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    default_image_token: ClassVar[str] = "<|image_pad|>"
    processor_class: ClassVar[type] = Qwen2VLImageOnlyProcessor
    default_max_pixels: ClassVar[int] = VLM2VEC_MAX_PIXELS  # the family's reference embedder's pixel cap
    # What an image with a side under MIN_SIDE is resized to (None: kept): VLM2Vec-V2's 56x56 for Qwen2-VL
    # and Qwen2.5-VL (src/model/processor.py `Qwen2_VL_process_fn` l. 329-331, used for both, l. 679-680).
    small_image_size: ClassVar[tuple[int, int] | None] = (56, 56)

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """As the base, but an image with a side under 28 px becomes `small_image_size`, unless the preset's
        embedder keeps the aspect ratio of small images (`Preset.keeps_small_images`: the processor then
        enlarges them to `min_pixels`, aspect ratio kept)."""
        width, height = super().target_size(size)
        if self.small_image_size and not self.preset.keeps_small_images and min(width, height) < MIN_SIDE:
            return self.small_image_size
        return width, height

    def configure_processor(self) -> None:
        """Resolution bounds: the input format's, else the processor's minimum and the family's pixel cap."""
        images = self.processor.image_processor
        min_pixels = self.input_format.min_pixels or images.size["shortest_edge"]
        max_pixels = self.input_format.max_pixels or self.default_max_pixels
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}")
        images.size = type(images.size)(shortest_edge=min_pixels, longest_edge=max_pixels)
