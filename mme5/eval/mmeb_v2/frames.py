"""Which frames of a pre-extracted video VLM2Vec feeds the model, as `src/utils/vision_utils/
vision_utils.py` picks them (`load_frames` l. 232, `sample_frames` l. 254, `process_video_frames` l. 273,
at commit 6e1e1d4).

The reference does NOT pad: `process_video_frames` samples only when `num_frames <= n` and otherwise
returns all n frames; the last-frame padding inside `sample_frames` is unreachable from it (the issue's
"padded with the last frame" describes that dead branch; the code wins).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mme5.eval.images import ImageRef, MissingImageError

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the reference's IMAGE_EXTENSIONS, compared lower-case


def natural_key(name: str) -> list[int | str]:
    """Sort key comparing digit runs as numbers and the rest case-folded, so frame_2 comes before frame_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_order(names: Iterable[str]) -> list[str]:
    """The image files of a frames folder in the reference's order (natural sort, `natural_key`)."""
    return sorted((n for n in names if n.lower().endswith(FRAME_EXTENSIONS)), key=natural_key)


def frame_refs(folder: Path) -> tuple[ImageRef, ...]:
    """Every frame of a frames folder in `frame_order`, each with its file identity (size, modification
    time: part of the embedding cache key, as an image's). A missing folder or one without frames is an
    error: the reference would extract frames from the video there; here they must be fetched."""
    try:
        entries = {entry.name: entry for entry in os.scandir(folder) if entry.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        raise MissingImageError(f"frames folder {str(folder)!r} not found") from None
    names = frame_order(entries)
    if not names:
        raise MissingImageError(f"frames folder {str(folder)!r} holds no frame "
                                f"({'/'.join(FRAME_EXTENSIONS)})")
    folder, refs = Path(folder).resolve(), []
    for name in names:
        stat = entries[name].stat()
        refs.append(ImageRef(None, str(folder / name), f"stat:{stat.st_size}:{stat.st_mtime_ns}"))
    return tuple(refs)


def frame_indices(n: int, num_frames: int | None) -> list[int]:
    """Positions (in `frame_order`) of the frames fed for a video of n frames: `num_frames` evenly spaced
    by `np.linspace(0, n - 1, num_frames, dtype=int)` (rounded toward zero), all n when num_frames is
    None or exceeds n, none when it is 0."""
    if num_frames == 0:
        return []
    if num_frames is None or num_frames > n:
        return list(range(n))
    return np.linspace(0, n - 1, num_frames, dtype=int).tolist()
