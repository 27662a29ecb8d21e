"""Turning demo scenes into samples: one recipe per (task, modality), shared by training and evaluation.

A recipe builds an `Episode` from a query scene: the query side, the scene the positive shows, the
attributes a hard negative may change, and `target(scene)`, which draws a target side for any scene. The
positive is `target(episode.scene)`; a hard negative is `target(v)` for a scene `v` that differs from it in
exactly one of those attributes; an evaluation candidate list is `target` over other scenes. Instructions
are English and kept apart from the content (`Side.instruction`), in the style of MMEB and mmE5.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mme5.backbones.base import IMAGE_INSTRUCTION
from mme5.data.schema import Modality, Sample, Side, Task
from mme5.demo import language as lang
from mme5.demo.render import Painter
from mme5.demo.scenes import ATTRIBUTES, COLOURS, NEW_PAIRS, SHAPES, VALUES, Scene, scenes_in, variants

CLASSIFIED = ("shape", "colour", "count", "size")
CLASSIFY = {
    "shape": "Identify the shape of the objects in the image",
    "colour": "Identify the colour of the objects in the image",
    "count": "Count the objects in the image",
    "size": "Identify the size of the objects in the image",
}
CHOOSE_OPTION = "Choose the option that describes the objects in the image:"
QUESTION = "Represent the given image with the following question:"
DESCRIBE = "Find an image caption describing the given image."
FIND_IMAGE = "Find me an everyday image that matches the given caption:"
FIND_SIMILAR = "Find an image that looks similar to the given image."
FIND_TITLED = "Find me an image with a title that matches the given caption:"
EDIT_TO_CAPTION = "Given an image, find a caption describing it after the following change:"
EDIT_TO_IMAGE = "Given an image, find a similar image with the following change:"
EDIT_TO_TITLED = "Given an image, find a similar image with a title after the following change:"
GROUND = "Select the portion of the image that isolates the object labeled as"
IMAGE = IMAGE_INSTRUCTION
TITLED = "Represent the given image with the following title:"
CROP = "Represent the given cropped image of the object."
# Clips (VLM2Vec-V2's video instructions) and pages (its visual-document ones).
CLASSIFY_MOTION = "Recognize the direction the objects in the video move in."
DESCRIBE_VIDEO = "Describe the content of the video."
FIND_VIDEO = "Find a video that contains the following visual content:"
VIDEO = "Understand the content of the provided video."
TITLED_VIDEO = "Understand the content of the provided video with the following title:"
VIDEO_QUESTION = "Given a video and a question, select the most accurate answer."
FIND_PAGE = "Find a document image that matches the given query:"
PAGE = "Understand the content of the provided document image."
VIDEO_QUESTIONS = ("position", "shape", "colour", "count")  # what a clip question asks ("position": motion)
FEWER_NEGATIVES = 0.2  # share of training samples with fewer hard negatives than the maximum
ENGLISH_WEIGHT = 8  # English is drawn this many times as often as each other language (MMEB is English)


@dataclass
class Context:
    """What a recipe draws with: randomness, images, and the split its scenes must stay in."""

    rng: random.Random
    painter: Painter
    split: str
    frames: int = 4  # frames of a clip
    page_size: int = 128  # side of a document page


@dataclass(frozen=True)
class Episode:
    query: Side
    query_scene: Scene
    scene: Scene  # what the positive shows
    attributes: tuple[str, ...]  # what a hard negative may change
    target: Callable[[Scene], Side]


@dataclass(frozen=True)
class Recipe:
    task: Task
    modality: Modality
    attributes: tuple[str, ...]  # what a query can be about (the classified or asked attribute, the edit)
    build: Callable[[Context, Scene, str, str | None], Episode | None]  # (ctx, query scene, language, about)
    topic: str = ""  # tells apart recipes of one task and modality ("document": pages)

    @property
    def name(self) -> str:
        return "_".join(filter(None, (str(self.task), self.modality.value.lower(), self.topic)))


# ----------------------------------------------------------------------------- target sides
# Factories share the signature (ctx, language), so a recipe such as `_edit` can take any of them.


def _label(attribute: str, language: str) -> Callable[[Scene], Side]:
    return lambda s: Side(text=lang.label(attribute, getattr(s, attribute), language))


def _caption(ctx: Context, language: str) -> Callable[[Scene], Side]:
    return lambda s: Side(text=lang.caption(s, language))


def _image(ctx: Context, language: str, role: int = 0) -> Callable[[Scene], Side]:
    return lambda s: Side(IMAGE, image=ctx.painter.image(s, role))


def _titled(ctx: Context, language: str) -> Callable[[Scene], Side]:
    """An image with a short title (its shape): the text alone does not identify the scene."""
    return lambda s: Side(TITLED, text=lang.label("shape", s.shape, language), image=ctx.painter.image(s))


def _clip(ctx: Context, language: str) -> Callable[[Scene], Side]:
    return lambda s: Side(VIDEO, video=ctx.painter.clip(s, ctx.frames))


def _titled_clip(ctx: Context, language: str) -> Callable[[Scene], Side]:
    """A clip with a short title (its shape): the text alone does not identify the clip."""
    return lambda s: Side(TITLED_VIDEO, text=lang.label("shape", s.shape, language),
                          video=ctx.painter.clip(s, ctx.frames))


def _motion_caption(ctx: Context, language: str) -> Callable[[Scene], Side]:
    return lambda s: Side(text=lang.motion_caption(s, language))


def _answer(attribute: str, language: str) -> Callable[[Scene], Side]:
    """A clip question's answer: the direction for "position", else the attribute's label."""
    if attribute == "position":
        return lambda s: Side(text=lang.direction(s.position, language))
    return _label(attribute, language)


def _page(ctx: Context, language: str) -> Callable[[Scene], Side]:
    return lambda s: Side(PAGE, image=ctx.painter.page(s, ctx.page_size))


# ----------------------------------------------------------------------------- recipes


def _classify(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(CLASSIFY[attribute], image=ctx.painter.image(scene))
    return Episode(query, scene, scene, (attribute,), _label(attribute, language))


def _classify_options(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(CHOOSE_OPTION, text=lang.options(attribute, language), image=ctx.painter.image(scene))
    return Episode(query, scene, scene, (attribute,), _label(attribute, language))


def _vqa(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(QUESTION, text=lang.question(attribute, language), image=ctx.painter.image(scene))
    return Episode(query, scene, scene, (attribute,), _label(attribute, language))


def _describe(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(DESCRIBE, image=ctx.painter.image(scene))
    return Episode(query, scene, scene, ATTRIBUTES, _caption(ctx, language))


def _find_image(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(FIND_IMAGE, text=lang.caption(scene, language))
    return Episode(query, scene, scene, ATTRIBUTES, _image(ctx, language))


def _find_similar(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    """The same scene drawn with another layout: only the attributes, not the pixels, match."""
    query = Side(FIND_SIMILAR, image=ctx.painter.image(scene, role=0))
    return Episode(query, scene, scene, ATTRIBUTES, _image(ctx, language, role=1))


def _find_titled(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(FIND_TITLED, text=lang.caption(scene, language))
    return Episode(query, scene, scene, ATTRIBUTES, _titled(ctx, language))


def _edit(instruction: str, target: Callable[[Context, str], Callable[[Scene], Side]]):
    """Composed retrieval (CIRR-like): the query image plus a change; the positive shows the changed scene."""

    def build(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode | None:
        choices = variants(scene, attribute, ctx.split)
        if not choices:
            return None
        edited = ctx.rng.choice(choices)
        text = lang.edit(attribute, getattr(edited, attribute), language)
        query = Side(instruction, text=text, image=ctx.painter.image(scene))
        return Episode(query, scene, edited, ATTRIBUTES, target(ctx, language))

    return build


def _ground(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    """Grounding: a picture with a second, different group; the positive is the crop of the named one."""
    distractor = _distractor(ctx.rng, scene)
    image = ctx.painter.image(scene, distractor=distractor)
    query = Side(GROUND, text=lang.phrase(scene, language), image=image)
    grounded = tuple(a for a in ATTRIBUTES if a != "position")  # the crop does not show where it was
    return Episode(query, scene, scene, grounded, lambda s: Side(CROP, image=ctx.painter.crop(s)))


def _distractor(rng: random.Random, scene: Scene) -> Scene:
    """A group of another shape and colour (a pair seen in training), placed by the renderer opposite."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS
             if s != scene.shape and c != scene.colour and (s, c) not in NEW_PAIRS]
    shape, colour = rng.choice(pairs)
    return Scene(shape, colour, rng.choice(VALUES["size"]), rng.choice(VALUES["count"]), scene.position,
                 scene.background)


def _classify_motion(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(CLASSIFY_MOTION, video=ctx.painter.clip(scene, ctx.frames))
    return Episode(query, scene, scene, ("position",), _answer("position", language))


def _describe_clip(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(DESCRIBE_VIDEO, video=ctx.painter.clip(scene, ctx.frames))
    return Episode(query, scene, scene, ATTRIBUTES, _motion_caption(ctx, language))


def _find_clip(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(FIND_VIDEO, text=lang.motion_caption(scene, language))
    return Episode(query, scene, scene, ATTRIBUTES, _clip(ctx, language))


def _find_titled_clip(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(FIND_VIDEO, text=lang.motion_caption(scene, language))
    return Episode(query, scene, scene, ATTRIBUTES, _titled_clip(ctx, language))


def _clip_question(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    text = lang.motion_question(language) if attribute == "position" else lang.question(attribute, language)
    query = Side(VIDEO_QUESTION, text=text, video=ctx.painter.clip(scene, ctx.frames))
    return Episode(query, scene, scene, (attribute,), _answer(attribute, language))


def _find_page(ctx: Context, scene: Scene, language: str, attribute: str) -> Episode:
    query = Side(FIND_PAGE, text=lang.caption(scene, language))
    return Episode(query, scene, scene, ATTRIBUTES, _page(ctx, language))


_ANY = (None,)
RECIPES = {
    r.name: r
    for r in (
        Recipe(Task.CLASSIFICATION, Modality.I2T, CLASSIFIED, _classify),
        Recipe(Task.CLASSIFICATION, Modality.IT2T, CLASSIFIED, _classify_options),
        Recipe(Task.VQA, Modality.IT2T, ATTRIBUTES, _vqa),
        Recipe(Task.RETRIEVAL, Modality.I2T, _ANY, _describe),
        Recipe(Task.RETRIEVAL, Modality.T2I, _ANY, _find_image),
        Recipe(Task.RETRIEVAL, Modality.I2I, _ANY, _find_similar),
        Recipe(Task.RETRIEVAL, Modality.T2IT, _ANY, _find_titled),
        Recipe(Task.RETRIEVAL, Modality.IT2T, lang.EDITABLE, _edit(EDIT_TO_CAPTION, _caption)),
        Recipe(Task.RETRIEVAL, Modality.IT2I, lang.EDITABLE, _edit(EDIT_TO_IMAGE, _image)),
        Recipe(Task.RETRIEVAL, Modality.IT2IT, lang.EDITABLE, _edit(EDIT_TO_TITLED, _titled)),
        Recipe(Task.GROUNDING, Modality.IT2I, _ANY, _ground),
        Recipe(Task.CLASSIFICATION, Modality.V2T, ("position",), _classify_motion),
        Recipe(Task.RETRIEVAL, Modality.V2T, _ANY, _describe_clip),
        Recipe(Task.RETRIEVAL, Modality.T2V, _ANY, _find_clip),
        Recipe(Task.RETRIEVAL, Modality.T2VT, _ANY, _find_titled_clip),
        Recipe(Task.VQA, Modality.VT2T, VIDEO_QUESTIONS, _clip_question),
        Recipe(Task.RETRIEVAL, Modality.T2I, _ANY, _find_page, "document"),
    )
}

# Every recipe once, classification, VQA, grounding and pages twice: otherwise retrieval, with nine recipes,
# would crowd them out.
SCHEDULE = (*RECIPES, "classification_i2t", "classification_it2t", "vqa_it2t", "grounding_it2i",
            "classification_v2t", "vqa_vt2t", "retrieval_t2i_document")


def draw_episode(recipe: Recipe, ctx: Context, scenes: Iterator[Scene], language: str,
                 attribute: str | None = None, tries: int = 100) -> Episode:
    """The first episode the recipe builds from the given scenes (an edit may find no scene to change to)."""
    for _, scene in zip(range(tries), scenes, strict=False):
        episode = recipe.build(ctx, scene, language, attribute or ctx.rng.choice(recipe.attributes))
        if episode is not None:
            return episode
    raise RuntimeError(f"recipe {recipe.name} built no episode from {tries} scenes of split {ctx.split!r}")


# ----------------------------------------------------------------------------- training samples


@dataclass(frozen=True)
class TrainingExample:
    """A training sample with the scenes behind it (for checks that must not parse text)."""

    sample: Sample
    query_scene: Scene
    positive_scene: Scene
    negative_scenes: tuple[Scene, ...]


def hard_negatives(rng: random.Random, scene: Scene, attributes: tuple[str, ...], k: int, split: str
                   ) -> list[Scene]:
    """Up to k scenes of `split`, each differing from `scene` in one attribute, spread over attributes."""
    pools = {a: rng.sample(found, len(found)) for a in attributes if (found := variants(scene, a, split))}
    order = rng.sample(sorted(pools), len(pools))
    picked: list[Scene] = []
    while len(picked) < k and any(pools.values()):
        for attribute in order:
            if pools[attribute] and len(picked) < k:
                picked.append(pools[attribute].pop())
    return picked


def language_weights(languages: list[str]) -> list[int]:
    return [ENGLISH_WEIGHT if code == "en" else 1 for code in languages]


def generate_training(seed: int, num_samples: int, languages: list[str], max_negatives: int = 3,
                      image_size: int = 64, frames: int = 4, page_size: int = 128
                      ) -> Iterator[TrainingExample]:
    """Training samples from training scenes only.

    SCHEDULE is cycled (so every task and modality appears) and a language is drawn per sample. Most samples
    get `max_negatives` hard negatives; FEWER_NEGATIVES of them fewer, down to none.
    """
    rng = random.Random(f"{seed}/train")
    weights = language_weights(languages)
    train = scenes_in("train")
    for i in range(num_samples):
        recipe = RECIPES[SCHEDULE[i % len(SCHEDULE)]]
        language = rng.choices(languages, weights)[0]
        ctx = Context(rng, Painter(image_size, f"{seed}/train/{i}"), "train", frames, page_size)
        episode = draw_episode(recipe, ctx, (rng.choice(train) for _ in itertools.count()), language)
        fewer = max_negatives > 0 and rng.random() < FEWER_NEGATIVES
        k = rng.randrange(max_negatives) if fewer else max_negatives
        negatives = hard_negatives(rng, episode.scene, episode.attributes, k, "train")
        sample = Sample(
            id=f"demo{i:07d}",
            task=recipe.task,
            modality=recipe.modality,
            language=language,
            source="demo_world",
            query=episode.query,
            positive=episode.target(episode.scene),
            negatives=[episode.target(s) for s in negatives],
        )
        yield TrainingExample(sample, episode.query_scene, episode.scene, tuple(negatives))
