"""Which frames of a pre-extracted video VLM2Vec feeds the model, as `src/utils/vision_utils/
vision_utils.py` picks them (`load_frames` l. 232, `sample_frames` l. 254, `process_video_frames` l. 273,
at commit 6e1e1d4).

The reference does NOT pad: `process_video_frames` samples only when `num_frames <= n` and otherwise
returns all n frames; the last-frame padding inside `sample_frames` is unreachable from it (the issue's
"padded with the last frame" describes that dead branch; the code wins).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the reference's IMAGE_EXTENSIONS, compared lower-case


def frame_order(names: Iterable[str]) -> list[str]:
    """The image files of a frames folder in the reference's order: natural sort (digit runs compared as
    numbers, the rest case-folded), so frame_2 comes before frame_10."""
    def key(name: str) -> list[int | str]:
        return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]

    return sorted((n for n in names if n.lower().endswith(FRAME_EXTENSIONS)), key=key)


def frame_indices(n: int, num_frames: int | None) -> list[int]:
    """Positions (in `frame_order`) of the frames fed for a video of n frames: `num_frames` evenly spaced
    by `np.linspace(0, n - 1, num_frames, dtype=int)` (rounded toward zero), all n when num_frames is
    None or exceeds n, none when it is 0."""
    if num_frames == 0:
        return []
    if num_frames is None or num_frames > n:
        return list(range(n))
    return np.linspace(0, n - 1, num_frames, dtype=int).tolist()
