"""The one image decoder: bytes, paths and PIL images in, fully decoded RGB out, broken files named."""

import io

import pytest
from PIL import Image

from mme5.images import ImageDecodeError, load_rgb


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
