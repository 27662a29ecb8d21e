"""Images of an evaluation set, found in folders or read straight from zip archives (no unpacking).

A data set names its images by relative paths. Published layouts disagree on the root those paths start
from (MMEB-eval's parquet paths may or may not carry the `eval_images/` folder of its zip), so a store
tries each of its sources (folders or .zip files) with each of its prefixes, in order, and keeps the
first hit. A hit is an `ImageRef`: where the bytes are and their content identity (part of the embedding
cache key, so a replaced image is encoded again): a zip member's CRC-32 and size, a file's size and
modification time.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from mme5.images import load


class MissingImageError(FileNotFoundError):
    """An image named by a data set is in none of the store's locations."""


@dataclass(frozen=True)
class ImageRef:
    """One image file: a plain file (`archive` None, `path` absolute) or a member of a zip archive."""

    archive: str | None
    path: str
    identity: str  # "crc32:<hex>:<bytes>" (zip member) or "stat:<bytes>:<mtime ns>" (file)

    @property
    def name(self) -> str:
        """How messages name it: the path, or `<archive>!<member>`."""
        return self.path if self.archive is None else f"{self.archive}!{self.path}"


@lru_cache(maxsize=8)
def _zip(path: str) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """An open archive and its members by name, once per process (zipfile reads are thread-safe)."""
    archive = zipfile.ZipFile(path)
    return archive, {info.filename: info for info in archive.infolist() if not info.is_dir()}


def load_image(ref: ImageRef) -> Image.Image:
    """The image decoded in its own mode (`mme5.images.load`)."""
    if ref.archive is None:
        return load(ref.path)
    return load(_zip(ref.archive)[0].read(ref.path), where=ref.name)


class ImageStore:
    """Resolves a data set's relative image paths against folders and zip archives.

    sources: folders or .zip files, searched in order; prefixes: tried in order under each source
    ("" first means the path as written).
    """

    def __init__(self, sources: list[str | Path], prefixes: tuple[str, ...] = ("",)):
        self.sources = [Path(s).resolve() for s in sources]
        self.prefixes = prefixes
        self._refs: dict[str, ImageRef] = {}

    def ref(self, path: str) -> ImageRef:
        """The image at relative `path`; `MissingImageError` lists every location tried."""
        if path not in self._refs:
            self._refs[path] = self._find(path)
        return self._refs[path]

    def _find(self, path: str) -> ImageRef:
        tried = []
        for source in self.sources:
            for prefix in self.prefixes:
                name = prefix + path.lstrip("/")
                if source.suffix == ".zip" and source.is_file():
                    info = _zip(str(source))[1].get(name)
                    if info is not None:
                        return ImageRef(str(source), name, f"crc32:{info.CRC:08x}:{info.file_size}")
                    tried.append(f"{source}!{name}")
                else:
                    file = source / name
                    if file.is_file():
                        stat = file.stat()
                        return ImageRef(None, str(file), f"stat:{stat.st_size}:{stat.st_mtime_ns}")
                    tried.append(str(file))
        raise MissingImageError(f"image {path!r} not found; looked for: {', '.join(tried)}")
