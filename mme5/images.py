"""Image decoding, the one way every path (training, evaluation, synthesis, the embedder) turns bytes,
files or PIL images into the RGB images the processors take, and the padding that keeps extreme shapes
processable.

Transparent images (RGBA, LA, P with transparency) are composited onto white, as the reference processors
do (`Image.convert("RGB")` alone would make transparent pixels black).
"""

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
        return to_rgb(source)
    name = where or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three for broken files
        raise ImageDecodeError(f"{name}: not a readable image ({error})") from None


WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB, transparent pixels composited onto white."""
    if image.mode == "RGB":
        return image
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if not transparent:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def fit_aspect_ratio(image: Image.Image, max_ratio: float, min_side: int = 2) -> Image.Image:
    """`image` padded with white, content centred, so that its longer side is at most `max_ratio` times its
    shorter one and both are at least `min_side` pixels (processors fail on 1-pixel sides and on extreme
    ratios). An image within bounds is returned as it is."""
    width, height = image.size
    new_width = max(width, min_side, int(-(-height // max_ratio)))
    new_height = max(height, min_side, int(-(-width // max_ratio)))
    if (new_width, new_height) == (width, height):
        return image
    canvas = Image.new("RGB", (new_width, new_height), WHITE)
    canvas.paste(to_rgb(image), ((new_width - width) // 2, (new_height - height) // 2))
    return canvas
