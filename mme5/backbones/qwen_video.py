"""Qwen-VL video input without torchvision: the frames of a video as the stock video processor lays them
out (`pixel_values_videos`, `video_grid_thw`), each frame resized and normalised by the image processor.

transformers' `Qwen2VLVideoProcessor` (which Qwen2.5-VL, Qwen3-VL and Qwen3.5 checkpoints also name, or
subclass) imports torchvision, which cannot be installed beside this torch. It is replaced here by what
VLM2Vec-V2 runs: its Qwen2-VL processor sends the frames of a video through the *image* processor
(TIGER-AI-Lab/VLM2Vec src/model/vlm_backbone/qwen2_vl/image_processing_qwen2_vl.py `_preprocess`, l. 299-351
at commit 6e1e1d4): every frame resized by `smart_resize` of the first frame's size with the image
processor's filter and pixel bounds, rescaled, normalised, the frame count padded with the last frame to a
multiple of `temporal_patch_size`, then cut into patches of `temporal_patch_size` frames; the layout is
transformers 5.24's `Qwen2VLVideoProcessor.patchify`. Pixel bounds per frame are the processor's
`video_size` (None: the image bounds, VLM2Vec-V2's choice).

Pre-extracted frames carry no frame rate. The metadata says `VIDEO_FPS` frames per second over the kept
frames (transformers' own default when a rate is unknown), which Qwen2.5-VL turns into
`second_per_grid_ts` and Qwen3-VL into the "<t seconds>" stamps it writes before each temporal patch.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from transformers import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

VIDEO_FPS = 24.0  # transformers' `VideoMetadata.sampled_fps` and Qwen3-VL's fallback for an unknown rate


def patchify_frames(frames: np.ndarray, temporal_patch_size: int) -> tuple[np.ndarray, int]:
    """(T * N, C * tps * ps * ps) video patches and grid_t from frames already patched one by one,
    `frames` (T, N, C * ps * ps) as the image processor gives them with `temporal_patch_size=1` (its N
    patches in merge order). Frames are padded with the last to a multiple of tps."""
    if pad := -len(frames) % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    grid_t, n, flat = len(frames) // temporal_patch_size, frames.shape[1], frames.shape[2]
    channels = 3
    patches = frames.reshape(grid_t, temporal_patch_size, n, channels, flat // channels)
    patches = patches.transpose(0, 2, 3, 1, 4)  # (grid_t, N, C, tps, ps * ps): the stock layout
    return patches.reshape(grid_t * n, channels * temporal_patch_size * (flat // channels)), grid_t


class FramesVideoProcessor(VideoProcessorMixin):
    """A Qwen-VL video processor over lists of PIL frames (see the module docstring), through the image
    processor `images`; `size` holds the per-frame pixel bounds ({"shortest_edge", "longest_edge"})."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, images: Any, size: dict[str, int]):
        super().__init__()
        self.images = images
        self.size = dict(size)

    @property
    def merge_size(self) -> int:
        return self.images.merge_size

    @property
    def temporal_patch_size(self) -> int:
        return self.images.temporal_patch_size

    def preprocess(self, videos: Sequence[Sequence[PIL.Image.Image]], return_metadata: bool = False,
                   return_tensors: Any = None, **_: Any) -> BatchFeature:
        """Patches and (t, h, w) grids of `videos`, each a sequence of same-size frames; with their
        metadata if `return_metadata` (Qwen2.5-VL and Qwen3-VL's processors ask for it)."""
        patches, grids = zip(*(self._one(frames) for frames in videos), strict=True)
        data = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.array(grids)}
        if return_metadata:
            data["video_metadata"] = [VideoMetadata(total_num_frames=len(f), fps=VIDEO_FPS,
                                                    frames_indices=list(range(len(f)))) for f in videos]
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def _one(self, frames: Sequence[PIL.Image.Image]) -> tuple[np.ndarray, list[int]]:
        if not frames:
            raise ValueError("a video needs at least one frame, got none")
        sizes = {frame.size for frame in frames}
        if len(sizes) > 1:
            raise ValueError(f"the frames of a video must share one size (the reference resizes them all to "
                             f"the first frame's target); found {sorted(sizes)}")
        out = self.images(list(frames), size=self.size, temporal_patch_size=1, return_tensors="np")
        grid_h, grid_w = out["image_grid_thw"][0, 1:].tolist()
        per_frame = out["pixel_values"].reshape(len(frames), grid_h * grid_w, -1)
        patches, grid_t = patchify_frames(per_frame, self.temporal_patch_size)
        return patches, [grid_t, grid_h, grid_w]

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int,
                                 videos_kwargs: dict[str, Any] | None = None) -> int:
        """Patches of a video of `num_frames` frames of height x width (the processor's
        `_get_num_multimodal_tokens(video_sizes=...)` asks)."""
        size = (videos_kwargs or {}).get("size") or self.size
        patch = self.images.patch_size
        resized_h, resized_w = smart_resize(height, width, patch * self.merge_size,
                                            size["shortest_edge"], size["longest_edge"])
        grid_t = -(-num_frames // self.temporal_patch_size)
        return grid_t * (resized_h // patch) * (resized_w // patch)


class FramesProcessorMixin:
    """A Qwen-VL processor whose video processor is `FramesVideoProcessor` (put first in the bases of the
    processor class).

    The stock classes cannot be built without torchvision (their video processors need it), and
    `AutoProcessor` then silently returns only the tokenizer. The per-frame pixel bounds are saved with the
    processor as `video_size` (None: the image processor's bounds). A checkpoint's processor must be
    reloaded with the same class.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, video_size=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_processor = FramesVideoProcessor(image_processor, video_size or image_processor.size)

    @property
    def video_size(self) -> dict[str, int]:
        return self.video_processor.size

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "video_size": dict(self.video_processor.size)}
