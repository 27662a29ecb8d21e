"""LLaVA and LLaVA-NeXT: the image becomes `<image>` tokens, one per projected vision patch."""

from typing import ClassVar

from mme5.backbones.base import BackboneAdapter


class LlavaAdapter(BackboneAdapter):
    """`<image>` replaces the image placeholder; the tokenizer adds its own bos."""

    family: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava", "llava_next")
    image_prompt: ClassVar[str] = "<image>"
