"""The user-facing embedder: a model folder (or checkpoint) in, L2-normalised float32 vectors out.

    emb = Embedder.from_pretrained("exported/x")
    e = emb.encode(texts=["a red cube"], images=["cube.png"], instruction="Represent the given image.")

It loads through `mme5.eval.loading.load_encoder` and embeds with `embedder(encoder)`, so its numbers are
the evaluation's. Items are batched longest first (less padding); results come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import Tensor
from tqdm import tqdm

from mme5.backbones import Item
from mme5.encoder import Encoder
from mme5.eval.loading import embedder, load_encoder

ImageLike = PIL.Image.Image | str | Path


def _rgb(image: ImageLike) -> PIL.Image.Image:
    """A PIL image in RGB, opened from a path if needed (lazily, one batch at a time)."""
    if isinstance(image, PIL.Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    with PIL.Image.open(image) as opened:
        return opened.convert("RGB")


class Embedder:
    """Embeds texts, images or text–image pairs with an `Encoder` in eval mode."""

    def __init__(self, encoder: Encoder, description: dict | None = None):
        self.encoder = encoder.eval()
        self.description = description or {}
        self._embed = embedder(encoder)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: str | None = None,
                        max_length: int | None = None) -> Embedder:
        """Load an exported folder, a plain backbone folder (zero-shot) or an EmbeddingModule `.ckpt`.

        device: default cuda when available, else cpu. dtype: "float32", "bfloat16" or "float16" (default:
        the weights' own). max_length: text tokens per item (default: the exported folder's, else 256).
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

        Images may be PIL images or file paths; the instruction is prepended to every item.
        """
        if texts is None and images is None:
            raise ValueError("give texts, images or both")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"texts and images pair up: got {len(texts)} texts and {len(images)} images")
        n = len(texts) if texts is not None else len(images)
        if n == 0:
            return torch.empty(0, self.dim)

        def length(i: int) -> tuple[bool, int]:  # as mme5.eval.encode: image items together, then chars
            return images is not None, len(instruction) + len(texts[i] if texts is not None else "")

        order = sorted(range(n), key=length, reverse=True)
        out = torch.empty(n, self.dim)
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        for batch in tqdm(batches, desc="encode", disable=not progress):
            items = [Item(instruction, texts[i] if texts is not None else None,
                          _rgb(images[i]) if images is not None else None) for i in batch]
            out[batch] = self._embed(items).float().cpu()
        return out
