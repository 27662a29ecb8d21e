"""The demo world's scenes: a few attributes with small vocabularies, and a fixed train/eval split.

A scene is `count` identical objects (shape, colour, size) grouped in one half of the picture (position) on
a plain background. Everything a text says about a scene is one of these six attributes, so two scenes that
differ in one attribute are a well-defined hard negative.

The split depends on the scene's parameters only (not on the seed), so no seed can leak an evaluation scene
into training:
- "new_background": scenes on a background never used in training (OOD);
- "new_pairs": shape-colour pairs never seen together in training (OOD);
- "eval": a stable hash-chosen fraction of the remaining scenes (IND);
- "train": the rest.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, fields, replace
from functools import cache

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUNDS = ("white", "grey", "black", "light_blue", "beige")
NEW_BACKGROUNDS = ("beige",)
# One unseen shape per colour: every shape and colour is still seen in training, only these pairs are not.
NEW_PAIRS = frozenset((SHAPES[i % len(SHAPES)], colour) for i, colour in enumerate(COLOURS))
EVAL_FRACTION = 0.2
SPLITS = ("train", "eval", "new_background", "new_pairs")


@dataclass(frozen=True, order=True)
class Scene:
    shape: str
    colour: str
    size: str
    count: int
    position: str
    background: str


ATTRIBUTES = tuple(f.name for f in fields(Scene))
VALUES = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "count": COUNTS,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` of a str is salted per run)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def split_of(scene: Scene) -> str:
    if scene.background in NEW_BACKGROUNDS:
        return "new_background"
    if (scene.shape, scene.colour) in NEW_PAIRS:
        return "new_pairs"
    return "eval" if stable_hash("split", scene) < EVAL_FRACTION * 2**64 else "train"


@cache
def scenes_in(split: str) -> tuple[Scene, ...]:
    """All scenes of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    every = (Scene(*values) for values in itertools.product(*(VALUES[a] for a in ATTRIBUTES)))
    return tuple(scene for scene in every if split_of(scene) == split)


def variants(scene: Scene, attribute: str, split: str | None = None) -> list[Scene]:
    """The scenes that differ from `scene` in `attribute` only (and lie in `split`, if given)."""
    others = [replace(scene, **{attribute: v}) for v in VALUES[attribute] if v != getattr(scene, attribute)]
    return [s for s in others if split is None or split_of(s) == split]


def differing_attributes(a: Scene, b: Scene) -> list[str]:
    return [name for name in ATTRIBUTES if getattr(a, name) != getattr(b, name)]
