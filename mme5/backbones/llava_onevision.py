"""LLaVA-OneVision: SigLIP encodes the image whole and as the tiles of an anyres grid; the projected features
enter Qwen2 as `<image>` tokens (each grid row ended by the learned `image_newline` vector).

The grid decides the token count: an image takes the grid resolution that fits it best (the released models'
grid: 1x1 to 6x6 tiles of 384 px, each tile 729 tokens, at most ~9 tiles' worth after `anyres_max_9`
downsampling). `InputFormat.max_grid_side` narrows it, e.g. to LLaVE's (1x1)..(2x2).

A video is its frames, each resized whole to the tile size (no grid), encoded by SigLIP, projected, pooled
2x2 bilinearly (27x27 -> 14x14 features a frame for the released models); the `<video>` token becomes the
frames' features one after the other, then one `image_newline` (transformers 5.24 `get_video_features`,
`LlavaOnevisionProcessor.replace_video_token`). Transformers' video processor imports torchvision, which
cannot be installed beside this torch: `FramesVideoProcessor` below does its arithmetic on PIL frames.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from transformers import BatchFeature, LlavaOnevisionProcessor
from transformers.image_utils import PILImageResampling
from transformers.video_processing_utils import VideoProcessorMixin

from mme5.backbones.llava import LlavaAdapter


class FramesVideoProcessor(VideoProcessorMixin):
    """`LlavaOnevisionVideoProcessor` over lists of PIL frames, with the image processor's settings (size,
    rescale factor, mean, std: what transformers' `AutoVideoProcessor` reads from a checkpoint without a video
    processor file of its own).

    The stock processor's arithmetic on CPU, without torchvision: the frames as one uint8 (F, C, H, W)
    tensor, resized to `size` by torch's uint8 antialiased bicubic kernel (what torchvision's `resize` runs on
    a CPU uint8 image: transforms/v2/functional/_geometry.py `resize_image`; an image already that size is
    left alone), then `(x - 255 mean) / (255 std)` in float32 (transformers' fused rescale and normalisation).
    The image path resizes with PIL (the image processor's PIL backend): the same frame as an image differs
    by some grey levels (docs/backbones.md).

    `pixel_values_videos` is the stock (videos, frames, C, H, W); videos with fewer frames than the batch's
    longest are padded with zero frames, and `video_num_frames` (videos,) says how many are real (the stock
    processor cannot batch such videos at all).
    """

    model_input_names = ["pixel_values_videos", "video_num_frames"]

    def __init__(self, images: Any):
        super().__init__()
        self.images = images

    def preprocess(self, videos: Sequence[Sequence[PIL.Image.Image]], return_tensors: Any = None,
                   **_: Any) -> BatchFeature:
        """Pixels (zero-padded to the longest video) and frame counts of `videos`."""
        tensors = [self._video(frames) for frames in videos]
        longest = max(len(video) for video in tensors)
        padded = torch.stack([torch.cat([video, video.new_zeros(longest - len(video), *video.shape[1:])])
                              for video in tensors])
        counts = torch.tensor([len(video) for video in tensors])
        return BatchFeature({"pixel_values_videos": padded, "video_num_frames": counts},
                            tensor_type=return_tensors)

    def _video(self, frames: Sequence[PIL.Image.Image]) -> Tensor:
        """(F, C, H, W) float32 pixels of one video, as the stock processor computes them on CPU."""
        images = self.images
        if images.resample != PILImageResampling.BICUBIC:
            raise ValueError("the LLaVA-OneVision video processor reproduces the stock bicubic resize only; "
                             f"the image processor's resample is {PILImageResampling(images.resample).name}")
        if not frames:
            raise ValueError("a video needs at least one frame, got none")
        video = torch.from_numpy(np.stack([np.asarray(frame.convert("RGB")) for frame in frames]))
        video = video.permute(0, 3, 1, 2).contiguous()
        size = [images.size.height, images.size.width]
        if list(video.shape[-2:]) != size:
            video = torch.nn.functional.interpolate(video, size=size, mode="bicubic", align_corners=False,
                                                    antialias=True)
        mean = torch.tensor(images.image_mean) * (1.0 / images.rescale_factor)
        std = torch.tensor(images.image_std) * (1.0 / images.rescale_factor)
        return (video.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


class LlavaOnevisionFramesProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` with `FramesVideoProcessor` in place of its video processor (which needs
    torchvision).

    Its settings are spelled out in the signature because transformers saves only what the signature names
    (`ProcessorMixin.to_dict`), and the image token count depends on them. A checkpoint's processor must be
    reloaded with this class (`AutoProcessor` silently returns only the tokenizer).
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                         chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)
        self.video_processor = FramesVideoProcessor(image_processor)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        """The stock expansion, of the video's real frames only (not the batch's zero padding)."""
        count = int(video_inputs["video_num_frames"][video_idx])
        frames = video_inputs["pixel_values_videos"][video_idx][:count]
        return super().replace_video_token({"pixel_values_videos": [frames]}, 0, **kwargs)


def grid_within(pinpoints: Sequence[Sequence[int]], tile: int, side: int) -> list[list[int]]:
    """The grid resolutions (height, width) of at most `side` tiles of `tile` pixels a side."""
    kept = [list(point) for point in pinpoints if max(point) <= side * tile]
    if not kept:
        raise ValueError(f"max_grid_side={side} keeps none of the anyres grid {pinpoints} "
                         f"(tiles of {tile} px)")
    return kept


class LlavaOnevisionAdapter(LlavaAdapter):
    """The llava family's rule (LLaVE's and VLM2Vec's): `<image>` replaces the placeholder, the text is kept
    verbatim; Qwen2's tokenizer adds no bos. The processor expands `<image>` to the image's feature count and
    sends `image_sizes` and `batch_num_images` with the pixels (all part of each chunk); a video's `<video>`
    (the published video placeholder's replacement) likewise, its pixels sent with `video_num_frames`."""

    family: ClassVar[str] = "llava_onevision"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    reads_video: ClassVar[bool] = True  # `<video>` (the processor's video token)
    processor_class: ClassVar[type] = LlavaOnevisionFramesProcessor
    anyres_grid: ClassVar[bool] = True

    def configure_processor(self) -> None:
        """Narrow the anyres grid to `max_grid_side` tiles a side, in the processor (which counts the image
        tokens) and in the model (which lays out the features): both must pick the same resolution.

        Narrowing only: an adapter made on the processor or model of another sees the grid that one left.
        """
        side = self.input_format.max_grid_side
        if side is None:
            return
        images = self.processor.image_processor
        images.image_grid_pinpoints = grid_within(images.image_grid_pinpoints, images.size["height"], side)
        if self.model is not None:
            config = self.model.config
            config.image_grid_pinpoints = grid_within(config.image_grid_pinpoints,
                                                      config.vision_config.image_size, side)

    def last_hidden_state(self, model: Any, batch: BatchFeature | dict[str, Tensor]) -> Tensor:
        """As the base; a batch with videos has its video features made here (`video_features`), the images'
        by the model's own `get_image_features`, and both handed to the model's forward."""
        batch = dict(batch)
        counts = batch.pop("video_num_frames", None)
        if counts is None:
            return super().last_hidden_state(model, batch)
        inner = self.inner_model(model)
        batch = self._to_model(inner, batch)
        encoded = {"video": video_features(inner, batch.pop("pixel_values_videos"), counts.tolist())}
        if (pixels := batch.pop("pixel_values", None)) is not None:
            encoded["image"] = inner.get_image_features(pixels, batch.pop("image_sizes"),
                                                        batch_num_images=batch.pop("batch_num_images", None),
                                                        return_dict=True)
        return inner(**batch, mm_encoder_outputs=encoded, use_cache=False).last_hidden_state


def video_features(inner: Any, pixels: Tensor, counts: Sequence[int]) -> Any:
    """The model's `get_video_features` output for videos of different lengths: (1, tokens, D) pooler output,
    each video's frame features followed by one `image_newline`, as the stock model lays out a batch of
    equal-length videos.

    The real frames of every video go through the vision tower in one call (the stock code on one "video" of
    all of them); its single trailing newline is then repeated after each video. One call a chunk, whatever
    the frame counts: ranks under FSDP run the tower equally often.
    """
    frames = torch.cat([video[:n] for video, n in zip(pixels, counts, strict=True)])
    out = inner.get_video_features(frames[None], return_dict=True)
    features, newline = out.pooler_output[0, :-1], out.pooler_output[0, -1:]
    per_frame = features.view(len(frames), -1, features.shape[-1])
    videos = per_frame.split(list(counts))
    out.pooler_output = torch.cat([part for video in videos for part in (video.flatten(0, 1), newline)])[None]
    return out
