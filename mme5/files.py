"""Files that readers never see half written: written under a temporary name beside the target, flushed to
disk, then renamed over it (a rename within one folder is atomic; a copy across filesystems is not).

    with atomic_write(path) as f:        # text; "wb" for bytes
        f.write(...)
    write_json(path, payload)
    save_torch(path, payload)

A crash leaves the old file (or none) plus at most a `.<name>.<random>.tmp` beside it, which
`remove_stale(folder)` clears at the next start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


class AtomicFile:
    """A file being written to a temporary name in its target's folder; `commit` renames it into place.

    For writers that open and finish a file in different calls (a shard writer); `atomic_write` is the
    context-manager form.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", encoding: str = "utf-8"):
        if "w" not in mode:
            raise ValueError(f"AtomicFile writes a new file; mode must contain 'w', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TMP_SUFFIX)
        text = "b" not in mode
        self.file: IO[Any] = os.fdopen(fd, mode, encoding=encoding if text else None,
                                       newline="\n" if text else None)

    def commit(self) -> Path:
        """Flush to disk and rename over the target, durably (the folder entry is synced too); returns the
        target."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Drop what was written; the target is left as it was."""
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """An open file whose content replaces `path` when the block ends without an exception."""
    target = AtomicFile(path, mode, encoding)
    try:
        yield target.file
    except BaseException:
        target.discard()
        raise
    target.commit()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames and new names in `folder` durable (a crash after a rename can otherwise lose it).
    Filesystems that cannot sync a folder (some network ones) are left as they are."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> None:
    """`payload` as UTF-8 JSON (non-ASCII kept as is), atomically."""
    with atomic_write(path) as file:
        file.write(json.dumps(payload, ensure_ascii=False, indent=indent, default=str) + "\n")


def save_torch(path: str | os.PathLike, payload: Any) -> None:
    """`torch.save(payload)` atomically."""
    import torch  # here: the rest of this module is used by processes that never load torch

    try:
        with atomic_write(path, "wb") as file:
            torch.save(payload, file)
    except RuntimeError as error:
        # A full disk surfaces as the zip writer's "unexpected pos" RuntimeError, the OSError (ENOSPC,
        # EIO) only in its context: raise the disk's own error, which says what happened.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, OSError):
            raise cause from None
        raise


def files_fingerprint(files: list[Path], **settings: Any) -> str:
    """Identity of a set of files (resolved paths, sizes, modification times) plus `settings`: cheap, no
    content read; a replaced or moved file changes it."""
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]
    payload = json.dumps({"files": stats, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def remove_stale(folder: str | os.PathLike) -> int:
    """Delete the temporary files that interrupted atomic writes left in `folder`; returns their number."""
    stale = list(Path(folder).glob(f".*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
