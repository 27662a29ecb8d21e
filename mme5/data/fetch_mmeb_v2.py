"""MMEB-V2 fetched for offline evaluation: the media of TIGER-Lab/MMEB-V2 unpacked as VLM2Vec's
`experiments/public/data/download_data.sh` does, and the hub annotation repos its loaders read at
evaluation time saved beside them.

    python -m mme5.data.fetch --dataset mmeb-v2 --out DIR [--modalities image video visdoc] [--revision R]

Layout of DIR (what `mme5.eval.mmeb_v2.readers` and `.visdoc` read):
    image-tasks/...                       image-tasks/mmeb_v1.tar.gz unpacked, its MMEB/ folder moved up
    video-tasks/frames/video_cls/<set>/   video_cls.tar.gz unpacked into video_cls/
    video-tasks/frames/video_ret/<set>/   video_ret.tar.gz unpacked into video_ret/
    video-tasks/frames/video_mret/<set>/  video_mret.tar.gz unpacked in frames/ (it holds video_mret/)
    video-tasks/frames/video_qa/<set>/    video_qa.tar.gz-00 .. -04 joined and unpacked in frames/
    annotations/<owner>/<name>/...        the parquet files of each image / video set's annotation repo
                                          (ziyjiang/MMEB_Test_Instruct, VLM2Vec/<set>, lmms-lab/YouCook2),
                                          as published: <config>/<split>-*.parquet (default config: data/)
    visdoc-tasks/<set>/...                the parquet files of each visual-document set's repo (queries/,
                                          corpus/, qrels/), and each corpus page written as a file named
                                          by `visdoc.page_file` (the reference's image_root)
The archives stay beside what they unpacked (each with a `<archive>.unpacked` marker naming the archive's
identity, so a rerun does not unpack it again, but does unpack one the hub replaced); raw videos
(video-tasks/videos) are not fetched: the readers use the frames.

Resumable: every repo goes through `mme5.data.fetch.download` (a rerun fetches only what is missing);
pages already written are kept. `--revision` pins TIGER-Lab/MMEB-V2; the annotation repos are taken at
their newest commit (the reference loads them so). Only parquet annotation files are fetched: a repo
that publishes its rows in another format is reported as naming no file.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from mme5.data.fetch import (
    COMMAND,
    Fetched,
    _check_inside,
    download,
    fetch_identity,
    fetched_before,
    incomplete,
    mark_unpacked,
    unpacked_before,
    unpacking,
)
from mme5.eval.mmeb_v2.registry import MODALITIES, V2Set, sets_of
from mme5.eval.mmeb_v2.visdoc import page_file
from mme5.eval.rows import parquet_files
from mme5.files import claim_folder

MEDIA_REPO = "TIGER-Lab/MMEB-V2"
# What each modality takes of the media repo; visual documents none: their pages come in the corpus parquet.
MEDIA = {"image": ["image-tasks/*"], "video": ["video-tasks/frames/*"], "visdoc": []}


@dataclass(frozen=True)
class Archive:
    """One tarball of download_data.sh: its part files (joined in order), the folder it is unpacked
    into, and a leading folder its members are moved out of."""

    parts: str  # a glob under the output folder
    into: str
    strip: str = ""


ARCHIVES = (
    Archive("image-tasks/mmeb_v1.tar.gz", "image-tasks", strip="MMEB/"),
    Archive("video-tasks/frames/video_cls.tar.gz", "video-tasks/frames/video_cls"),
    Archive("video-tasks/frames/video_ret.tar.gz", "video-tasks/frames/video_ret"),
    Archive("video-tasks/frames/video_mret.tar.gz", "video-tasks/frames"),
    Archive("video-tasks/frames/video_qa.tar.gz-0*", "video-tasks/frames"),
)


def fetch_mmeb_v2(out: str | Path, modalities: Sequence[str] = MODALITIES, revision: str | None = None,
                  token: str | None = None, overwrite: bool = False) -> Fetched:
    """Download and unpack the media and annotations of `modalities` into `out` (layout above)."""
    modalities = sorted(set(modalities))
    with claim_folder(out, COMMAND, fetch_identity("mmeb-v2", revision), overwrite=overwrite,
                      adopt=fetched_before, ways_out="pass --overwrite to replace it, or choose another --out"
                      ) as folder:
        online, files = True, {}
        try:
            for repo, target, patterns, pinned in requests(modalities, revision):
                got = download(repo, folder.work / target, patterns, pinned, token)
                if not got:
                    raise ValueError(f"{repo}: no file matches {patterns}; is it still published so?")
                files |= {str(Path(target) / path): size for path, size in got.items()}
        except ConnectionError:
            done, recorded = folder.record.get("subsets") or [], folder.record.get("files", {})
            if not set(modalities) <= set(done) or incomplete(folder.work, recorded):
                raise  # not a request completed before, with every file still there
            online = False
        for archive in ARCHIVES:
            unpack_parts(folder.work, archive)
        for spec in sets_of("visdoc") if "visdoc" in modalities else ():
            write_pages(folder.work / "visdoc-tasks" / spec.name, spec)
        folder.complete(files={**folder.record.get("files", {}), **files},
                        subsets=sorted({*(folder.record.get("subsets") or []), *modalities}))
    return Fetched(Path(out), online)


def requests(modalities: Sequence[str], revision: str | None
             ) -> Iterator[tuple[str, str, list[str], str | None]]:
    """(repo, target folder, allow patterns, revision) of every download the modalities need, each repo
    once (image sets share one annotation repo)."""
    media = [pattern for modality in modalities for pattern in MEDIA[modality]]
    if media:
        yield MEDIA_REPO, ".", media, revision
    seen = set()
    for spec in (s for modality in modalities for s in sets_of(modality)):
        target = annotation_folder(spec)
        if target not in seen:
            seen.add(target)
            yield spec.annotations.repo, target, ["*.parquet"], None


def annotation_folder(spec: V2Set) -> str:
    """Where a set's annotation repo is saved, relative to the output folder."""
    if spec.modality == "visdoc":
        return f"visdoc-tasks/{spec.name}"
    return f"annotations/{spec.annotations.repo}"


class _Joined(io.RawIOBase):
    """The part files of a split archive read one after another, as `cat part-0* |` gives them."""

    def __init__(self, parts: Sequence[Path]):
        self._files = iter(parts)
        self._current = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._current is None:
                path = next(self._files, None)
                if path is None:
                    return 0
                self._current = open(path, "rb")  # noqa: SIM115 - closed when read to its end
            n = self._current.readinto(buffer)
            if n:
                return n
            self._current.close()
            self._current = None


def unpack_parts(root: Path, archive: Archive) -> bool:
    """Unpack `archive` (if its parts are there and it was not unpacked before) as download_data.sh does;
    links and members that would land outside `into` are refused. Returns whether it unpacked now."""
    parts = sorted(p for p in root.glob(archive.parts) if not p.name.endswith(".unpacked"))  # not the marker
    if not parts:
        return False
    if unpacked_before(parts):
        return False
    target = (root / archive.into).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with unpacking(" + ".join(map(str, parts))), \
            tarfile.open(fileobj=io.BufferedReader(_Joined(parts)), mode="r|*") as bundle:
        bundle.extractall(target, filter=_member_filter(archive, parts[0], target))
    mark_unpacked(parts)
    return True


def _member_filter(archive: Archive, source: Path, target: Path):
    """tarfile's `data` filter after refusing links and escapes, `archive.strip` removed from names."""
    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        if member.issym() or member.islnk():
            raise ValueError(f"{source}: member {member.name!r} is a link; refused")
        name = member.name
        if archive.strip:
            if name.rstrip("/") == archive.strip.rstrip("/"):
                return None  # the folder being moved out of
            name = name.removeprefix(archive.strip)
        _check_inside(target, name, source)
        return tarfile.data_filter(member.replace(name=name, deep=False), path)
    return keep


def write_pages(folder: Path, spec: V2Set) -> int:
    """Each corpus page of a visual-document set as the file its loader saves (`page_file`; the image
    re-encoded by the name's extension, as `PIL.Image.save` does there); pages already there are kept.
    Returns how many were written now."""
    written = 0
    for file in parquet_files(folder / "corpus", spec.annotations.split):
        batches = pq.ParquetFile(file).iter_batches(batch_size=64, columns=["corpus-id", "image"])
        for i, row in enumerate(row for batch in batches for row in batch.to_pylist()):
            where = f"{file} row {i} (corpus-id {row['corpus-id']!r})"
            name = page_file(spec.name, str(row["corpus-id"]))
            if Path(name).name != name:  # a separator in the id: the page would land elsewhere
                raise ValueError(f"{where}, field corpus-id: names no file in {folder} ({name!r})")
            if not (folder / name).exists():
                write_page(where, row["image"], folder / name)
                written += 1
    return written


def write_page(where: str, image: dict | None, page: Path) -> None:
    """A corpus row's image bytes decoded and saved as `page` (encoded by its extension), whole or not at
    all: a page cut by a kill would be taken for a finished one by the next run."""
    if not image or not image.get("bytes"):
        raise ValueError(f"{where}, field image: holds no image bytes")
    partial = page.with_name(f".{page.name}.partial{page.suffix}")
    try:
        with Image.open(io.BytesIO(image["bytes"])) as opened:
            opened.save(partial)
        os.replace(partial, page)
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # the disk's (full, read-only), not the image's: PIL's own OSErrors carry no errno
        raise ValueError(f"{where}, field image: not an image PIL reads and saves as {page.suffix} "
                         f"({type(error).__name__}: {error})") from None
    finally:
        partial.unlink(missing_ok=True)
