"""The user-facing embedder: a model folder (or checkpoint) in, L2-normalised float32 vectors out.

    emb = Embedder.from_pretrained("exported/x")
    q = emb.encode_query(["a red cube on grass"])
    d = emb.encode_document([Path("cube.png"), {"text": "a cube", "image": "cube.png"}, "a red cube"])
    emb.similarity(q, d)

It loads through `mme5.checkpoint.load_encoder` and embeds with `Encoder.embed`, so its numbers are the
evaluation's (and those of the sentence-transformers module an export ships). Items are batched longest
first (less padding); results come back in input order.

An input is a string, a PIL image or a `pathlib.Path` (an image), or a dict with "text" and/or "image" (a PIL
image, a file path or an http(s) URL) or "video" (its frames in order, each given as an image is; only the
`num_frames` the model keeps are read, `mme5.video.kept_frames`). As in sentence-transformers, a string is
an image when it names an existing image file, is an http(s) URL ending in an image extension, or is a
`data:image/` URI; any other string is text.
"""

from __future__ import annotations

import base64
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from mme5.backbones import Item
from mme5.checkpoint import load_encoder, trained_dims
from mme5.encoder import Encoder
from mme5.images import IMAGE_SUFFIXES, check_image
from mme5.matryoshka import truncate
from mme5.video import frame_indices

ImageLike = PIL.Image.Image | str | Path
Input = str | PIL.Image.Image | Path | Mapping[str, Any]

URL_TIMEOUT_S = 30
IMAGE_EXTENSIONS = tuple(sorted(IMAGE_SUFFIXES))  # str.endswith takes a tuple


class Embedder:
    """Embeds texts, images or text–image pairs with an `Encoder` in eval mode.

    `instructions` are the model's default query and document ("target") instructions, as an export
    records them; `encode_query` / `encode_document` use them. `truncate_dim`: keep the first dimensions of
    every embedding (normalised again), as sentence-transformers' `truncate_dim`; meant for a model trained
    at that size (`matryoshka_dims`, the sizes its recipe records).
    """

    def __init__(self, encoder: Encoder, description: dict | None = None,
                 instructions: Mapping[str, str] | None = None, truncate_dim: int | None = None,
                 matryoshka_dims: Sequence[int] | None = None):
        if truncate_dim is not None and not 0 < truncate_dim <= encoder.dim:
            raise ValueError(f"truncate_dim {truncate_dim}: the model's embeddings have {encoder.dim} "
                             "dimensions")
        self.encoder = encoder.eval()
        self.description = description or {}
        self.instructions = {"query": "", "target": "", **(instructions or {})}
        self.truncate_dim = truncate_dim
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims else None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: str | None = None,
                        max_length: int | None = None, preset: str | None = None,
                        truncate_dim: int | None = None, num_frames: int | None = None) -> Embedder:
        """Load an exported folder, a plain backbone folder (zero-shot) or an EmbeddingModule `.ckpt`, by path
        or hub id.

        device: default cuda when available, else cpu. dtype: "float32", "bfloat16" or "float16" (default:
        the weights' own). max_length: text tokens per item (default: the recorded input format's).
        preset: the input format of a released embedder ("gme", "qwen3_vl_embedding", ...; default: the
        recorded one, else what the model's files say, else "mme5": `mme5.backbones.presets`).
        truncate_dim: embeddings of this many leading dimensions (default: all).
        num_frames: frames kept of each video (default: the recorded input format's, else 8).
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_encoder(path, device, dtype, max_length, preset=preset, num_frames=num_frames)
        # The fingerprint names the model's files and settings: mteb files results under it (its revision).
        return cls(loaded.encoder, loaded.description | {"fingerprint": loaded.fingerprint},
                   loaded.recipe.get("instructions"), truncate_dim, trained_dims(loaded.recipe))

    @property
    def dim(self) -> int:
        """The size of the embeddings `encode` returns."""
        return self.truncate_dim or self.encoder.dim

    def encode(self, inputs: Sequence[Input] | None = None, *, texts: Sequence[str] | None = None,
               images: Sequence[ImageLike] | None = None, instruction: str = "", prompt: str | None = None,
               batch_size: int = 32, show_progress_bar: bool = False, convert_to_numpy: bool = False,
               normalize_embeddings: bool = True, device: str | None = None,
               progress: bool | None = None) -> Tensor | np.ndarray:
        """(n, D) float32 embeddings, one per input (a torch tensor on CPU, or numpy with convert_to_numpy).

        inputs: strings, images, paths and {"text", "image" or "video"} dicts, mixed freely. Or `texts`
            and/or `images` (pairs when both are given). Not both ways at once.
        instruction / prompt: the task instruction written in front of every item ("Find me an everyday image
            that matches the given caption:"); `prompt` is a synonym that wins.
        normalize_embeddings: False returns the pooled vectors before L2 normalisation.
        device: move the model there first (it stays).
        progress: old name of show_progress_bar.
        """
        items = self.items(inputs, texts, images, instruction if prompt is None else prompt)
        if device is not None:
            self.encoder.to(device)
        with self._normalizing(normalize_embeddings):
            embeddings = self.encoder.embed(items, batch_size, show_progress_bar or bool(progress))
        embeddings = truncate(embeddings, self.truncate_dim, normalize_embeddings)
        return embeddings.numpy() if convert_to_numpy else embeddings

    def encode_query(self, inputs: Sequence[Input], prompt: str | None = None, **kwargs: Any
                     ) -> Tensor | np.ndarray:
        """`encode` with the model's recorded query instruction (or `prompt`)."""
        return self.encode(inputs, prompt=self.instructions["query"] if prompt is None else prompt, **kwargs)

    def encode_document(self, inputs: Sequence[Input], prompt: str | None = None, **kwargs: Any
                        ) -> Tensor | np.ndarray:
        """`encode` with the model's recorded document (target) instruction (or `prompt`)."""
        return self.encode(inputs, prompt=self.instructions["target"] if prompt is None else prompt, **kwargs)

    @staticmethod
    def similarity(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
        """(n, m) cosine similarities of two sets of embeddings (what retrieval ranks by)."""
        a, b = (torch.as_tensor(x, dtype=torch.float32) for x in (a, b))
        a, b = (x.unsqueeze(0) if x.dim() == 1 else x for x in (a, b))
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    def items(self, inputs: Sequence[Input] | None, texts: Sequence[str] | None,
              images: Sequence[ImageLike] | None, instruction: str) -> list[Item]:
        """The `Item`s of one call's inputs, each checked (bad ones named by position)."""
        if inputs is not None and (texts is not None or images is not None):
            raise ValueError("give inputs, or texts and/or images, not both")
        if inputs is None:
            inputs = _pairs(texts, images)
        elif isinstance(inputs, str | Path | PIL.Image.Image | Mapping):
            raise TypeError(f"inputs must be a list, got one {type(inputs).__name__}: wrap it in [...]")
        num_frames = self.encoder.adapter.input_format.num_frames
        return [to_item(value, f"inputs[{i}]", instruction, num_frames) for i, value in enumerate(inputs)]

    @contextmanager
    def _normalizing(self, normalize: bool) -> Iterator[None]:
        saved = self.encoder.normalize
        self.encoder.normalize = normalize
        try:
            yield
        finally:
            self.encoder.normalize = saved


def _pairs(texts: Sequence[str] | None, images: Sequence[ImageLike] | None) -> list[Input]:
    """The `texts=` / `images=` call as one list of inputs (pairs when both are given)."""
    if texts is None and images is None:
        raise ValueError("give inputs, texts, images or texts and images")
    # A bare string is a sequence too (of characters): one embedding per character, silently.
    if isinstance(texts, str):
        raise TypeError(f"texts must be a list of strings, got the string {texts[:40]!r}: wrap it in [...]")
    if isinstance(images, str | Path | PIL.Image.Image):
        raise TypeError(f"images must be a list, got one {type(images).__name__}: wrap it in [...]")
    if texts is not None and images is not None and len(texts) != len(images):
        raise ValueError(f"texts and images pair up: got {len(texts)} texts and {len(images)} images")
    if images is None:
        return list(texts)
    if texts is None:
        return [{"image": image} for image in images]
    return [{"text": text, "image": image} for text, image in zip(texts, images, strict=True)]


def to_item(value: Input, where: str, instruction: str = "", num_frames: int | None = None) -> Item:
    """One input as an `Item`, refused with a message naming `where` (e.g. "inputs[3]") and the value.
    Of a video, only the `num_frames` frames the model keeps are checked and kept (None: all)."""
    if isinstance(value, str) and not names_an_image(value):
        return Item(instruction, value)
    if isinstance(value, PIL.Image.Image | Path | str):
        return Item(instruction, None, _image(value, where))
    if isinstance(value, Mapping):
        unknown = set(value) - {"text", "image", "video"}
        if unknown or not value:
            raise ValueError(f"{where}: a dict input has the keys 'text' and/or 'image' or 'video', got "
                             f"{sorted(value)}")
        text, image, video = value.get("text"), value.get("image"), value.get("video")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"{where}: 'text' must be a string, got {type(text).__name__} {text!r:.60}")
        if text is None and image is None and video is None:
            raise ValueError(f"{where}: 'text', 'image' and 'video' are all None")
        if image is not None and video is not None:
            raise ValueError(f"{where}: an input holds an 'image' or a 'video', not both")
        return Item(instruction, text, _image(image, where) if image is not None else None,
                    video=_video(video, where, num_frames) if video is not None else None)
    raise TypeError(f"{where}: expected a string, an image, a path or a {{'text', 'image', 'video'}} dict, "
                    f"got {type(value).__name__} {value!r:.60}")


def _video(frames: Any, where: str, num_frames: int | None) -> tuple[PIL.Image.Image | bytes | Path, ...]:
    """The frames of a video input the model keeps, each checked now as an image input is (named by its
    position in the video); the other frames are never read."""
    if isinstance(frames, str | bytes | Path | PIL.Image.Image | Mapping) or not isinstance(frames, Sequence):
        raise TypeError(f"{where}: 'video' is a list of frames (PIL images, file paths or URLs), got "
                        f"{type(frames).__name__}")
    if not frames:
        raise ValueError(f"{where}: 'video' has no frames")
    kept = frame_indices(len(frames), num_frames)
    return tuple(_image(frames[i], f"{where} video frame {i}") for i in kept)


def names_an_image(text: str) -> bool:
    """sentence-transformers' rule: an existing image file, an image URL or an image data URI."""
    if text.startswith("data:image/"):
        return True
    if text.startswith(("http://", "https://")) and " " not in text:
        return urllib.parse.urlparse(text).path.lower().endswith(IMAGE_EXTENSIONS)
    return text.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(text)


def _image(value: Any, where: str) -> PIL.Image.Image | bytes | Path:
    """An image input checked now (a missing or unreadable file fails before any batch runs); files are
    decoded later, one batch at a time."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, str) and value.startswith("data:image/"):
        try:
            data = base64.b64decode(value.partition(",")[2], validate=True)
        except ValueError as error:
            raise ValueError(f"{where}: a data:image URI that is not base64 ({error})") from None
        check_image(data, f"{where} (data URI)")
        return data
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        data = _download(value, where)
        check_image(data, f"{where} ({value})")
        return data
    if not isinstance(value, str | Path):
        raise TypeError(f"{where}: an image is a PIL image, a file path or a URL, got {type(value).__name__}")
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file {str(value)!r} does not exist")
    check_image(path, f"{where} ({value})")
    return path


def _download(url: str, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            return response.read()
    except OSError as error:  # URLError, timeouts, refused connections: all OSErrors
        raise ConnectionError(f"{where}: could not download image {url} ({error}); offline? Download it and "
                              "give the file instead") from None
