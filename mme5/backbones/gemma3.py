"""Gemma 3: `<start_of_image>` in the text becomes the processor's full image sequence, "\\n\\n", the marker,
`mm_tokens_per_image` `<image_soft_token>`s (the pooled SigLIP patches), `<end_of_image>`, "\\n\\n".

The model gives the soft tokens of one image bidirectional attention among themselves, read from the
processor's `token_type_ids` (1 on soft tokens): they travel in every batch `collate` makes, padding included,
so an item embeds the same alone and in a left-padded batch. Position ids are the model's default
(0..T-1 over the padded row); rope is relative and the sliding window counts positions, so the left padding
shifts nothing a real token sees.
"""

from typing import ClassVar

from mme5.backbones.base import BackboneAdapter


class Gemma3Adapter(BackboneAdapter):
    """No public embedder is built on Gemma 3, so this is the rule of the other inline-token families
    (VLM2Vec's for Qwen2-VL and LLaVA): only the placeholder is replaced, by Gemma 3's image marker
    `<start_of_image>` (what its chat template writes for an image), the text is kept verbatim and the
    tokenizer adds its own `<bos>`; the pooled token is the published trailing newline.

    Images are resized to the processor's fixed size (896 px for the released checkpoints): pan-and-scan,
    which would add a crop sequence per image and a sentence around them, is turned off whatever the
    checkpoint's processor says (it is the processor's default). max_length counts the text as the model
    sees it, the newlines the processor puts around the image sequence included; the image sequence itself
    is neither counted nor cut.
    """

    family: ClassVar[str] = "gemma3"
    model_types: ClassVar[tuple[str, ...]] = ("gemma3",)
    default_image_token: ClassVar[str] = "<start_of_image>"
    images_per_row: ClassVar[bool] = True  # Gemma3Processor matches images to rows by nesting

    def configure_processor(self) -> None:
        """Pan-and-scan off: one fixed-size image sequence per image. The processor's call defaults
        (`images_kwargs`) decide it, over the image processor's own setting."""
        self.processor.images_kwargs = {**self.processor.images_kwargs, "do_pan_and_scan": False}

    @property
    def image_token_ids(self) -> frozenset[int]:
        """`<start_of_image>`, the soft tokens and `<end_of_image>`."""
        tok = self.tokenizer
        return frozenset({tok.boi_token_id, tok.image_token_id, tok.eoi_token_id})

    def _count_text_tokens(self, text: str, specials: bool) -> int:
        """Text tokens of a prompt part as the processor expands it (newlines around the image sequence
        included).

        The parts are tokenized apart: a tokenizer that merges the expansion's closing "\\n\\n" with a
        newline opening the body counts one token too many, never too few.
        """
        expanded = text.replace(self.processor.boi_token, self.processor.full_image_sequence)
        return super()._count_text_tokens(expanded, specials)
