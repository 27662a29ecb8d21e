"""Embeds a data set's distinct items: length-sorted batches, split over ranks, cached on disk.

The embedding function is injected (`embed(items) -> (n, D)`), so the command, the training callbacks
and the tests share this path with any model. Under torch.distributed every rank encodes its share of the
batches and all ranks get every embedding back (one `all_gather_object`); with a cache, each rank appends
its own files, written every `flush_every` items, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from mme5.backbones.base import Item, length_order
from mme5.distributed import rank_and_world
from mme5.eval.images import ImageRef, load_image
from mme5.eval.retrieval import ItemSpec
from mme5.files import save_torch
from mme5.images import ImageDecodeError

Embed = Callable[[list[Item]], Tensor]


def item_key(item: ItemSpec) -> str:
    """Stable identity of an item: instruction, text, published prompt, the location and content of its
    image or of each video frame (the key of an item without video is the one it had before videos)."""
    def where(ref: ImageRef | None) -> list[str | None] | None:
        return ref and [ref.archive, ref.path, ref.identity]

    fields = [item.instruction, item.text, where(item.image), item.prompt]
    if item.video is not None:
        fields.append([where(frame) for frame in item.video])
    return hashlib.sha1(json.dumps(fields, ensure_ascii=False).encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings of one model under `<root>/<fingerprint>/<namespace>/part-*.pt`.

    A part holds {"keys": [...], "embeddings": (n, D) float32}; it is written to a temporary name and
    renamed, so a killed run leaves only whole parts. Parts are never rewritten, only added.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root) / fingerprint

    def _dir(self, namespace: str) -> Path:
        return self.root / (namespace.replace("/", "__") or "_")

    def lookup(self, namespace: str, keys: Sequence[str]) -> dict[str, Tensor]:
        """The cached embeddings among `keys`."""
        wanted, found = set(keys), {}
        for part in sorted(self._dir(namespace).glob("part-*.pt")):
            try:
                payload = torch.load(part, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - a bad part only costs recomputation
                warnings.warn(f"{part}: unreadable embedding cache part ignored ({error})", stacklevel=2)
                continue
            for key, row in zip(payload["keys"], payload["embeddings"], strict=True):
                if key in wanted:
                    found[key] = row
        return found

    def write(self, namespace: str, keys: list[str], embeddings: Tensor, rank: int = 0) -> None:
        folder = self._dir(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        save_torch(folder / f"part-{time.time_ns()}-r{rank}.pt",
                   {"keys": keys, "embeddings": embeddings.float().cpu().contiguous()})


def named(error: ImageDecodeError, specs: Sequence[ItemSpec]) -> ImageDecodeError:
    """`error` led by where the item holding its image was read (set, file, row, field): an unreadable
    image is met only when encoding, long after its row was read."""
    users = [s.where for s in specs if s.where and error.image in {
        ref.name for ref in (s.image, *(s.video or ())) if ref is not None}]
    return ImageDecodeError(f"{users[0]}: {error}", error.image) if users else error


def _loaded(batches: list[list[ItemSpec]], workers: int) -> Iterator[list[Item]]:
    """The batches as `Item`s, images decoded by a thread pool one batch ahead of the model; video frames
    stay paths (the adapter decodes only the frames it keeps)."""

    def load(specs: list[ItemSpec]) -> list[Item]:
        try:
            images = list(pool.map(lambda s: s.image and load_image(s.image), specs))
        except ImageDecodeError as error:
            raise named(error, specs) from None
        return [Item(s.instruction, s.text, image, s.prompt, s.video and tuple(f.path for f in s.video))
                for s, image in zip(specs, images, strict=True)]

    with ThreadPoolExecutor(max(1, workers)) as pool, ThreadPoolExecutor(1) as ahead:
        pending = [ahead.submit(load, batch) for batch in batches[:1]]
        for nxt in range(1, len(batches) + 1):
            current = pending.pop().result()
            pending += [ahead.submit(load, batch) for batch in batches[nxt : nxt + 1]]
            yield current


def _agreed_missing(missing: list[int]) -> list[int]:
    """Items missing on ANY rank (caches may differ between nodes): every rank must split the same list."""
    everyone: list[list[int]] = [[] for _ in range(rank_and_world()[1])]
    dist.all_gather_object(everyone, missing)
    return sorted(set().union(*everyone))


@torch.no_grad()
def encode(items: Sequence[ItemSpec], embed: Embed, *, batch_size: int = 16,
           cache: EmbeddingCache | None = None, namespace: str = "", flush_every: int = 1024,
           workers: int = 4, progress: bool = False, desc: str = "encode") -> Tensor:
    """Embeddings (n, D) float32 on CPU of `items`, row i for item i; embed is called once per batch.

    Items must be distinct (a `SetBuilder` interns them). Every rank of an initialised process group
    must call this with the same items; each returns all n rows. Every rank calls `embed` equally often, a
    rank without a batch left calling `embed([])`: a sharded model's every forward is a collective (see
    `Encoder.embed`).
    """
    rank, size = rank_and_world()
    keys = [item_key(item) for item in items] if cache is not None else []
    known = cache.lookup(namespace, keys) if cache is not None else {}
    missing = [i for i in range(len(items)) if not keys or keys[i] not in known]
    if size > 1 and cache is not None:
        missing = _agreed_missing(missing)
    order = [missing[i] for i in length_order([items[i] for i in missing])]  # longest first: OOM shows early
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine = batches[rank::size]  # interleaved, so every rank gets long and short batches alike

    done: list[int] = []  # item rows computed here, in the order of `chunks`
    chunks: list[Tensor] = []
    unsaved: list[tuple[list[int], Tensor]] = []  # computed since the last cache write

    def save() -> None:
        if cache is not None and unsaved:
            cache.write(namespace, [keys[i] for rows, _ in unsaved for i in rows],
                        torch.cat([chunk for _, chunk in unsaved]), rank)
        unsaved.clear()

    bar = tqdm(total=sum(map(len, mine)), desc=desc, unit="item", disable=not progress or rank != 0,
               leave=False)
    try:
        for rows, batch in zip(mine, _loaded([[items[i] for i in b] for b in mine], workers), strict=True):
            try:
                out = embed(batch)  # decodes the video frames it keeps
            except ImageDecodeError as error:
                raise named(error, [items[i] for i in rows]) from None
            if out.ndim != 2 or out.shape[0] != len(batch):
                raise ValueError(f"embed returned shape {tuple(out.shape)} for a batch of {len(batch)} items")
            chunks.append(out.float().cpu())
            done += rows
            unsaved.append((rows, chunks[-1]))
            bar.update(len(rows))
            if sum(len(r) for r, _ in unsaved) >= flush_every:
                save()
        for _ in range(len(batches[0::size]) - len(mine)):  # as many rounds as rank 0, which has most
            embed([])
    finally:
        bar.close()
        save()  # keep what was computed, even when interrupted

    shares = [(done, torch.cat(chunks) if chunks else torch.empty(0, 0))]
    if size > 1:
        local, shares = shares[0], [None] * size
        dist.all_gather_object(shares, local)
    computed = {i: row for rows, embeddings in shares for i, row in zip(rows, embeddings, strict=True)}
    embeddings = [computed[i] if i in computed else known[keys[i]] for i in range(len(items))]
    return torch.stack(embeddings) if embeddings else torch.empty(0, 0)

