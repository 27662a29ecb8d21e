"""Which frames of a video the model sees: `num_frames` of them, evenly spaced, as VLM2Vec picks them
(`src/utils/vision_utils/vision_utils.py` `sample_frames` l. 254 and `process_video_frames` l. 273, at
commit 6e1e1d4).

The reference does NOT pad: `process_video_frames` samples only when `num_frames <= n` and otherwise
returns all n frames; the last-frame padding inside `sample_frames` is unreachable from it (the issue's
"padded with the last frame" describes that dead branch; the code wins).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

Frame = TypeVar("Frame")

DEFAULT_NUM_FRAMES = 8  # VLM2Vec-V2 evaluates every video set so (experiments/public/eval/video.yaml)


def frame_indices(n: int, num_frames: int | None) -> list[int]:
    """Positions of the frames fed for a video of n frames: `num_frames` evenly spaced by
    `np.linspace(0, n - 1, num_frames, dtype=int)` (rounded toward zero), all n when num_frames is
    None or exceeds n, none when it is 0."""
    if num_frames == 0:
        return []
    if num_frames is None or num_frames > n:
        return list(range(n))
    return np.linspace(0, n - 1, num_frames, dtype=int).tolist()


def kept_frames(frames: Sequence[Frame], num_frames: int | None) -> tuple[Frame, ...]:
    """The frames `frame_indices` keeps, in order. Idempotent: the kept frames keep themselves, so a video
    thinned before decoding (`Encoder.embed`) is fed as it is."""
    return tuple(frames[i] for i in frame_indices(len(frames), num_frames))
