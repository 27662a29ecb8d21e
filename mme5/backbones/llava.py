"""LLaVA and LLaVA-NeXT: the image becomes `<image>` tokens, one per projected vision patch."""

from typing import ClassVar

from mme5.backbones.base import BackboneAdapter


class LlavaAdapter(BackboneAdapter):
    """The mmE5/VLM2Vec rule: `<image>` replaces the placeholder, the rest is kept; the tokenizer adds its own
    bos. mmE5 resizes LLaVA-NeXT inputs to 512×512: set `InputFormat.image_size` to do the same."""

    family: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava", "llava_next")
    default_image_token: ClassVar[str] = "<image>"
