"""Image preprocessing against each family's reference, pixel for pixel (issue 24 §1.2-1.4).

Each expected batch is built here from the reference's rule written out in PIL calls on the raw image, then
fed to the family's own image processor, which composites transparency onto white as the references'
processors do; the project, fed the image's PNG bytes, decodes (`mme5.images.load`, as training, evaluation
and `Encoder.embed` do) and collates it, and must give the same pixels.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mme5.backbones import IMAGE_INSTRUCTION, InputFormat, Item, load_processing
from mme5.encoder import decoded


def noise(seed, size, mode="RGB"):
    """Random pixels in `mode` ("RGBA" with partial alpha, "P" with a transparent palette entry)."""
    rng = np.random.default_rng(seed)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 16, (size[1], size[0]), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
        image.info["transparency"] = 3
        return image
    channels = len(mode)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


def reference_pixels(adapter, image):
    """The family's processor on `image` as the reference hands it over (raw mode, not yet RGB)."""
    images = [[image]] if adapter.images_per_row else [image]
    return adapter.processor.image_processor(images, return_tensors="pt")


def project_pixels(adapter, image):
    """The project's batch of `image` stored as PNG, decoded as `Encoder.embed` decodes it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return adapter.collate([decoded(Item(IMAGE_INSTRUCTION, image=buffer.getvalue()))])


def assert_same_pixels(adapter, image, reference_image, keys=("pixel_values",)):
    expected, got = reference_pixels(adapter, reference_image), project_pixels(adapter, image)
    for key in keys:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_mllama_stretches_a_1_pixel_high_image_to_2_as_mme5(tiny, mode):
    """mmE5 src/dataset.py l. 74-77: `image.resize((image.size[0], 2))` on the opened image (PIL's default
    filter: bicubic, nearest for palette images), not white padding."""
    adapter = load_processing(tiny("mllama"))
    image = noise(1, (40, 1), mode)
    assert_same_pixels(adapter, image, image.resize((40, 2)), ("pixel_values", "aspect_ratio_ids"))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("preset", [None, "vlm2vec_v2"])
def test_qwen2_vl_enlarges_an_image_with_a_side_under_28_px_to_56x56_as_vlm2vec_v2(tiny, family, preset):
    """VLM2Vec-V2 src/model/processor.py l. 329-331 (`Qwen2_VL_process_fn`, Qwen2-VL and Qwen2.5-VL alike):
    `if image.size[0] < 28 or image.size[1] < 28: image = image.resize((56, 56))`; the ids then hold one
    image token per merged patch of the 56x56 image."""
    adapter = load_processing(tiny(family), InputFormat(preset=preset))
    for image in (noise(2, (20, 40)), noise(3, (100, 27), "P")):
        reference = reference_pixels(adapter, image.resize((56, 56)))
        got = project_pixels(adapter, image)
        torch.testing.assert_close(got["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
        assert got["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()
        image_id = adapter.processor.image_token_id
        assert (got["input_ids"] == image_id).sum() == reference["image_grid_thw"].prod() // 4
    large = noise(4, (28, 60))
    assert_same_pixels(adapter, large, large, ("pixel_values", "image_grid_thw"))  # 28 px: left as it is


@pytest.mark.parametrize(("family", "preset"), [("qwen3_vl", None), ("qwen2_vl", "gme")])
def test_embedders_that_keep_small_images_leave_them_to_the_processor(tiny, family, preset):
    """Qwen3-VL-Embedding and GME (qwen_vl_utils' smart_resize) keep a small image's aspect ratio: the
    processor gets it as it is."""
    adapter = load_processing(tiny(family), InputFormat(preset=preset))
    image = noise(5, (20, 40))
    assert_same_pixels(adapter, image, image, ("pixel_values", "image_grid_thw"))


@pytest.mark.parametrize("mode", ["RGBA", "P", "RGB"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_fixed_image_size_resizes_the_raw_image_before_compositing_onto_white(tiny, family, mode):
    """mmE5 src/dataset.py l. 60-67 (LLaVA-NeXT, 512x512) and VLM2Vec v1 mmeb_dataset.py `process_image`
    (1344x1344): `image.resize(size)` on the opened image, PIL's default filter for its mode (bicubic on
    RGBA, nearest on palette images); the processor composites onto white afterwards. Small sizes here."""
    adapter = load_processing(tiny(family), InputFormat(image_size=(60, 44)))
    image = noise(6, (37, 53), mode)
    assert_same_pixels(adapter, image, image.resize((60, 44)))
