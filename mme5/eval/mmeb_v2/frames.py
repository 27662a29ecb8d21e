"""Which frames of a pre-extracted video VLM2Vec feeds the model, as `src/utils/vision_utils/
vision_utils.py` orders and picks them (`load_frames` l. 232, `sample_frames` l. 254,
`process_video_frames` l. 273, at commit 6e1e1d4); which are fed is `mme5.video.frame_indices`
(re-exported here), shared with the backbones that keep them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from mme5.eval.images import ImageRef, MissingImageError
from mme5.video import frame_indices

__all__ = ["FRAME_EXTENSIONS", "frame_indices", "frame_order", "frame_refs", "natural_key"]

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
