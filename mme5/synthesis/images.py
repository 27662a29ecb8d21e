"""The real images a synthetic sample is built on (mmE5 §3.1, data configuration).

`ImagePool` is a folder of images (or a text file listing image paths) with stable keys. `NeighbourIndex`
embeds every pool image once with a frozen retrieval model and, for a query image, picks a similar image
as the positive (ranks 1–5 by default) and a less similar one as the hard negative (ranks 10–50), both
deterministically from a seed string (the sample id). The embeddings are cached on disk, keyed by the
pool's file list and the embedder's name, so a restarted or sharded run never embeds the pool again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mme5.backbones.base import IMAGE_INSTRUCTION, Item
from mme5.data.schema import Modality
from mme5.files import save_torch
from mme5.images import ImageDecodeError
from mme5.retrieval import nearest
from mme5.synthesis.plan import PlannedSample
from mme5.synthesis.prompting import image_roles

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})

Embed = Callable[[list[bytes]], Tensor]
"""Encoded images in, L2-normalised embeddings (n, D) out."""


class ImagePool:
    """Images with stable keys, from one of:

    - a folder of image files (recursive, sorted; keys are POSIX paths relative to the folder);
    - a text file listing image paths, one a line (keys as written; relative to the list file's folder);
    - WebDataset tar shards: one `.tar` file, or a folder holding `*.tar` and no loose images (keys are
      `<shard>/<member>`; images are read in place by offset, never extracted).
    """

    def __init__(self, source: str | os.PathLike):
        source = Path(source)
        self._members: dict[str, tuple[Path, int, int]] = {}  # shard key -> (tar, data offset, size)
        if source.is_dir():
            self.root = source
            self.keys = sorted(p.relative_to(source).as_posix() for p in source.rglob("*")
                               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.keys:
                self._index_shards(sorted(source.glob("*.tar")))
        elif source.is_file() and source.suffix == ".tar":
            self.root = source.parent
            self._index_shards([source])
        elif source.is_file():
            self.root = source.parent
            lines = source.read_text(encoding="utf-8").splitlines()
            self.keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        else:
            raise FileNotFoundError(f"{source}: no such image folder, list file or .tar shard")
        if not self.keys:
            raise ValueError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._index = {key: i for i, key in enumerate(self.keys)}

    def _index_shards(self, shards: list[Path]) -> None:
        for shard in shards:
            try:
                with tarfile.open(shard) as tar:
                    for member in tar:
                        if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                            key = f"{shard.name}/{member.name}"
                            self._members[key] = (shard, member.offset_data, member.size)
            except tarfile.TarError as error:
                raise ValueError(f"{shard}: not a readable tar shard: {error}") from None
        self.keys = list(self._members)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, key: str) -> bytes:
        if key in self._members:
            shard, offset, size = self._members[key]
            with open(shard, "rb") as handle:
                handle.seek(offset)
                return handle.read(size)
        return (self.root / key).read_bytes()

    def index(self, key: str) -> int:
        return self._index[key]

    def fingerprint(self) -> str:
        """Identity of the pool's file list: names and sizes (no contents hashed)."""
        listing = [[key, self._size(key)] for key in self.keys]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def _size(self, key: str) -> int:
        return self._members[key][2] if key in self._members else (self.root / key).stat().st_size


class NeighbourIndex:
    """Nearest-neighbour positive and hard-negative picks over an `ImagePool`.

    Rank r is the r-th most similar *other* image (cosine similarity, ties by pool order); bands are
    inclusive and clipped to the pool. A negative band beyond the pool falls back to the least similar
    images past the positive band. A pool image that does not decode is left out (logged with its key and
    counted in `unreadable`), as anchor and as neighbour.
    """

    def __init__(self, pool: ImagePool, embed: Embed, name: str, cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 32, positive_ranks: Sequence[int] = (1, 5),
                 negative_ranks: Sequence[int] = (10, 50)):
        if len(pool) < 3:
            raise ValueError(f"a neighbour index needs at least 3 images, the pool has {len(pool)}")
        self.pool = pool
        self.positive_ranks = _band(positive_ranks, "positive_ranks")
        self.negative_ranks = _band(negative_ranks, "negative_ranks")
        self.embed_calls = 0
        key = hashlib.sha256(f"{name}\n{pool.fingerprint()}".encode()).hexdigest()[:20]
        self.cache_path = Path(cache_dir) / f"embeddings-{key}.pt" if cache_dir is not None else None
        self.unreadable: set[int] = set()
        if self.cache_path is not None and self.cache_path.exists():
            cached = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            self.embeddings = cached["embeddings"]
            self.unreadable = set(cached.get("unreadable", []))
        else:
            self.embeddings = self._embed_all(embed, batch_size)
            if self.cache_path is not None:
                payload = {"name": name, "keys": pool.keys, "embeddings": self.embeddings,
                           "unreadable": sorted(self.unreadable)}
                save_torch(self.cache_path, payload)
        self.usable = [k for i, k in enumerate(pool.keys) if i not in self.unreadable]
        if len(self.usable) < 3:
            raise ValueError(f"a neighbour index needs at least 3 readable images, the pool has "
                             f"{len(self.usable)} of {len(pool)}")
        self._order: dict[int, list[int]] = {}

    def _embed_all(self, embed: Embed, batch_size: int) -> Tensor:
        chunks = []
        for start in range(0, len(self.pool), batch_size):
            keys = self.pool.keys[start:start + batch_size]
            chunks.append(self._embed_batch(embed, start, keys))
        embeddings = torch.cat(chunks)
        if embeddings.shape[0] != len(self.pool):
            raise ValueError(f"the embedder returned {embeddings.shape[0]} rows for {len(self.pool)} images")
        return torch.nn.functional.normalize(embeddings, dim=-1)

    def _embed_batch(self, embed: Embed, start: int, keys: list[str]) -> Tensor:
        """One batch's embeddings; when an image does not decode, the batch again image by image, the
        unreadable ones getting a zero row (and a place in `unreadable`)."""
        self.embed_calls += 1
        try:
            return embed([self.pool.read(k) for k in keys]).detach().float().cpu()
        except ImageDecodeError:
            rows = []
            for offset, key in enumerate(keys):
                self.embed_calls += 1
                try:
                    rows.append(embed([self.pool.read(key)]).detach().float().cpu())
                except ImageDecodeError as error:
                    log.warning("image pool %s: %s left out (%s)", self.pool.root, key, error)
                    self.unreadable.add(start + offset)
                    rows.append(None)
            width = next((row.shape[1] for row in rows if row is not None), 1)
            return torch.cat([row if row is not None else torch.zeros(1, width) for row in rows])

    def ranked(self, key: str) -> list[str]:
        """The other images, most similar first: element r-1 is rank r."""
        return [self.pool.keys[i] for i in self._ranked(self.pool.index(key))]

    def _ranked(self, i: int) -> list[int]:
        if i not in self._order:
            banned = [i, *self.unreadable]
            _, order = nearest(self.embeddings[i : i + 1], self.embeddings, len(self.embeddings), [banned])
            self._order[i] = [j for j in order[0].tolist() if j >= 0]
        return self._order[i]

    def choose(self, seed: str) -> str:
        """An anchor key drawn deterministically from `seed`, among the readable images."""
        return random.Random(f"{seed}|anchor").choice(self.usable)

    def pick(self, key: str, seed: str) -> tuple[str, str]:
        """(positive, hard negative) for query image `key`, drawn from their rank bands by `seed`."""
        ranked = self.ranked(key)
        return self._draw(ranked, self.positive_ranks, seed, "positive"), self.pick_negative(key, seed)

    def pick_negative(self, key: str, seed: str) -> str:
        """A hard negative for `key` from the negative band."""
        ranked = self.ranked(key)
        low, high = self.negative_ranks
        if low > len(ranked):  # small pool: the least similar images past the positive band
            low = min(self.positive_ranks[1] + 1, len(ranked))
        return self._draw(ranked, (low, high), seed, "negative")

    @staticmethod
    def _draw(ranked: list[str], band: tuple[int, int], seed: str, role: str) -> str:
        low, high = band[0], min(band[1], len(ranked))
        low = min(low, high)
        return ranked[random.Random(f"{seed}|{role}").randint(low, high) - 1]


def select_images(planned: PlannedSample, pool: ImagePool, index: NeighbourIndex) -> dict[str, str]:
    """Pool keys of the images `planned` needs, by role, in the prompt's `image_roles` order.

    The anchor image is drawn from the sample id. A query holding an image gets the anchor; a target
    holding an image gets a near neighbour of the anchor as positive and a farther one as hard negative —
    unless the query is text only, when the anchor itself is the positive.
    """
    roles = image_roles(Modality(planned.modality))
    if not roles:
        return {}
    anchor = index.choose(planned.id)
    chosen: dict[str, str] = {}
    if "query" in roles:
        chosen["query"] = anchor
        if "positive" in roles:
            chosen["positive"], chosen["negative"] = index.pick(anchor, planned.id)
    else:
        chosen["positive"], chosen["negative"] = anchor, index.pick_negative(anchor, planned.id)
    return {role: chosen[role] for role in roles}


def encoder_embedder(model: str | os.PathLike, device: str | None = None) -> tuple[Embed, str]:
    """A model the project loads (backbone or exported folder, `.ckpt`) as an image embedder; returns
    (embed, cache name). The cache name carries the model's fingerprint, so another model re-embeds."""
    from mme5.checkpoint import load_encoder

    loaded = load_encoder(model, device or "cpu")

    def embed(images: list[bytes]) -> Tensor:
        return loaded.encoder.embed([Item(IMAGE_INSTRUCTION, image=data) for data in images])

    return embed, f"encoder:{Path(model).resolve()}:{loaded.fingerprint}"


def _band(band: Sequence[int], name: str) -> tuple[int, int]:
    low, high = (int(v) for v in band)
    if not 1 <= low <= high:
        raise ValueError(f"{name} must be [low, high] with 1 <= low <= high, found {list(band)}")
    return low, high
