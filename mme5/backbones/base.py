"""What every MLLM family shares: the item to embed, prompt building, batching, last-layer hidden states.

An item's prompt is its published-format string (`mme5.published`); a family adapter only declares what
replaces the image placeholder (`default_image_token`, or the recipe's `InputFormat.image_token`) and
overrides what its model does differently; nothing outside `mme5.backbones` knows a family's image token.
A video is written as an image is, its placeholder replaced by the image token with the processor's video
token in place of its image token (`video_token`); a family whose processor reads no video refuses one.

Batches are `Chunk`s. Under a sharded model (FSDP) every rank must run the same modules the same number of
times, since each module's forward and backward are collectives: `collate_chunks(..., lockstep=True)` makes
chunks uniform across ranks. A missing item becomes a placeholder row, and a chunk without any image gets a
placeholder image row (so the vision tower runs in every chunk), and, for a family that reads video, a chunk
without any video a placeholder video row (the vision tower then runs once for the images, once for the
videos, in every chunk); `Chunk.keep` flags the real rows, and the encoder drops the others' embeddings.
"""

from abc import ABC
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import PIL.Image
import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BatchFeature, PreTrainedModel

from mme5 import published
from mme5.backbones import presets
from mme5.backbones.presets import Parts
from mme5.images import fit_aspect_ratio, load, to_rgb
from mme5.video import DEFAULT_NUM_FRAMES, kept_frames

IMAGE_PLACEHOLDER = published.PLACEHOLDER
IMAGE_INSTRUCTION = published.IMAGE_INSTRUCTION


@dataclass(frozen=True)
class InputFormat:
    """How items become model inputs. Part of the recipe and recorded with every checkpoint and export, so
    that evaluation feeds a trained model what it was trained on.

    max_length: tokens per item, counted and cut by `truncation`.
    image_token: what replaces the published placeholder (None: the family's default, the one its released
        embedding checkpoints were trained with).
    min_pixels, max_pixels: Qwen2-VL's image resolution bounds (None: the family's default).
    image_size: (width, height) every image is first resized to (None: as given), as mmE5 does for
        LLaVA-NeXT (512, 512).
    max_aspect_ratio: longer over shorter side; a more extreme image is padded with white up to it
        (Qwen2-VL's processor refuses ratios above 200).
    preset: the released embedder's format items are written in (`mme5.backbones.presets`: "mme5",
        "vlm2vec_v2", "gme", ...); its image token and image bounds fill the fields left None. None: what
        the model's files say (`presets.detect`), else "mme5".
    max_grid_side: LLaVA-OneVision's anyres grid keeps the resolutions of at most this many tiles a side
        (None: the checkpoint's grid, 6x6 tiles of 384 px for the released models; LLaVE trains with 2).
    truncation: how an item longer than max_length is cut, one of `presets.TRUNCATIONS`: "sequence" (the
        whole token sequence, as mmE5 cuts Mllama items), "text" (text tokens only, the chat frame and
        image tokens never), "none". None: what the preset's reference code does for the family.
    num_frames: frames of a video fed to the model, evenly spaced (`mme5.video.frame_indices`: all of them
        when a video has fewer); None: 8, VLM2Vec-V2's evaluation setting (`mme5.video.DEFAULT_NUM_FRAMES`;
        None rather than 8 so that runs recorded before videos resume unchanged).
    video_min_pixels, video_max_pixels: the Qwen families' pixel bounds of each video frame (None: the image
        bounds, as VLM2Vec-V2, whose processor resizes video frames with its image processor).
    """

    max_length: int = 256
    image_token: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    image_size: tuple[int, int] | None = None
    max_aspect_ratio: float = 100.0
    preset: str | None = None
    max_grid_side: int | None = None
    truncation: str | None = None
    num_frames: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, found {self.max_length}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1 frame, found {self.num_frames}")
        for name in ("video_min_pixels", "video_max_pixels"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 pixel, found {value}")
        if (self.video_min_pixels or 0) > (self.video_max_pixels or float("inf")):
            raise ValueError(f"video_min_pixels={self.video_min_pixels} is above "
                             f"video_max_pixels={self.video_max_pixels}")
        if self.max_grid_side is not None and self.max_grid_side < 1:
            raise ValueError(f"max_grid_side must be at least 1 tile, found {self.max_grid_side}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be at least 1, found {self.max_aspect_ratio}")
        if self.preset is not None:
            presets.preset(self.preset)  # an unknown name is refused here, naming the known ones
        if self.truncation is not None:
            presets.check_truncation(self.truncation)

    def completed(self, family: str) -> "InputFormat":
        """This format for a `family` model with its preset named (None: the default) and the preset's
        defaults in the fields left None, as checkpoints and exports record it."""
        chosen = presets.preset(self.preset)
        return replace(
            self, preset=chosen.name, image_token=self.image_token or chosen.image_token,
            min_pixels=self.min_pixels or chosen.min_pixels, max_pixels=self.max_pixels or chosen.max_pixels,
            image_size=self.image_size or chosen.image_size,
            max_grid_side=self.max_grid_side or chosen.max_grid_side,
            truncation=self.truncation or chosen.truncation_for(family),
            num_frames=self.num_frames or DEFAULT_NUM_FRAMES)

    @classmethod
    def of(cls, value: Any) -> "InputFormat":
        """An InputFormat from itself, a dict or a jsonargparse Namespace (as checkpoints store it)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        fields = dict(value) if isinstance(value, Mapping) else vars(value)
        if fields.get("image_size") is not None:
            fields["image_size"] = tuple(fields["image_size"])
        return cls(**fields)


@dataclass(frozen=True)
class Item:
    """One thing to embed: an instruction plus optional text and an optional image or video.

    Adapters take RGB PIL images; `Encoder.embed` also takes encoded bytes or a file path (decoded there,
    one batch at a time).
    """

    instruction: str = ""
    text: str | None = None
    image: PIL.Image.Image | bytes | str | Path | None = None
    prompt: str | None = None
    """The published string verbatim (a converted or MMEB-eval row, placeholder and trailing newline kept);
    None: written from instruction and text by the published rule."""
    video: tuple[PIL.Image.Image | bytes | str | Path, ...] | None = None
    """Every frame of a video, in order (an item holds an image or a video, not both); the adapter keeps
    `InputFormat.num_frames` of them, evenly spaced as VLM2Vec does (`mme5.video.kept_frames`), and
    decodes only those."""

    def __post_init__(self) -> None:
        if self.image is not None and self.video is not None:
            raise ValueError("an item holds an image or a video, not both")
        if self.video is not None and not self.video:
            raise ValueError("a video needs at least one frame, got an empty one")

    @property
    def medium(self) -> str | None:
        """"image", "video" or None (text only)."""
        return "image" if self.image is not None else "video" if self.video is not None else None

    def published(self) -> str:
        """The item's published-format string, its placeholders agreeing with its image or video."""
        has_image, has_video = self.image is not None, self.video is not None
        prompt = self.prompt if self.prompt is not None else published.render(self.instruction, self.text,
                                                                              has_image, has_video)
        return published.normalize(prompt, has_image, has_video)


@dataclass
class Chunk:
    """One processor batch; under lockstep, `keep` (n,) bool flags the rows that are real items."""

    inputs: dict[str, Tensor]
    keep: Tensor | None = None


# Lockstep padding rows: a one-word row stands for a missing item (not an empty one: a row without tokens
# breaks e.g. Qwen2-VL's rope index); a blank image row makes a chunk run the vision path. Their embeddings
# are dropped (`keep` False), so they only cost compute.
PADDING_ROW = Item(text="none")
PADDING_IMAGE_ROW = Item(text="none", image=PIL.Image.new("RGB", (32, 32)))
PADDING_VIDEO_ROW = Item(text="none", video=(PIL.Image.new("RGB", (32, 32)),) * 2)

Collate = Callable[[Sequence[Item]], Mapping[str, Tensor]]


def lockstep_chunk(items: Sequence[Item | None], collate: Collate, video: bool = False) -> Chunk:
    """One chunk that runs the vision path too: None items become placeholder rows, `keep` False.

    The image placeholder is appended when no item has an image, also when there are no items: a rank
    with nothing left to embed still takes part in a sharded model's collectives. With `video` (the family
    reads video, its vision tower runs once more for a chunk's videos) the video placeholder is appended
    when no item has a video.
    """
    keep = [item is not None for item in items]
    rows = [item if item is not None else PADDING_ROW for item in items]
    padding = [(PADDING_IMAGE_ROW, "image")] + ([(PADDING_VIDEO_ROW, "video")] if video else [])
    for row, medium in padding:
        if all(item.medium != medium for item in rows):
            rows, keep = [*rows, row], [*keep, False]
    return Chunk(dict(collate(rows)), torch.tensor(keep, dtype=torch.bool))


def collate_chunks(items: Sequence[Item | None], size: int | None, collate: Collate,
                   lockstep: bool = False, video: bool = False) -> list[Chunk]:
    """Chunks of `size` item slots (None: one chunk); no chunk when there are no slots.

    A None slot is a missing item: left out of plain chunks, a placeholder row of a lockstep chunk, so
    that lockstep chunk counts depend on the number of slots only (ranks agree). `video`: as for
    `lockstep_chunk`.
    """
    if not lockstep:
        items = [item for item in items if item is not None]
    size = size or max(len(items), 1)
    slices = [items[s : s + size] for s in range(0, len(items), size)]
    if lockstep:
        return [lockstep_chunk(part, collate, video) for part in slices]
    return [Chunk(dict(collate(part))) for part in slices]


def length_order(items: Sequence[Any]) -> list[int]:
    """Indices of `items` longest first: image items together, then by characters of instruction + text.

    Batches of similar length pad less, and the longest come first so that running out of memory shows
    early. Works on anything with `instruction`, `text`, `image` and `prompt` attributes (videos, the
    largest inputs, come first when the items have a `video` attribute).
    """
    def key(i: int) -> tuple[bool, bool, int]:
        item = items[i]
        visual = getattr(item, "video", None) is not None, item.image is not None
        if item.prompt is not None:
            return *visual, len(item.prompt)
        return *visual, len(item.instruction) + len(item.text or "")

    return sorted(range(len(items)), key=key, reverse=True)


class BackboneAdapter(ABC):
    """An MLLM (model + processor) seen as an embedder of `Item`s through its final hidden states."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF `config.model_type` values this adapter handles
    default_image_token: ClassVar[str]  # replaces the published placeholder (`InputFormat.image_token`)
    reads_video: ClassVar[bool] = False  # the processor takes `videos` (frames) and expands its video token
    bounds_video_frames: ClassVar[bool] = False  # video frames take `InputFormat.video_min/max_pixels`
    add_special_tokens: ClassVar[bool] = True  # False where the prompt already carries the bos token
    images_per_row: ClassVar[bool] = False  # the processor wants one list of images per row, not a flat one
    anyres_grid: ClassVar[bool] = False  # an anyres tile grid, which `InputFormat.max_grid_side` narrows
    expands_image_tokens: ClassVar[bool] = True  # the processor writes many tokens per image token
    processor_class: ClassVar[Any] = AutoProcessor

    def __init__(self, model: PreTrainedModel | None, processor: Any,
                 input_format: InputFormat | None = None):
        """`model=None` makes a processing-only adapter (prompts and batches, no hidden states)."""
        self.model = model
        self.processor = processor
        self.input_format = (input_format or InputFormat()).completed(self.family)
        self.preset = presets.preset(self.input_format.preset)
        self.preset.check_family(self.family)
        self.image_token = self.input_format.image_token or self.default_image_token
        self.video_token = (self.image_token.replace(processor.image_token, processor.video_token)
                            if self.reads_video else None)
        self._truncated = 0  # items `truncated_prompt` has cut or marked for the cut (`truncated_count`)
        tok = processor.tokenizer
        tok.padding_side = "left"  # the last position is the last real token (callers must not rely on it)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.reserved_tokens = self._reserved_tokens()
        self._check_format()
        self.configure_processor()

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype | None = None,
                        input_format: InputFormat | None = None, **kwargs: Any) -> "BackboneAdapter":
        """Load model and processor from a folder or hub id; `kwargs` go to the model's from_pretrained.

        `dtype=None` keeps the checkpoint's own dtype (transformers' "auto").
        """
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, dtype=dtype, **kwargs)
        return cls(model, cls.processor_class.from_pretrained(path_or_id), input_format)

    @classmethod
    def skeleton(cls, path_or_id: str | Path, dtype: torch.dtype | None = None,
                 input_format: InputFormat | None = None, **kwargs: Any) -> "BackboneAdapter":
        """The adapter with its model built on the meta device: no weights are read (they come later, e.g.
        broadcast from rank 0 under FSDP). `dtype=None` takes the checkpoint's, as `from_pretrained` does."""
        config = AutoConfig.from_pretrained(path_or_id)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype or config.dtype, **kwargs)
        return cls(model, cls.processor_class.from_pretrained(path_or_id), input_format)

    @classmethod
    def processing_only(cls, path_or_id: str | Path, input_format: InputFormat | None = None
                        ) -> "BackboneAdapter":
        """The adapter with the checkpoint's processor and no model (e.g. for dataloader workers)."""
        return cls(None, cls.processor_class.from_pretrained(path_or_id), input_format)

    def _check_format(self) -> None:
        """Refuse what this family cannot apply, rather than ignore it: a `max_grid_side` without an anyres
        grid, a "sequence" cut that could fall inside expanded image tokens or the tail, a `max_length`
        shorter than the preset's fixed frame (its chat turns, with the default instruction where the
        instruction is a turn of it)."""
        if self.input_format.max_grid_side is not None and not self.anyres_grid:
            raise ValueError(f"max_grid_side narrows LLaVA-OneVision's anyres grid; the {self.family} family "
                             "has none: leave it unset")
        video_bounds = self.input_format.video_min_pixels or self.input_format.video_max_pixels
        if video_bounds and not self.bounds_video_frames:
            why = ("resizes every frame to its tile size" if self.reads_video else
                   f"reads no video (families that do: {', '.join(video_families())})")
            raise ValueError(f"video_min_pixels/video_max_pixels bound the Qwen families' video frames; the "
                             f"{self.family} family {why}: leave them unset")
        if self.input_format.truncation == "sequence":
            self._check_sequence_cut()
        if self.input_format.truncation == "none":
            return
        head, _, tail = self.prompt_parts(Item())
        if self._frame_tokens(head, tail) > self.max_length:
            raise ValueError(f"max_length={self.max_length} is shorter than the fixed part of the "
                             f"{self.family} prompt in preset {self.preset.name!r} "
                             f"({self._frame_tokens(head, tail)} tokens: {head!r} ... {tail!r})")

    def _check_sequence_cut(self) -> None:
        """A "sequence" cut keeps the first `max_length` tokens: it must not reach into the head of an image
        item nor have a tail to drop, and the processor must not expand image tokens (a cut among them)."""
        head, _, tail = self.prompt_parts(PADDING_IMAGE_ROW)
        if self.expands_image_tokens:
            problem = "the processor expands each image token into many, which the cut could split"
        elif tail:
            problem = f"preset {self.preset.name!r} ends a prompt with {tail!r}, which the cut would drop"
        elif self._sequence_tokens(head) > self.max_length:
            problem = f"max_length={self.max_length} would cut the image prompt's head {head!r}"
        else:
            return
        raise ValueError(f"truncation 'sequence' on the {self.family} family: {problem}; choose 'text' or "
                         "'none'")

    def _reserved_tokens(self) -> tuple[str, ...]:
        """The tokens that stand for an image or a video (the processor expands them, the model fills them
        with vision features), longest first: a user's text must not carry them (`without_reserved`)."""
        names = set(self.tokenizer.convert_ids_to_tokens(sorted(self.image_token_ids)))
        names |= {getattr(self.processor, name, None) for name in ("image_token", "video_token", "boi_token")}
        return tuple(sorted(names - {None}, key=len, reverse=True))

    def without_reserved(self, item: Item) -> Item:
        """`item` with the family's image and video tokens dropped from its instruction, text and prompt.

        Written in a user's text ("<image>" in a web page, "<|image_pad|>" in a code snippet), such a token
        would ask the processor for one more image than the item has (the batch fails) or be filled with
        another item's vision features; dropped as the published rule drops placeholders inside the parts.
        A removal may join two halves into another one, hence the loop.
        """
        def clean(text: str | None) -> str | None:
            while text and any(token in text for token in self.reserved_tokens):
                for token in self.reserved_tokens:
                    text = text.replace(token, "")
            return text

        return replace(item, instruction=clean(item.instruction), text=clean(item.text),
                       prompt=clean(item.prompt))

    def configure_processor(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Apply the input format's processor settings (the family's resolution bounds); default: none."""

    @property
    def max_length(self) -> int:
        return self.input_format.max_length

    @property
    def hidden_size(self) -> int:
        """Embedding dimension: the language model's hidden size."""
        return self.model.config.get_text_config().hidden_size

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def published_prompt(self, item: Item) -> str:
        """The family's rule for the published string: the placeholders replaced by the image and video
        tokens."""
        text = item.published().replace(IMAGE_PLACEHOLDER, self.image_token)
        return text.replace(published.VIDEO_PLACEHOLDER, self.video_token) if self.video_token else text

    def head_markers(self) -> tuple[str, ...]:
        """Strings that end the fixed head of a published prompt (never truncated)."""
        return (self.image_token, self.video_token) if self.video_token else (self.image_token,)

    def check_medium(self, item: Item) -> None:
        """Refuse a video this family cannot read, naming the families that can (nothing is dropped)."""
        if item.video is not None and not self.reads_video:
            raise ValueError(f"the {self.family} family reads no video; families that do: "
                             f"{', '.join(video_families())}")

    def prompt_parts(self, item: Item) -> Parts:
        """The item's prompt in the input format's preset as (head, body, tail): only the body may be cut.

        A preset without a template of its own (or declining one for this item) takes the published string,
        split after its last head marker (image token, bos); its tail is empty.
        """
        self.check_medium(item)
        item = self.without_reserved(item)
        token = self.video_token if item.video is not None else self.image_token
        parts = self.preset.template(item, token) if self.preset.template else None
        if parts is not None:
            return parts
        text = self.published_prompt(item)
        cut = max((text.rfind(marker) + len(marker) for marker in self.head_markers() if marker in text),
                  default=0)
        return Parts(text[:cut], text[cut:], "")

    def prompt(self, item: Item) -> str:
        """The prompt string of one item, as the input format's preset writes it."""
        return "".join(self.prompt_parts(item))

    @property
    def image_token_ids(self) -> frozenset[int]:
        """Ids of the tokens standing for an image or a video in the model's input: never counted as text,
        never cut."""
        video = {self.processor.video_token_id} if self.reads_video else set()
        return frozenset({self.processor.image_token_id, *video})

    def _count_text_tokens(self, text: str, specials: bool) -> int:
        """Tokens of `text` (with the tokenizer's own specials if `specials`) that are not image tokens."""
        ids = self.tokenizer(text, add_special_tokens=specials and self.add_special_tokens).input_ids
        return sum(i not in self.image_token_ids for i in ids)

    def _fit(self, body: str, budget: int) -> str:
        """Longest prefix of `body`, cut at a token start, that tokenizes to at most `budget` tokens.

        Re-tokenizing a cut string may merge differently, hence the loop (it shortens `body` every turn).
        """
        while True:
            enc = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc.input_ids) <= budget:
                return body
            body = body[: enc.offset_mapping[budget][0]]

    def truncated_prompt(self, item: Item) -> str:
        """The prompt as the processor gets it under the input format's truncation rule; a cut is counted
        (`truncated_count`).

        "text": at most `max_length` text tokens, image tokens never counted nor cut. Only the body is cut:
        head and tail (a chat frame, the pooled end token) are kept whole; they end and start at special
        tokens, so the three parts tokenize independently. "sequence": the whole prompt, which `collate`
        has the processor cut to its first `max_length` tokens. "none": the whole prompt.
        """
        head, body, tail = self.prompt_parts(item)
        rule = self.input_format.truncation
        if rule == "text":
            fitted = self._fit(body, self._text_budget(head, tail))
            self._truncated += fitted != body
            body = fitted
        elif rule == "sequence":
            self._truncated += self._sequence_tokens(head + body + tail) > self.max_length
        prompt = head + body + tail
        if not prompt and not self.tokenizer("", add_special_tokens=self.add_special_tokens).input_ids:
            raise ValueError(f"an item with neither text nor image gives the {self.family} model no token to "
                             "embed (its tokenizer adds none): give it a text or an image")
        return prompt

    def _text_budget(self, head: str, tail: str) -> int:
        """Text tokens left to the body under the "text" rule."""
        budget = self.max_length - self._frame_tokens(head, tail)
        if budget < 0:
            raise ValueError(f"max_length={self.max_length} is shorter than the {self.family} prompt's fixed "
                             f"part in preset {self.preset.name!r}: head {head!r}, tail {tail!r}")
        return budget

    def _sequence_tokens(self, prompt: str) -> int:
        """Tokens of a prompt as the processor writes it (a family whose image tokens stay single)."""
        return len(self.tokenizer(prompt, add_special_tokens=self.add_special_tokens).input_ids)

    def _frame_tokens(self, head: str, tail: str) -> int:
        """Text tokens of a prompt's head (with the tokenizer's own specials) and tail."""
        return self._count_text_tokens(head, True) + self._count_text_tokens(tail, False)

    def truncated_count(self) -> int:
        """Items cut to `max_length` since this adapter was made: training reports them in its data report,
        evaluation in scores.json, so that a cut is never silent."""
        return self._truncated

    def _images_arg(self, images: list[PIL.Image.Image | None]) -> Any:
        """The processor's `images` argument: a flat list with one image per image token, or
        (`images_per_row`) one list per row, `[]` for a text-only row."""
        if self.images_per_row:
            return [[im] if im is not None else [] for im in images]
        return [im for im in images if im is not None]

    def prepare_image(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The image as the processor gets it, in the references' order: the decoded image, in its own mode,
        resized to `target_size` with PIL's default filter for that mode (nearest for palette images), then
        composited onto white in RGB, then padded with white to the maximum aspect ratio (and to at least
        2 pixels a side)."""
        size = self.target_size(image.size)
        if size != image.size:
            image = image.resize(size)
        return fit_aspect_ratio(to_rgb(image), self.input_format.max_aspect_ratio)

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the family's reference resizes an image of `size` to before its processor:
        the input format's fixed size if it has one (mmE5's LLaVA-NeXT 512x512, VLM2Vec v1's 1344x1344),
        else `size`."""
        return tuple(self.input_format.image_size or size)

    def prepare_video(self, frames: Sequence[PIL.Image.Image | bytes | str | Path]) -> list[PIL.Image.Image]:
        """The kept frames (`InputFormat.num_frames`, `mme5.video.kept_frames`) as the processor gets them:
        decoded if given as file bytes or a path (a training side's video: only the kept ones are), composited
        onto white in RGB and padded to the maximum aspect ratio. No resize here: VLM2Vec-V2 feeds frames to
        the processor as they are (its 56x56 rule is for images only)."""
        kept = [frame if isinstance(frame, PIL.Image.Image) else load(frame)
                for frame in kept_frames(frames, self.input_format.num_frames)]
        return [fit_aspect_ratio(to_rgb(frame), self.input_format.max_aspect_ratio) for frame in kept]

    def collate(self, items: Sequence[Item]) -> BatchFeature:
        """One processor batch of `items`; text-only, image and video items mix freely, rows stay in
        order."""
        prompts = [self.truncated_prompt(it) for it in items]  # refuses a video the family cannot read
        images = [self.prepare_image(it.image) if it.image is not None else None for it in items]
        videos = [self.prepare_video(it.video) for it in items if it.video is not None]
        has_image = any(im is not None for im in images)
        return self.processor(
            text=prompts,
            images=self._images_arg(images) if has_image else None,
            **({"videos": videos} if videos else {}),
            padding=True,
            add_special_tokens=self.add_special_tokens,
            return_tensors="pt",
            **self._cut_arguments(),
        )

    def _cut_arguments(self) -> dict[str, Any]:
        """The processor's own cut under the "sequence" rule: the first `max_length` tokens of each row."""
        if self.input_format.truncation == "sequence":
            return {"truncation": True, "max_length": self.max_length}
        return {}

    def chunks(self, items: Sequence[Item | None], size: int | None = None,
               lockstep: bool = False) -> list[Chunk]:
        """`collate_chunks` with this adapter's processor (None items: missing slots)."""
        return collate_chunks(items, size, self.collate, lockstep, self.reads_video)

    def lockstep_chunk(self, items: Sequence[Item | None]) -> Chunk:
        """`lockstep_chunk` with this adapter's processor, also for no items (a rank with nothing left)."""
        return lockstep_chunk(items, self.collate, self.reads_video)

    @staticmethod
    def inner_model(model: Any) -> Any:
        """The model without its LM head (e.g. `MllamaModel`); `model` may be a PEFT wrapper.

        LoRA layers live inside the wrapped modules, so calling the inner model keeps them active.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.model

    @staticmethod
    def _to_model(inner: Any, batch: BatchFeature | dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch on the model's device; floating inputs (pixels) in the model's dtype."""
        device, dtype = inner.device, inner.dtype
        return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}

    def last_hidden_state(self, model: Any, batch: BatchFeature | dict[str, Tensor]) -> Tensor:
        """(B, T, D) final-layer, post-norm hidden states of the language model; no LM-head logits."""
        inner = self.inner_model(model)
        return inner(**self._to_model(inner, batch), use_cache=False).last_hidden_state


def video_families() -> list[str]:
    """The families whose adapters read video (those imported, i.e. every one `mme5.backbones` registers)."""
    found, pending = set(), list(BackboneAdapter.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.reads_video:
            found.add(cls.family)
    return sorted(found)
