"""The demo world's multilingual text→image set in XTD10's original file layout.

Layout under the output folder:
    test_image_names.txt           one image file name a line
    test_1kcaptions_<lang>.txt     line i describes image i (de, fr and jp flat beside the XTD10 languages)
    images/<name>                  the images: an XTD reader looks for `test_image_names.txt` entries in an
                                   image root, which for this set is the `images/` folder beside the files
Like the real files, the XTD10 caption files other than English end without a trailing newline. Every image
is a distinct evaluation scene, and a caption names all six attributes, so each caption has exactly one
matching image.
"""

from __future__ import annotations

import random
from pathlib import Path

from mme5.demo import language as lang
from mme5.demo.render import Painter
from mme5.demo.scenes import Scene, scenes_in

IMAGE_NAMES = "test_image_names.txt"
IMAGE_FOLDER = "images"
NO_TRAILING_NEWLINE = frozenset(lang.XTD10) - {"en"}


def caption_file(language: str) -> str:
    return f"test_1kcaptions_{language}.txt"


def build_xtd(seed: int, num_images: int, image_size: int = 64) -> list[tuple[str, Scene, bytes]]:
    """(file name, scene, PNG bytes) for distinct IND evaluation scenes."""
    scenes = scenes_in("eval")
    if num_images > len(scenes):
        raise ValueError(f"{num_images} XTD images asked, but only {len(scenes)} evaluation scenes exist")
    painter = Painter(image_size, f"{seed}/xtd", per_scene=True)
    chosen = random.Random(f"{seed}/xtd").sample(scenes, num_images)
    return [(f"demo_{i:06d}.png", scene, painter.image(scene)) for i, scene in enumerate(chosen)]


def write_xtd(root: Path, images: list[tuple[str, Scene, bytes]], languages: list[str]
              ) -> dict[str, list[str]]:
    """Write the files; returns the captions per language."""
    (root / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    for name, _, data in images:
        (root / IMAGE_FOLDER / name).write_bytes(data)
    names = "".join(f"{name}\n" for name, _, _ in images)
    (root / IMAGE_NAMES).write_text(names, encoding="utf-8", newline="\n")
    captions = {code: [lang.caption(scene, code) for _, scene, _ in images] for code in languages}
    for code, lines in captions.items():
        end = "" if code in NO_TRAILING_NEWLINE else "\n"
        (root / caption_file(code)).write_text("\n".join(lines) + end, encoding="utf-8", newline="\n")
    return captions
