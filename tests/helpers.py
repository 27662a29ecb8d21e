"""Small builders shared by tests: encoded images and schema samples made on the fly."""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from PIL import Image

from mme5.data.schema import Modality, Sample, Side, Task

# The demo's instructions (the Makefile's demo-export), as exports' query and document prompts.
QUERY, DOCUMENT = "Find me an everyday image that matches the given caption:", "Represent the given image."

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Each family's full-size recipe in configs/ (a registered family without one fails the tests that use it).
FAMILY_RECIPES = {
    "mllama": "mme5_llama32v_11b.yaml", "qwen2_vl": "qwen2vl_7b.yaml", "qwen2_5_vl": "qwen2_5_vl_7b.yaml",
    "qwen3_vl": "qwen3_vl_8b.yaml", "qwen3_5": "qwen3_5_9b.yaml", "llava": "llava_next_7b.yaml",
    "llava_onevision": "llava_onevision_7b.yaml", "gemma3": "gemma3_4b.yaml",
}


def recipe_lora_targets(family: str) -> str | list[str]:
    """`model.lora.target_modules` of the family's recipe: what its training adapts."""
    config = yaml.safe_load((CONFIGS / FAMILY_RECIPES[family]).read_text(encoding="utf-8"))
    return config["model"]["lora"]["target_modules"]


def image_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 16, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


def video_frames(index: int, length: int = 3) -> list[bytes]:
    """The encoded frames of a small video: `length` frames, JPEG and PNG mixed, each its own colour."""
    return [image_bytes((index * 7 % 256, 40 * frame % 256, 160), fmt="JPEG" if frame % 2 else "PNG")
            for frame in range(length)]


def make_sample(index: int, modality: Modality = Modality.IT2T, negatives: int = 2, **meta) -> Sample:
    """A valid sample with the sides its modality needs; colours vary with the index."""

    def side(kind: str, label: str) -> Side:
        image = image_bytes((index * 7 % 256, len(label) * 20 % 256, 90)) if "I" in kind else None
        video = video_frames(index, len(label)) if "V" in kind else None
        text = f"{label} {index}" if "T" in kind else None
        return Side(instruction=f"instruction for {label}", text=text, image=image, video=video)

    return Sample(
        id=meta.get("id", f"s{index:05d}"),
        task=meta.get("task", Task.RETRIEVAL),
        modality=modality,
        language=meta.get("language", "en"),
        source=meta.get("source", "unit"),
        query=side(modality.query, "query"),
        positive=side(modality.target, "positive"),
        negatives=[side(modality.target, f"negative{k}") for k in range(negatives)],
    )


def write_pngs(folder, colors, width: int = 20, step: int = 3) -> list:
    """One PNG a colour, `folder/<i>.png`, each a different width (different shapes batch together)."""
    from PIL import Image

    paths = []
    for i, color in enumerate(colors):
        paths.append(folder / f"{i}.png")
        Image.new("RGB", (width + step * i, 24), color).save(paths[-1])
    return paths
