"""The user-facing embedder: a model folder (or checkpoint) in, L2-normalised float32 vectors out.

    emb = Embedder.from_pretrained("exported/x")
    e = emb.encode(texts=["a red cube"], images=["cube.png"], instruction="Represent the given image.")

It loads through `mme5.checkpoint.load_encoder` and embeds with `Encoder.embed`, so its numbers are the
evaluation's. Items are batched longest first (less padding); results come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import Tensor

from mme5.backbones import Item
from mme5.checkpoint import load_encoder
from mme5.encoder import Encoder

ImageLike = PIL.Image.Image | str | Path


class Embedder:
    """Embeds texts, images or text–image pairs with an `Encoder` in eval mode."""

    def __init__(self, encoder: Encoder, description: dict | None = None):
        self.encoder = encoder.eval()
        self.description = description or {}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: str | None = None,
                        max_length: int | None = None) -> Embedder:
        """Load an exported folder, a plain backbone folder (zero-shot) or an EmbeddingModule `.ckpt`.

        device: default cuda when available, else cpu. dtype: "float32", "bfloat16" or "float16" (default:
        the weights' own). max_length: text tokens per item (default: the recorded input format's).
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_encoder(path, device, dtype, max_length)
        return cls(loaded.encoder, loaded.description)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode(self, texts: Sequence[str] | None = None, images: Sequence[ImageLike] | None = None,
               instruction: str = "", batch_size: int = 32, progress: bool = False) -> Tensor:
        """(n, D) float32 embeddings on CPU, one per text, image, or (text, image) pair when both are given.

        Images may be PIL images or file paths (opened one batch at a time); the instruction is prepended
        to every item.
        """
        if texts is None and images is None:
            raise ValueError("give texts, images or both")
        # A bare string is a sequence too (of characters): one embedding per character, silently.
        if isinstance(texts, str):
            raise TypeError(f"texts must be a list of strings, got the string {texts[:40]!r}: wrap it in "
                            "[...]")
        if isinstance(images, str | Path | PIL.Image.Image):
            raise TypeError(f"images must be a list, got one {type(images).__name__}: wrap it in [...]")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"texts and images pair up: got {len(texts)} texts and {len(images)} images")
        n = len(texts) if texts is not None else len(images)
        items = [Item(instruction, texts[i] if texts is not None else None,
                      images[i] if images is not None else None) for i in range(n)]
        return self.encoder.embed(items, batch_size, progress)
