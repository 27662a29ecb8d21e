"""Which frames of a pre-extracted video VLM2Vec feeds the model, as `src/utils/vision_utils/
vision_utils.py` orders them (`load_frames` l. 232, at commit 6e1e1d4); which of them are fed is
`mme5.video.frame_indices` (re-exported here), shared with the backbones that keep them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mme5.video import frame_indices

__all__ = ["FRAME_EXTENSIONS", "frame_indices", "frame_order"]

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the reference's IMAGE_EXTENSIONS, compared lower-case


def frame_order(names: Iterable[str]) -> list[str]:
    """The image files of a frames folder in the reference's order: natural sort (digit runs compared as
    numbers, the rest case-folded), so frame_2 comes before frame_10."""
    def key(name: str) -> list[int | str]:
        return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]

    return sorted((n for n in names if n.lower().endswith(FRAME_EXTENSIONS)), key=key)
