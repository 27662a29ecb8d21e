"""mme5: multimodal, multilingual embedding models trained the mmE5 way."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Embedder"]


def __getattr__(name: str) -> Any:
    # Lazy: `import mme5` stays cheap (no torch/transformers) until the embedder is asked for.
    if name == "Embedder":
        from mme5.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'mme5' has no attribute {name!r}")
