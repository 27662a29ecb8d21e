"""The one image decoder: bytes, paths and PIL images in, fully decoded RGB out, broken files named."""

import io

import pytest
from PIL import Image

from mme5.images import ImageDecodeError, fit_aspect_ratio, load_rgb


def png_bytes(mode="RGB", size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise(size, 64).convert(mode)  # noise: the pixel data spans many bytes
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bytes_paths_and_pil_images_decode_to_the_same_rgb(tmp_path):
    data = png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    images = [load_rgb(data), load_rgb(tmp_path / "a.png"), load_rgb(Image.open(io.BytesIO(data)))]
    assert all(im.mode == "RGB" and im.size == (16, 12) for im in images)
    assert images[0].tobytes() == images[1].tobytes() == images[2].tobytes()
    assert load_rgb(png_bytes("L")).mode == "RGB"


def test_truncated_and_non_image_input_raise_a_named_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="shard-0.tar:s1.qry"):
        data = png_bytes(size=(64, 64))
        load_rgb(data[: len(data) // 2], where="shard-0.tar:s1.qry")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageDecodeError, match="notes.png"):
        load_rgb(tmp_path / "notes.png")
    with pytest.raises(OSError):  # callers counting unreadable images as OSError keep working
        load_rgb(b"garbage")
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.png")


def transparent_images() -> dict[str, Image.Image]:
    """A red pixel, a fully transparent one and a half-transparent red one, in each transparent mode."""
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (0, 0, 0, 0), (255, 0, 0, 128)])
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 255), (0, 0)])  # black opaque, black transparent
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 0])  # index 0 red, index 1 black (transparent)
    palette.putdata([0, 1])
    palette.info["transparency"] = 1
    return {"RGBA": rgba, "LA": la, "P": palette}


def test_transparent_pixels_become_white_not_black():
    images = transparent_images()
    assert list(load_rgb(images["RGBA"]).getdata()) == [(255, 0, 0), (255, 255, 255), (255, 127, 127)]
    assert list(load_rgb(images["LA"]).getdata()) == [(0, 0, 0), (255, 255, 255)]
    assert list(load_rgb(images["P"]).getdata()) == [(255, 0, 0), (255, 255, 255)]
    for image in images.values():  # the same through encoded bytes (what shards and files hold)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        assert load_rgb(buffer.getvalue()).tobytes() == load_rgb(image).tobytes()


@pytest.mark.parametrize("size", [(300, 1), (1, 300), (900, 2)])
def test_extreme_aspect_ratios_are_padded_with_white_around_the_content(size):
    image = Image.effect_noise(size, 64).convert("RGB")
    fitted = fit_aspect_ratio(image, max_ratio=100)
    width, height = fitted.size
    assert max(width, height) / min(width, height) <= 100 and min(width, height) >= 2
    assert max(width, height) == max(size)  # padded, never resized
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    assert fitted.crop((left, top, left + size[0], top + size[1])).tobytes() == image.tobytes()
    white = Image.new("RGB", fitted.size, (255, 255, 255))
    white.paste(image, (left, top))
    assert fitted.tobytes() == white.tobytes()  # everything else is white


def test_images_within_bounds_are_left_as_they_are():
    image = Image.effect_noise((40, 30), 64).convert("RGB")
    assert fit_aspect_ratio(image, max_ratio=100) is image


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_files_keep_their_content(fmt):
    """A 16-bit ramp written by PIL (what a scanner or microscope saves) decodes to the same ramp in 8 bits,
    not to the near-white image that clipping at 255 gives."""
    import numpy as np

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format=fmt)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"  # the mode the fix is about
    rgb = np.asarray(load_rgb(buffer.getvalue()))
    assert rgb.shape == (32, 32, 3)
    assert (rgb[..., 0] == ramp >> 8).all() and (rgb[..., 0] == rgb[..., 2]).all()
    big_endian = Image.frombytes("I;16B", (32, 32), ramp.astype(">u2").tobytes())
    assert (np.asarray(load_rgb(big_endian))[..., 0] == ramp >> 8).all()


def test_every_image_suffix_is_a_format_pil_opens_and_names_an_image(tmp_path):
    """`.tif` and the other raster formats PIL decodes are images wherever a name is judged (the embedder's
    sentence-transformers rule), and their bytes get their own extension in shards."""
    from mme5.data.schema import image_extension
    from mme5.embedder import names_an_image
    from mme5.images import IMAGE_SUFFIXES

    Image.init()
    openable = {suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN}
    assert IMAGE_SUFFIXES <= openable and {".tif", ".tiff", ".bmp", ".webp"} <= IMAGE_SUFFIXES
    Image.effect_noise((8, 8), 64).save(tmp_path / "scan.tif")
    assert names_an_image(str(tmp_path / "scan.tif"))
    assert image_extension((tmp_path / "scan.tif").read_bytes()) == "tif"
