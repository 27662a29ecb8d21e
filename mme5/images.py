"""Image decoding, the one way every path (training, evaluation, synthesis, the embedder) turns bytes,
files or PIL images into the images the processors take, and the padding that keeps extreme shapes
processable.

Decoding keeps an image's own mode (`load`), as the references' `Image.open` does: a reference that resizes
before its processor (mmE5's LLaVA-NeXT 512x512, VLM2Vec's 1344x1344) resizes the raw image with PIL's
default filter for its mode (nearest for palette images) and composites it onto white in the processor
afterwards; the adapters do the same (`BackboneAdapter.prepare_image`).

Transparent images (RGBA, LA, P with transparency) are composited onto white, as the reference processors
do (`Image.convert("RGB")` alone would make transparent pixels black). 16-bit greyscale images (PNG, TIFF)
are scaled to 8 bits (`convert("RGB")` alone clips every value above 255, turning them almost white).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

ImageSource = bytes | str | os.PathLike | Image.Image


class ImageDecodeError(OSError):
    """Bytes or a file that are not a readable image (unidentified, truncated, corrupt, or a decompression
    bomb above the pixel cap).

    An OSError, as PIL's own errors are, so callers that count unreadable images keep catching them.
    `image`: the image's name (its path, or what `where` called it), for callers that say who uses it.
    """

    def __init__(self, message: str, image: str | None = None):
        super().__init__(message)
        self.image = image


# The raster formats Pillow decodes by itself: a file name with one of these suffixes names an image.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif",
                            ".tiff", ".webp", ".ico", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2",
                            ".j2k", ".avif"})

DEFAULT_MAX_PIXELS = 2 * 89_478_485  # PIL's own error threshold (twice its warning one)


def max_pixels() -> int:
    """The pixel cap: `MME5_MAX_IMAGE_PIXELS` from the environment, else PIL's decompression-bomb limit."""
    return int(os.environ.get("MME5_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS))


def load(source: ImageSource, where: str | None = None) -> Image.Image:
    """`source` (encoded bytes, a file path or a PIL image) decoded fully, in its own mode (16-bit
    greyscale scaled to 8 bits).

    Decoding is complete here, so a truncated file fails now and not later in a collator; any failure of
    the decoder is an `ImageDecodeError` naming the image (`where`, or the path itself).
    """
    if isinstance(source, Image.Image):
        return eight_bit(source)
    name, data = _read(source, where)
    with _decoding(name):
        with _open(data, name) as image:
            image.load()
            return eight_bit(image)


def load_rgb(source: ImageSource, where: str | None = None) -> Image.Image:
    """`source` decoded fully (`load`) and converted to RGB (`to_rgb`)."""
    return to_rgb(load(source, where))


def check_image(source: bytes | str | os.PathLike, where: str | None = None) -> None:
    """Raise `ImageDecodeError` unless `source` is an image within the pixel cap whose structure checks out
    (PIL's `verify`: cheaper than decoding; for converters, which store the bytes as they are)."""
    name, data = _read(source, where)
    with _decoding(name):
        with _open(data, name) as image:
            image.verify()


def format_suffix(data: bytes) -> str | None:
    """The file suffix of encoded image bytes in the format PIL identifies from their header (".tif"), or
    None when PIL reads no such format."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            name = image.format
    except Exception:  # noqa: BLE001 - whatever the identification raises, the format is unknown
        return None
    return next((suffix for suffix, held in Image.registered_extensions().items() if held == name), None)


def _read(source: bytes | str | os.PathLike, where: str | None) -> tuple[str, bytes]:
    if isinstance(source, bytes):
        return where or "image bytes", source
    return where or str(source), Path(source).read_bytes()


def _open(data: bytes, name: str) -> Image.Image:
    """The image's header, refused when it claims more pixels than the cap (before any pixel is decoded)."""
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels():
        image.close()
        raise ImageDecodeError(f"{name}: {image.width}x{image.height} pixels exceed the cap of "
                               f"{max_pixels()} (a decompression bomb? raise MME5_MAX_IMAGE_PIXELS if real)",
                               name)
    return image


@contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Any failure of the decoder inside the block becomes an ImageDecodeError naming the image: PIL raises
    OSError, SyntaxError, ValueError, DecompressionBombError and, on malformed files, others besides."""
    try:
        yield
    except (ImageDecodeError, FileNotFoundError):
        raise
    except Exception as error:  # noqa: BLE001 - whatever the decoder raises, the image is unreadable
        raise ImageDecodeError(f"{name}: not a readable image ({type(error).__name__}: {error})",
                               name) from None


WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # how PIL opens 16-bit greyscale PNG and TIFF


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale `image` as 8-bit greyscale, 0..65535 → 0..255 (the high byte, not clipped at
    255); any other image as it is."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    return image.convert("I").point(lambda value: value / 256).convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB, transparent pixels composited onto white, 16-bit values scaled to 8 bits."""
    image = eight_bit(image)
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
