"""Drawing scenes with PIL: big shapes in strong colours, so a ~1M-parameter model can see them at 64 px.

Images are drawn at twice the size and box-downsampled (cheap anti-aliasing), then PNG-encoded: PNG is
lossless and PIL writes no timestamp, so the same scene and layout seed give byte-identical files.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, replace
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from mme5.demo.scenes import ATTRIBUTES, Scene, stable_hash

RGB = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "purple": (140, 50, 190),
    "pink": (255, 120, 190),
    "brown": (125, 75, 25),
    "white": (255, 255, 255),
    "grey": (140, 140, 140),
    "black": (0, 0, 0),
    "light_blue": (165, 210, 245),
    "beige": (225, 205, 160),
}
RADIUS = {"small": 0.1, "large": 0.16}  # object radius as a fraction of the image side
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SUPERSAMPLE = 2


def _star(points: int, inner: float) -> tuple[tuple[float, float], ...]:
    return tuple(
        ((1 if k % 2 == 0 else inner) * math.cos(math.pi * (k / points - 0.5)),
         (1 if k % 2 == 0 else inner) * math.sin(math.pi * (k / points - 0.5)))
        for k in range(2 * points)
    )


_W = 0.33  # half-width of a cross's arms
UNIT_SHAPES = {  # outlines in a unit circle, y pointing down
    "circle": tuple((math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)),
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)),
    "diamond": ((0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)),
    "star": _star(5, 0.45),
    "cross": ((-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1), (-_W, _W),
              (-1, _W), (-1, -_W), (-_W, -_W)),
}


def half_box(position: str, side: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the half of a `side`-wide square picture named by `position`."""
    h = side / 2
    return {"left": (0, 0, h, side), "right": (h, 0, side, side), "top": (0, 0, side, h),
            "bottom": (0, h, side, side)}[position]


def _draw_group(draw: ImageDraw.ImageDraw, scene: Scene, rng: random.Random, side: float,
                shift: tuple[float, float] = (0.0, 0.0)) -> None:
    """Lay `count` objects out along the long axis of their half, each jittered inside its own cell, the
    whole group moved by `shift` (a clip's frame)."""
    x0, y0, x1, y1 = half_box(scene.position, side)
    x0, x1, y0, y1 = x0 + shift[0], x1 + shift[0], y0 + shift[1], y1 + shift[1]
    radius = RADIUS[scene.size] * side
    vertical = (y1 - y0) > (x1 - x0)
    cell = ((y1 - y0) if vertical else (x1 - x0)) / scene.count
    across = (x1 - x0) if vertical else (y1 - y0)
    for k in range(scene.count):
        along = (k + 0.5) * cell + rng.uniform(-1, 1) * max(0.0, cell / 2 - radius)
        cross = across / 2 + rng.uniform(-1, 1) * max(0.0, across / 2 - radius)
        cx, cy = (x0 + cross, y0 + along) if vertical else (x0 + along, y0 + cross)
        draw.polygon([(cx + radius * u, cy + radius * v) for u, v in UNIT_SHAPES[scene.shape]],
                     fill=RGB[scene.colour])


def render(scene: Scene, seed: int, size: int, distractor: Scene | None = None, travelled: float = 1.0
           ) -> Image.Image:
    """The scene's picture; a distractor group (grounding) is drawn in the opposite half.

    The scene's group uses its own random stream, so the distractor never moves it: cropping the scene's half
    out of the composite equals cropping it out of the scene drawn alone. `travelled` < 1 draws the group on
    its way from the opposite half (0) to its own (1): a frame of the scene's clip.
    """
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), RGB[scene.background])
    draw = ImageDraw.Draw(image)
    ox0, oy0, _, _ = half_box(OPPOSITE[scene.position], side)
    x0, y0, _, _ = half_box(scene.position, side)
    shift = ((1 - travelled) * (ox0 - x0), (1 - travelled) * (oy0 - y0))
    _draw_group(draw, scene, random.Random(seed), side, shift)
    if distractor is not None:
        opposite = replace(distractor, position=OPPOSITE[scene.position])
        _draw_group(draw, opposite, random.Random(seed + 1), side)
    return image.resize((size, size), Image.Resampling.BOX)


def crop(scene: Scene, seed: int, size: int) -> Image.Image:
    """The scene's half, padded with its background to a full-size square (shapes keep their aspect)."""
    box = tuple(round(v) for v in half_box(scene.position, size))
    part = render(scene, seed, size).crop(box)
    square = Image.new("RGB", (size, size), RGB[scene.background])
    square.paste(part, ((size - part.width) // 2, (size - part.height) // 2))
    return square


def clip(scene: Scene, seed: int, size: int, frames: int) -> list[Image.Image]:
    """The scene's clip: its group travels from the opposite half into its own (the motion's direction is
    the scene's `position`: "top" moves up); the same layout in every frame, the last the still picture."""
    return [render(scene, seed, size, travelled=k / (frames - 1)) for k in range(frames)]


def page(scene: Scene, seed: int, size: int) -> Image.Image:
    """A document page about the scene: a title and one line per attribute (English, like most visual
    documents), above a figure of the scene filling the lower part."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(6, size // 14))
    lines = ["Scene report", *(f"{name}: {getattr(scene, name)}" for name in ATTRIBUTES)]
    step = size * 0.45 / len(lines)
    for k, line in enumerate(lines):
        draw.text((size * 0.05, size * 0.02 + k * step), line, fill=(0, 0, 0), font=font)
    figure = round(size * 0.5)
    image.paste(render(scene, seed, figure), ((size - figure) // 2, size - figure - size // 32))
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@lru_cache(maxsize=8192)
def _png(scene: Scene, seed: int, size: int, distractor: Scene | None, cropped: bool) -> bytes:
    return encode_png(crop(scene, seed, size) if cropped else render(scene, seed, size, distractor))


@lru_cache(maxsize=2048)
def _clip_pngs(scene: Scene, seed: int, size: int, frames: int) -> tuple[bytes, ...]:
    return tuple(encode_png(frame) for frame in clip(scene, seed, size, frames))


@lru_cache(maxsize=2048)
def _page_png(scene: Scene, seed: int, size: int) -> bytes:
    return encode_png(page(scene, seed, size))


@dataclass(frozen=True)
class Painter:
    """Encoded images of scenes, with a layout (object jitter) chosen reproducibly from a salt.

    Training uses one painter per sample with `per_scene=False`: the positive and its hard negatives share a
    layout, so they differ only in the attribute that was changed. Evaluation uses `per_scene=True`: each
    scene has one fixed picture per role, so a candidate image is the same file for every query.
    """

    size: int
    salt: str
    per_scene: bool = False

    def seed(self, scene: Scene, role: int) -> int:
        return stable_hash(self.salt, role, scene if self.per_scene else None) % 2**31

    def image(self, scene: Scene, role: int = 0, distractor: Scene | None = None) -> bytes:
        return _png(scene, self.seed(scene, role), self.size, distractor, False)

    def crop(self, scene: Scene, role: int = 0) -> bytes:
        return _png(scene, self.seed(scene, role), self.size, None, True)

    def clip(self, scene: Scene, frames: int, role: int = 0) -> list[bytes]:
        """The scene's clip (`clip`), each frame PNG-encoded."""
        return list(_clip_pngs(scene, self.seed(scene, role), self.size, frames))

    def page(self, scene: Scene, size: int, role: int = 0) -> bytes:
        """A `size`-pixel document page about the scene (`page`)."""
        return _page_png(scene, self.seed(scene, role), size)
