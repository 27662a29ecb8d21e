"""Qwen2-VL: an image becomes `<|image_pad|>` tokens (one per 2x2 merged patch), a video `<|video_pad|>`
tokens (one per 2x2 merged patch of each pair of frames)."""

from typing import ClassVar

from transformers import Qwen2VLProcessor

from mme5.backbones.base import BackboneAdapter
from mme5.backbones.qwen_video import FramesProcessorMixin


class Qwen2VLFramesProcessor(FramesProcessorMixin, Qwen2VLProcessor):
    """`Qwen2VLProcessor` with the torchvision-free video processor (`mme5.backbones.qwen_video`)."""


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
    reads_video: ClassVar[bool] = True  # VLM2Vec-V2's `<|video_pad|>` (src/model/processor.py l. 74-77)
    bounds_video_frames: ClassVar[bool] = True
    processor_class: ClassVar[type] = Qwen2VLFramesProcessor
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
        """Resolution bounds: the input format's, else the processor's minimum and the family's pixel cap;
        video frames: the input format's video bounds, else the image bounds."""
        images = self.processor.image_processor
        min_pixels = self.input_format.min_pixels or images.size["shortest_edge"]
        max_pixels = self.input_format.max_pixels or self.default_max_pixels
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}")
        images.size = type(images.size)(shortest_edge=min_pixels, longest_edge=max_pixels)
        video_min = self.input_format.video_min_pixels or min_pixels
        video_max = self.input_format.video_max_pixels or max_pixels
        if video_min > video_max:
            raise ValueError(f"the video frame bounds cross: min {video_min} is above max {video_max} "
                             "(video_min_pixels/video_max_pixels, else the image bounds)")
        self.processor.video_processor.size = {"shortest_edge": video_min, "longest_edge": video_max}
