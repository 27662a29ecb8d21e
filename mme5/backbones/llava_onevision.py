"""LLaVA-OneVision: SigLIP encodes the image whole and as the tiles of an anyres grid; the projected features
enter Qwen2 as `<image>` tokens (each grid row ended by the learned `image_newline` vector).

The grid decides the token count: an image takes the grid resolution that fits it best (the released models'
grid: 1x1 to 6x6 tiles of 384 px, each tile 729 tokens, at most ~9 tiles' worth after `anyres_max_9`
downsampling). `InputFormat.max_grid_side` narrows it, e.g. to LLaVE's (1x1)..(2x2).
"""

from collections.abc import Sequence
from typing import ClassVar

from transformers import LlavaOnevisionProcessor

from mme5.backbones.llava import LlavaAdapter


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without its video processor (which needs torchvision).

    Its settings are spelled out in the signature because transformers saves only what the signature names
    (`ProcessorMixin.to_dict`), and the image token count depends on them. A checkpoint's processor must be
    reloaded with this class (`AutoProcessor` silently returns only the tokenizer).
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                         chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)


def grid_within(pinpoints: Sequence[Sequence[int]], tile: int, side: int) -> list[list[int]]:
    """The grid resolutions (height, width) of at most `side` tiles of `tile` pixels a side."""
    kept = [list(point) for point in pinpoints if max(point) <= side * tile]
    if not kept:
        raise ValueError(f"max_grid_side={side} keeps none of the anyres grid {pinpoints} "
                         f"(tiles of {tile} px)")
    return kept


class LlavaOnevisionAdapter(LlavaAdapter):
    """The llava family's rule (LLaVE's and VLM2Vec's): `<image>` replaces the placeholder, the text is kept
    verbatim; Qwen2's tokenizer adds no bos. The processor expands `<image>` to the image's feature count and
    sends `image_sizes` and `batch_num_images` with the pixels (all part of each chunk)."""

    family: ClassVar[str] = "llava_onevision"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    processor_class: ClassVar[type] = LlavaOnevisionImageOnlyProcessor
    anyres_grid: ClassVar[bool] = True

    def configure_processor(self) -> None:
        """Narrow the anyres grid to `max_grid_side` tiles a side, in the processor (which counts the image
        tokens) and in the model (which lays out the features): both must pick the same resolution.

        Narrowing only: an adapter made on the processor or model of another sees the grid that one left.
        """
        side = self.input_format.max_grid_side
        if side is None:
            return
        images = self.processor.image_processor
        images.image_grid_pinpoints = grid_within(images.image_grid_pinpoints, images.size["height"], side)
        if self.model is not None:
            config = self.model.config
            config.image_grid_pinpoints = grid_within(config.image_grid_pinpoints,
                                                      config.vision_config.image_size, side)
