"""Video inputs on the model side: frame choice, the torchvision-free Qwen-VL and LLaVA-OneVision video
processors (against the image processor and brute forces of the stock layouts), the published video
placeholder, the refusal of families without video, and embedding / gradient-cache / lockstep equivalences
with video rows."""

import io
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_sample
from PIL import Image

from mme5 import published
from mme5.backbones import Item, load_backbone
from mme5.backbones.base import PADDING_IMAGE_ROW, PADDING_VIDEO_ROW, InputFormat
from mme5.backbones.qwen2_vl import Qwen2VLAdapter
from mme5.backbones.tiny import make_tiny
from mme5.data.collate import ContrastiveCollator, side_item
from mme5.data.schema import Modality, Side
from mme5.data.stream import StreamBatch
from mme5.encoder import Encoder, LoraSettings
from mme5.gradcache import GradCache
from mme5.losses import InfoNCE
from mme5.video import frame_indices, kept_frames

QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
VIDEO_FAMILIES = [*QWEN_FAMILIES, "llava_onevision"]


def random_frames(n, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3)
    return tuple(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n))


def png(image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def qwen2_vl(tiny):
    return load_backbone(tiny("qwen2_vl"))


@pytest.fixture(scope="module")
def onevision(tiny):
    return load_backbone(tiny("llava_onevision"))


@pytest.fixture(params=["qwen2_vl", "llava_onevision"])
def video_backbone(request, tiny):
    """A Qwen-VL family (video as flat patches) and LLaVA-OneVision (video as frames)."""
    return load_backbone(tiny(request.param))


# ----------------------------------------------------------------------------- settings and frame choice


def test_kept_frames_are_the_reference_indices_and_idempotent():
    frames = tuple(range(64))
    kept = kept_frames(frames, 8)
    assert list(kept) == frame_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert kept_frames(kept, 8) == kept  # thinned before decoding, fed as it is
    assert kept_frames(frames[:5], 8) == frames[:5]  # fewer than asked: all, no padding


@pytest.mark.parametrize("fields, message", [
    ({"num_frames": 0}, "num_frames must be at least 1"),
    ({"video_min_pixels": 0}, "video_min_pixels must be at least 1"),
    ({"video_min_pixels": 5000, "video_max_pixels": 4000}, "video_min_pixels=5000 is above"),
])
def test_input_format_refuses_bad_video_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        InputFormat(**fields)


def test_video_settings_are_recorded_and_read_back():
    """Checkpoints, exports and the card record `asdict(InputFormat)`: the video fields travel with it."""
    fmt = InputFormat(num_frames=16, video_min_pixels=1024, video_max_pixels=4096).completed("qwen2_vl")
    recorded = asdict(fmt)
    assert {k: recorded[k] for k in ("num_frames", "video_min_pixels", "video_max_pixels")} == {
        "num_frames": 16, "video_min_pixels": 1024, "video_max_pixels": 4096}
    assert InputFormat.of(recorded) == fmt
    assert InputFormat().completed("qwen2_vl").num_frames == 8  # VLM2Vec-V2's evaluation default, in exports
    assert InputFormat().num_frames is None  # so a recipe recorded before videos resumes unchanged


def test_item_holds_an_image_or_a_video():
    frame = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="an image or a video, not both"):
        Item(image=frame, video=(frame,))
    with pytest.raises(ValueError, match="at least one frame"):
        Item(video=())


# ----------------------------------------------------------------------------- the published format


def test_published_video_side_follows_the_image_rule():
    frames = random_frames(2)
    assert Item("Represent the video.", video=frames).published() == "<|video_1|>\nRepresent the video.\n"
    rendered = published.render("Find the clip:", "a dog", False, has_video=True)
    assert rendered == "<|video_1|>\nFind the clip: a dog\n"
    # the placeholder of the absent medium goes, the present one is added
    assert published.normalize("<|image_1|>\nQ\n", False, True) == "<|video_1|>\nQ\n"
    assert published.normalize("<|video_1|>\nQ\n", False, False) == "Q\n"
    # a converted V2 row's image placeholder stands for its video, where the row put it
    assert published.normalize("Understand the content of the provided video: <|image_1|>", False, True) == (
        "Understand the content of the provided video: <|video_1|>")
    assert published.strip_placeholders("<|video_1|> a clip") == "a clip"
    assert published.split("<|video_1|>\nFind the clip: a dog\n")[:2] == ("Find the clip:", "a dog")


def test_video_placeholder_becomes_the_family_video_token(qwen2_vl):
    item = Item("Represent the video.", "a <|video_pad|> b", video=random_frames(2))
    assert qwen2_vl.prompt(item) == "<|video_pad|>\nRepresent the video. a  b\n"  # a user's token dropped
    chat = Qwen2VLAdapter(None, qwen2_vl.processor,
                          InputFormat(image_token="<|vision_start|><|image_pad|><|vision_end|>"))
    assert chat.video_token == "<|vision_start|><|video_pad|><|vision_end|>"


def test_vlm2vec_v2_preset_writes_the_video_token_then_a_space(tiny):
    adapter = load_backbone(tiny("qwen2_vl"), input_format=InputFormat(preset="vlm2vec_v2"))
    item = Item("Understand the content of the provided video.", video=random_frames(2))
    # VLM2Vec src/model/processor.py `process_input_text`: video token + " " + instruction
    assert adapter.prompt(item) == "<|video_pad|> Understand the content of the provided video."


# ----------------------------------------------------------------------------- the video processor


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_video_of_one_repeated_frame_is_the_image(family):
    """The image path tiles one image over the temporal patch: a 2-frame video of it is the same patches."""
    _, processor = make_tiny(family)
    frame = random_frames(1, size=(50, 36))[0]
    size = {"shortest_edge": 8 * 8 * 4, "longest_edge": 64 * 64}
    processor.image_processor.size = size
    processor.video_processor.size = size
    image = processor.image_processor([frame], return_tensors="np")
    video = processor.video_processor([[frame, frame]], return_tensors="np")
    np.testing.assert_array_equal(video["pixel_values_videos"], image["pixel_values"])
    np.testing.assert_array_equal(video["video_grid_thw"], image["image_grid_thw"])


def brute_force_patches(frames, size, patch, merge, tps, mean, std):
    """The stock `Qwen2VLVideoProcessor` layout written out row by row: frames resized with PIL bicubic to
    `smart_resize`'s size, scaled to [0, 1], normalised, padded with the last frame to a multiple of tps;
    row (t, block row, block col, i, j) holds channels x frames-of-the-patch x patch x patch."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    height, width = smart_resize(frames[0].height, frames[0].width, patch * merge, size["shortest_edge"],
                                 size["longest_edge"])
    arrays = [(np.asarray(f.resize((width, height), Image.BICUBIC), np.float32) / 255 - mean) / std
              for f in frames]
    arrays += [arrays[-1]] * (-len(arrays) % tps)
    video = np.stack(arrays).transpose(0, 3, 1, 2)  # (T, C, H, W)
    rows = []
    for t in range(len(video) // tps):
        for bh in range(height // patch // merge):
            for bw in range(width // patch // merge):
                for i in range(merge):
                    for j in range(merge):
                        y, x = (bh * merge + i) * patch, (bw * merge + j) * patch
                        cube = video[t * tps:(t + 1) * tps, :, y:y + patch, x:x + patch]  # (tps, C, p, p)
                        rows.append(cube.transpose(1, 0, 2, 3).reshape(-1))
    return np.stack(rows), [len(video) // tps, height // patch, width // patch]


def test_video_patches_match_a_brute_force_of_the_stock_layout():
    _, processor = make_tiny("qwen2_vl")
    images = processor.image_processor
    frames = random_frames(3, size=(70, 45))
    size = {"shortest_edge": 16 * 16, "longest_edge": 48 * 48}
    processor.video_processor.size = size
    out = processor.video_processor([frames], return_tensors="np")
    mean, std = np.array(images.image_mean, np.float32), np.array(images.image_std, np.float32)
    expected, grid = brute_force_patches(frames, size, images.patch_size, images.merge_size,
                                         images.temporal_patch_size, mean, std)
    assert out["video_grid_thw"].tolist() == [grid]
    np.testing.assert_allclose(out["pixel_values_videos"], expected, atol=1e-6)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_video_token_count_equals_the_stock_count(tiny, family):
    adapter = load_backbone(tiny(family))
    frames = random_frames(5, size=(60, 44))
    batch = adapter.collate([Item("Represent the video.", video=frames)])
    video_id = adapter.processor.video_token_id
    stock = adapter.processor._get_num_multimodal_tokens(video_sizes=[(5, 44, 60)]).num_video_tokens
    assert int((batch["input_ids"] == video_id).sum()) == stock[0] == int(batch["video_grid_thw"].prod()) // 4
    assert int((batch["mm_token_type_ids"] == 2).sum()) == stock[0]  # video tokens typed as video (3-D rope)
    if family == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == [pytest.approx(2 / 24)]  # tps frames at 24 fps
    if family in ("qwen3_vl", "qwen3_5"):  # Qwen3-VL stamps every temporal patch with its time
        text = adapter.tokenizer.decode(batch["input_ids"][0])
        assert text.count("seconds>") == int(batch["video_grid_thw"][0, 0])


def test_processor_round_trips_the_video_bounds(tmp_path, tiny):
    adapter = load_backbone(tiny("qwen2_vl"), input_format=InputFormat(video_min_pixels=256,
                                                                         video_max_pixels=2304))
    assert adapter.processor.video_size == {"shortest_edge": 256, "longest_edge": 2304}
    adapter.processor.save_pretrained(tmp_path)
    again = type(adapter.processor).from_pretrained(tmp_path)
    assert again.video_size == adapter.processor.video_size
    frames = random_frames(3)
    np.testing.assert_array_equal(again.video_processor([frames])["pixel_values_videos"],
                                  adapter.processor.video_processor([frames])["pixel_values_videos"])


def test_video_bounds_default_to_the_image_bounds(tiny):
    adapter = load_backbone(tiny("qwen2_vl"), input_format=InputFormat(min_pixels=256, max_pixels=4096))
    assert adapter.processor.video_size == {"shortest_edge": 256, "longest_edge": 4096}


# ----------------------------------------------------------------------------- LLaVA-OneVision's video


def brute_force_frames(videos, size, mean, std):
    """The stock `LlavaOnevisionVideoProcessor` on CPU written out frame by frame: torch's uint8 antialiased
    bicubic resize to (height, width) (torchvision's kernel for a uint8 CPU image), scaled to [0, 1],
    normalised, channels first; (videos, frames, C, H, W), a shorter video padded with zero frames (the
    adapter's addition), and the real frame counts."""
    out = np.zeros((len(videos), max(map(len, videos)), 3, size["height"], size["width"]), np.float32)
    for v, frames in enumerate(videos):
        for f, frame in enumerate(frames):
            pixels = torch.from_numpy(np.asarray(frame)).permute(2, 0, 1)[None].contiguous()
            if frame.size != (size["width"], size["height"]):
                pixels = torch.nn.functional.interpolate(pixels, size=(size["height"], size["width"]),
                                                         mode="bicubic", align_corners=False, antialias=True)
            array = pixels[0].numpy().transpose(1, 2, 0).astype(np.float32) / 255
            out[v, f] = ((array - mean) / std).transpose(2, 0, 1)
    return out, [len(frames) for frames in videos]


def test_onevision_video_pixels_match_a_brute_force_of_the_stock_processor():
    _, processor = make_tiny("llava_onevision")
    images = processor.image_processor
    images.image_mean, images.image_std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]  # not the symmetric 0.5
    videos = [random_frames(3, size=(70, 45)), random_frames(1, size=(20, 50), seed=1),
              random_frames(2, size=(32, 32), seed=2)]
    out = processor.video_processor(videos, return_tensors="np")
    expected, counts = brute_force_frames(videos, {"height": 32, "width": 32}, np.array(images.image_mean),
                                          np.array(images.image_std))
    assert out["video_num_frames"].tolist() == counts
    np.testing.assert_allclose(out["pixel_values_videos"], expected, atol=1e-6)
    images.resample = Image.BILINEAR
    with pytest.raises(ValueError, match="bicubic resize only; the image processor's resample is BILINEAR"):
        processor.video_processor(videos)


# torchvision's two functions the stock video processor calls on CPU uint8 frames, as torchvision 0.2x defines
# them (transforms/v2/functional/_geometry.py `resize_image`: uint8 bicubic stays uint8 on CPU; _misc.py
# `normalize_image`), so that transformers' own `LlavaOnevisionVideoProcessor` runs here.
TORCHVISION_STUB = {
    "torchvision/__init__.py": "__version__ = '0.24.0'\nfrom torchvision import io, transforms\n",
    "torchvision/io.py": "",
    "torchvision/transforms/__init__.py": (
        "import enum\n\n\nclass InterpolationMode(enum.Enum):\n"
        + "".join(f"    {name} = {name.lower().replace('_', '-')!r}\n" for name in (
            "NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS"))),
    "torchvision/transforms/functional.py": "def pil_to_tensor(image):\n    raise NotImplementedError\n",
    "torchvision/transforms/v2/__init__.py": "",
    "torchvision/transforms/v2/functional.py": """
import torch
from torchvision.transforms import InterpolationMode


def resize(image, size, interpolation, antialias=True, **_):
    assert interpolation == InterpolationMode.BICUBIC and image.dtype == torch.uint8
    if list(image.shape[-2:]) == list(size):
        return image
    flat = image.reshape(-1, *image.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=list(size), mode="bicubic", align_corners=False,
                                          antialias=antialias)
    return out.reshape(*image.shape[:-2], *size)


def normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


def grayscale_to_rgb(image):
    return image
""",
}

STOCK_COMPARISON = """
import numpy as np, torch
from PIL import Image
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
from mme5.backbones.tiny import make_tiny

_, processor = make_tiny("llava_onevision")
images = processor.image_processor
images.image_mean, images.image_std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
stock = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}, image_mean=images.image_mean,
                                     image_std=images.image_std)
rng = np.random.default_rng(0)
videos = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]
          for n, (w, h) in [(3, (70, 45)), (1, (20, 50)), (2, (32, 32))]]
ours = processor.video_processor(videos, return_tensors="pt")
for i, video in enumerate(videos):
    expected = stock([video], return_tensors="pt")["pixel_values_videos"][0]
    assert torch.equal(ours["pixel_values_videos"][i, :len(video)], expected), i
    assert not ours["pixel_values_videos"][i, len(video):].any()
print("same")
"""


def test_onevision_video_pixels_equal_the_stock_processor_with_torchvision_stubbed(tmp_path):
    """Transformers' own video processor, its torchvision calls written from torchvision's definitions (in a
    subprocess: they must be importable before transformers is), gives exactly the stand-in's pixels."""
    for name, text in TORCHVISION_STUB.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", STOCK_COMPARISON], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "same", run.stderr[-3000:]


def test_onevision_video_tokens_follow_the_stock_expansion(onevision):
    """(32 / 8)^2 patches a frame, pooled 2x2 to 4, then one newline a video; padding frames count none."""
    items = [Item("Represent the video.", video=random_frames(5)),
             Item("Find the clip:", "a dog", video=random_frames(3, seed=1))]
    batch = onevision.collate(items)
    stock = onevision.processor._get_num_multimodal_tokens(video_sizes=[(5, 30, 40), (3, 30, 40)])
    counted = (batch["input_ids"] == onevision.processor.video_token_id).sum(1).tolist()
    assert counted == stock.num_video_tokens == [5 * 4 + 1, 3 * 4 + 1]


def test_onevision_videos_of_one_length_embed_as_the_stock_forward(onevision):
    """Such a batch is one the stock model takes as it is: the adapter's own path (one vision call over the
    frames of all videos, a newline after each) gives the stock hidden states."""
    items = [Item("Represent the video.", video=random_frames(3)), Item("Represent the image.",
                                                                       image=random_frames(1, (50, 36))[0]),
             Item("", "a clip", video=random_frames(3, size=(20, 40), seed=1))]
    batch = onevision.collate(items)
    inner = onevision.inner_model(onevision.model)
    with torch.no_grad():
        stock = inner(**{k: v for k, v in batch.items() if k != "video_num_frames"}, use_cache=False)
        got = onevision.last_hidden_state(onevision.model, batch)
    torch.testing.assert_close(got, stock.last_hidden_state, rtol=0, atol=1e-6)


def test_onevision_a_frame_is_the_images_whole_view_pooled(onevision):
    """LLaVA-OneVision does not make a video of one repeated frame its image: the image is its whole view plus
    anyres tiles, every row ended by a newline; a frame is the whole view alone, its features pooled 2x2, one
    newline after the video. What they share: a frame's pixels are the image's whole view (its first tile),
    and its features that view's, pooled (for a frame of the tile size: the two paths resize differently)."""
    frame = random_frames(1, size=(32, 32))[0]
    image = onevision.processor.image_processor([frame], return_tensors="pt")
    video = onevision.processor.video_processor([[frame]], return_tensors="pt")
    # equal up to float rounding: the image path rescales then normalises, the video path fuses the two
    pixels = video["pixel_values_videos"][0]
    torch.testing.assert_close(pixels, image["pixel_values"][0, :1], rtol=0, atol=1e-6)
    inner = onevision.inner_model(onevision.model)
    with torch.no_grad():
        view = inner.get_image_features(image["pixel_values"], image["image_sizes"]).pooler_output[0][:16]
        features = inner.get_video_features(pixels[None]).pooler_output[0]
    pooled = torch.nn.functional.interpolate(view.T.reshape(1, -1, 4, 4), size=(2, 2), mode="bilinear")
    torch.testing.assert_close(features[:4], pooled[0].flatten(1).T)
    torch.testing.assert_close(features[4], inner.image_newline)


def test_onevision_places_its_video_token_by_the_published_rule(tiny, onevision):
    item = Item("Represent the video.", "a <video> b", video=random_frames(2))
    assert onevision.prompt(item) == "<video>\nRepresent the video. a  b\n"  # a user's token dropped
    llave = load_backbone(tiny("llava_onevision"), input_format=InputFormat(preset="llave"))
    assert llave.prompt(Item("Represent the video.", video=random_frames(2))) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<video>\n"
        "Represent the video.\n<|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n")


def test_onevision_refuses_video_pixel_bounds(tiny):
    """Its frames are resized to the tile size: bounds would be silently ignored."""
    with pytest.raises(ValueError, match="llava_onevision family resizes every frame to its tile size"):
        load_backbone(tiny("llava_onevision"), input_format=InputFormat(video_max_pixels=4096))


def test_onevision_processor_reloads_with_its_video_processor(tmp_path, onevision):
    onevision.processor.save_pretrained(tmp_path)
    again = type(onevision.processor).from_pretrained(tmp_path)
    frames = random_frames(2)
    np.testing.assert_array_equal(again.video_processor([frames])["pixel_values_videos"],
                                  onevision.processor.video_processor([frames])["pixel_values_videos"])


# ----------------------------------------------------------------------------- refusal


def test_a_family_without_video_refuses_a_video_naming_those_with(tiny_mllama):
    adapter = load_backbone(tiny_mllama)
    with pytest.raises(ValueError, match="mllama family reads no video; families that do: llava_onevision, "
                                         "qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl"):
        adapter.collate([Item("Represent the video.", video=random_frames(2))])
    with pytest.raises(ValueError, match="reads no video"):
        load_backbone(tiny_mllama, input_format=InputFormat(video_max_pixels=4096))


# ----------------------------------------------------------------------------- embedding


def mixed_items(frames):
    return [Item("Represent the image.", image=frames[0]), Item("", "a short text"),
            Item("Represent the video.", video=frames),
            Item("Find the clip:", "a dog runs", video=frames[:3]),
            Item("Represent the video.", video=random_frames(4, size=(32, 48), seed=1))]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_video_embeds_the_same_alone_and_in_a_mixed_batch(tiny, family):
    encoder = Encoder(load_backbone(tiny(family))).eval()
    items = mixed_items(random_frames(5))
    together = encoder.embed(items, batch_size=len(items))
    alone = torch.cat([encoder.embed([item]) for item in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_embed_decodes_only_the_kept_frames(tiny, qwen2_vl):
    """Frames the adapter drops are never decoded: broken bytes there do no harm."""
    encoder = Encoder(qwen2_vl).eval()
    frames = random_frames(20)
    keep = set(frame_indices(20, 8))
    encoded = tuple(png(f) if i in keep else b"not an image" for i, f in enumerate(frames))
    from_bytes = encoder.embed([Item("Represent the video.", video=encoded)])
    decoded = encoder.embed([Item("Represent the video.", video=frames)])
    torch.testing.assert_close(from_bytes, decoded)
    other = Encoder(load_backbone(tiny("qwen2_vl"), input_format=InputFormat(num_frames=4))).eval()
    assert not torch.allclose(other.embed([Item("Represent the video.", video=frames)]), decoded)


def test_collate_decodes_only_the_kept_frames_of_a_training_side(qwen2_vl):
    """A shard's video side reaches the adapter as every frame's bytes (`side_item`): the adapter decodes the
    kept ones, as `Encoder.embed` does, and never the others."""
    frames = random_frames(20)
    keep = set(frame_indices(20, 8))
    side = Side("Represent the video.", video=[png(f) if i in keep else b"not an image"
                                               for i, f in enumerate(frames)])
    from_bytes = qwen2_vl.collate([side_item(side)])
    decoded = qwen2_vl.collate([Item("Represent the video.", video=frames)])
    assert from_bytes.keys() == decoded.keys()
    for key, value in decoded.items():
        torch.testing.assert_close(from_bytes[key], value, rtol=0, atol=0, msg=key)


def test_lockstep_chunks_with_videos_embed_like_plain_chunks(video_backbone):
    encoder = Encoder(video_backbone).eval()
    items = mixed_items(random_frames(5))
    text_only = video_backbone.chunks([Item("", "a text"), None], lockstep=True)[0]
    assert text_only.keep.tolist() == [True, False, False, False]  # a padding image and a padding video row
    assert "pixel_values" in text_only.inputs and "pixel_values_videos" in text_only.inputs
    with torch.no_grad():
        plain = encoder.encode_chunks(video_backbone.chunks(items, 2))
        lockstep = encoder.encode_chunks(video_backbone.chunks([*items, None], 2, lockstep=True))
    torch.testing.assert_close(lockstep, plain, atol=1e-5, rtol=1e-5)
    assert PADDING_VIDEO_ROW.medium == "video" and PADDING_IMAGE_ROW.medium == "image"


def test_gradient_cache_equals_full_batch_with_videos(video_backbone):
    encoder = Encoder(video_backbone, LoraSettings(dropout=0.0)).train()
    items = mixed_items(random_frames(5))
    queries, positives = items, items[::-1]
    groups = {"query": video_backbone.chunks(queries, 2), "positive": video_backbone.chunks(positives, 2)}
    loss = InfoNCE(temperature=0.05)

    def loss_fn(emb):
        return loss(emb["query"], emb["positive"])

    params = [p for p in encoder.parameters() if p.requires_grad]
    full = loss_fn({name: encoder.encode_chunks(c) for name, c in groups.items()}).loss
    full.backward()
    expected = [p.grad.clone() for p in params]
    encoder.zero_grad(set_to_none=True)
    cached, _ = GradCache(2).step(encoder.encode_chunk, groups, loss_fn)
    assert cached.item() == pytest.approx(full.item(), rel=1e-6)
    for got, want in zip((p.grad for p in params), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_embedder_reads_only_the_kept_frames_of_a_video_input(tiny, tmp_path):
    """A video input is its frames as files: the dropped ones are never opened (here they do not exist)."""
    from mme5.embedder import Embedder

    embedder = Embedder.from_pretrained(tiny("qwen2_vl"))
    frames = random_frames(12)
    kept = set(frame_indices(12, 8))
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"frame_{i}.png")
        if i in kept:
            frame.save(paths[-1])
    got = embedder.encode([{"text": "a clip", "video": paths}])
    expected = embedder.encoder.embed([Item("", "a clip", video=frames)])
    torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match=r"inputs\[0\]: 'video' is a list of frames"):
        embedder.encode([{"video": str(paths[0])}])
    with pytest.raises(ValueError, match="an 'image' or a 'video', not both"):
        embedder.encode([{"image": paths[0], "video": paths}])
    assert 2 not in kept
    with pytest.raises(FileNotFoundError, match=r"inputs\[0\] video frame 2: image file"):
        embedder.encode([{"video": paths[:3]}])  # 3 frames, all kept: frame 2 was never written


def test_training_lockstep_chunks_run_the_video_path_of_a_video_family(video_backbone):
    """Under FSDP every rank must run the vision tower as often: a rank whose chunk holds no video still
    runs the video path (a placeholder video row), as `Encoder.embed`'s chunks do."""
    batch = StreamBatch([make_sample(i, Modality.IT2T, negatives=1) for i in range(2)], 0, {})
    plain, lockstep = (ContrastiveCollator(video_backbone.collate, 1, chunk_size=2, lockstep=flag,
                                           video=video_backbone.reads_video)(batch) for flag in (False, True))
    assert all("pixel_values_videos" not in chunk.inputs for chunk in plain.query)
    for chunk in lockstep.query + lockstep.positive + lockstep.negatives:
        assert "pixel_values_videos" in chunk.inputs and "pixel_values" in chunk.inputs
        assert chunk.keep.tolist()[-1] is False

