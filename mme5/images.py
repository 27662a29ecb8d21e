"""Image decoding, the one way every path (training, evaluation, synthesis, the embedder) turns bytes,
files or PIL images into the RGB images the processors take."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

ImageSource = bytes | str | os.PathLike | Image.Image


class ImageDecodeError(OSError):
    """Bytes or a file that are not a readable image (unidentified, truncated or corrupt).

    An OSError, as PIL's own errors are, so callers that count unreadable images keep catching them.
    """


def load_rgb(source: ImageSource, where: str | None = None) -> Image.Image:
    """`source` (encoded bytes, a file path or a PIL image) decoded fully and converted to RGB.

    Decoding is complete here, so a truncated file fails now and not later in a collator; `where` names the
    image in the error (a path is named by itself).
    """
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    name = where or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three for broken files
        raise ImageDecodeError(f"{name}: not a readable image ({error})") from None
