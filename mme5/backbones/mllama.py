"""Llama-3.2-Vision (Mllama): the image enters through gated cross-attention layers, not as tokens."""

from typing import Any, ClassVar

from torch import Tensor
from transformers import BatchFeature

from mme5.backbones.base import IMAGE_PLACEHOLDER, BackboneAdapter, Item

BOS = "<|begin_of_text|>"


class MllamaAdapter(BackboneAdapter):
    """The mmE5 collator's rule: `"<|image_1|>\n"` (the placeholder and its newline) becomes
    `<|image|><|begin_of_text|>`; a prompt without image starts with `<|begin_of_text|>`; the rest is kept, so
    the pooled token is the published trailing newline."""

    family: ClassVar[str] = "mllama"
    model_types: ClassVar[tuple[str, ...]] = ("mllama",)
    default_image_token: ClassVar[str] = "<|image|>"
    add_special_tokens: ClassVar[bool] = False  # the prompt carries <|begin_of_text|>; don't add a second
    images_per_row: ClassVar[bool] = True  # Mllama's processor: one list of images per row
    expands_image_tokens: ClassVar[bool] = False  # <|image|> stays one token (cross-attention, not tokens)

    def published_prompt(self, item: Item) -> str:
        head = self.image_token + BOS
        text = item.published().replace(IMAGE_PLACEHOLDER + "\n", head).replace(IMAGE_PLACEHOLDER, head)
        return text if BOS in text else BOS + text  # as MllamaProcessor would add it

    def head_markers(self) -> tuple[str, ...]:
        return (self.image_token, BOS)

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """As the base, but an image 1 pixel high is stretched to 2 (mmE5 src/dataset.py l. 74-77). mmE5 does
        it in `TrainDataset` only (its `EvalDataset` hands the image over unchanged); here evaluation does
        it too, so that an image embeds the same in training and evaluation (a kept difference)."""
        width, height = super().target_size(size)
        return (width, 2) if height == 1 else (width, height)

    def last_hidden_state(self, model: Any, batch: BatchFeature | dict[str, Tensor]) -> Tensor:
        """Like the base, but text-only rows of a mixed batch see all-zero vision states.

        In transformers' Mllama a row whose cross-attention mask is all zero still attends (uniformly) to
        its row's vision states: only the cross-attention MLP is masked. A text-only row would then absorb
        the encoding of a blank padding tile and differ from the same item encoded alone, where the
        cross-attention layers are skipped. Zero states give zero values (k/v/o projections have no bias),
        so the gated attention adds exactly nothing. The vision tower also runs on image rows only.
        """
        inner = self.inner_model(model)
        batch = self._to_model(inner, batch)
        pixel_values = batch.pop("pixel_values", None)
        if pixel_values is not None:
            ratio_ids, ratio_mask = batch.pop("aspect_ratio_ids"), batch.pop("aspect_ratio_mask")
            rows = ratio_ids[:, 0] > 0  # (B,) aspect-ratio id 0 marks "no image" in this row
            vision = inner.vision_model(pixel_values[rows], ratio_ids[rows], ratio_mask[rows])
            projected = inner.multi_modal_projector(vision.last_hidden_state)  # (b, imgs, tiles, patches, D)
            states = projected.new_zeros(len(rows), *projected.shape[1:])
            states[rows] = projected
            batch["cross_attention_states"] = states.reshape(-1, states.shape[-2], states.shape[-1])
        return inner(**batch, use_cache=False).last_hidden_state

