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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else the usual 022."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


UMASK = _umask()


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
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes it private; the file gets what open() would give it
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


# ----------------------------------------------------------------------------- output folders: one owner each

OWNER_RECORD = ".mme5-owner.json"  # in an output folder: what produced it
OWNER_FORMAT = 1


class OutputFolderError(Exception):
    """An output folder cannot be claimed: held by another process, or holding another output."""


class FolderInUse(OutputFolderError):
    """Another live process holds the folder's lock."""


class FolderHoldsOtherOutput(OutputFolderError):
    """The folder holds the output of another command or of other settings."""


def path_fingerprint(*paths: str | os.PathLike) -> str:
    """Identity of files and folders (every file below a folder) by path, size and modification time.
    Owner records are left out: they say who wrote a folder, and change when it is claimed again."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += [f for f in path.rglob("*") if f.is_file() and f.name != OWNER_RECORD] if path.is_dir() \
            else [path]
    return files_fingerprint([f for f in files if f.exists()], missing=[str(p) for p in files
                                                                       if not p.exists()])


def comparable(value: Any) -> Any:
    """`value` as its JSON form, so that a tuple and a list, or a Path and its string, compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def identity_changes(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded value, current value)} for every setting whose value differs (a missing key is None).
    A group of settings on both sides (a dict) is compared setting by setting, under dotted keys: a change
    names the setting that changed, and a setting added to a group later is None in older records."""
    return _changes(comparable(recorded), comparable(current), "")


def _changes(recorded: dict[str, Any], current: dict[str, Any], prefix: str) -> dict[str, tuple[Any, Any]]:
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes |= _changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes[f"{prefix}{key}"] = (old, new)
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 120) -> str:
    """`key: old → new` for each change, long values shortened."""
    def short(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return "; ".join(f"{key}: {short(old)} (recorded) → {short(new)} (now)"
                     for key, (old, new) in changes.items())


class FolderLock:
    """An exclusive, non-blocking lock on an output folder: `.<name>.lock` beside it (so that it survives the
    folder being swapped for its replacement), held with `flock` and naming its holder.

    The kernel releases a dead process's `flock`, so a lock left by a killed run is free again; its file
    still names the dead holder, which the next owner reports as a stale lock taken over.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.lock"
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None  # the holder a taken-over lock named

    def acquire(self, command: str) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderInUse(f"{self.folder} is being written by {describe_holder(holder)}; wait for it "
                                  f"to finish, or stop it (its lock: {self.path})") from None
            # The file may have been removed (a release) between our open and our lock: lock the one in place.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous.get("pid"):
            self.stale = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_this_holder(command)).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Free the lock (its file is removed first, so no one reads a holder that is gone)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _this_holder(command: str) -> dict[str, Any]:
    import datetime
    import socket

    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}


def describe_holder(holder: dict[str, Any]) -> str:
    """`pid 12 on host h since <time> (command)`, as far as the lock file says."""
    if not holder:
        return "another process (its lock names no holder yet)"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command')}{job})")


class OutputFolder:
    """The claim of one command on one output folder: its lock, and the record of what produced it.

        with claim_folder(out, "mme5.eval", {"model": ..., "data": ...}, overwrite=args.overwrite) as folder:
            write(folder.work)      # the folder itself, or a sibling that replaces it when complete
            folder.complete()

    state: "new" (nothing there), "resume" (the same command and identity: carry on) or "replace" (an
    output there, `overwrite` given: `work` is a fresh sibling folder, swapped in by `complete`, so the folder
    holds the old output or the new one, never a mix). With `outputs` (globs of what the command writes in a
    folder that holds other things too, e.g. a run folder beside its data) there is no sibling: replacing
    removes those outputs at the claim.
    """

    def __init__(self, path: Path, command: str, identity: dict[str, Any], overwrite: bool, resume: bool,
                 ways_out: str, outputs: tuple[str, ...] | None, adopt: Callable[[Path], bool] | None):
        # Absolute: `--out .` has no name to put its lock and replacement beside it under.
        self.path, self.command, self.identity = Path(os.path.abspath(path)), command, comparable(identity)
        self.outputs = outputs
        self.lock = FolderLock(self.path)
        self.lock.acquire(command)
        try:
            self.state, self.work, self.record = self._decide(overwrite, resume, ways_out, adopt)
            # Read before the record below marks the folder in progress: a command resuming its complete
            # output can say so instead of doing the work again.
            self.was_complete = self.state == "resume" and bool(self.record.get("complete"))
            self._write_record(complete=False)
        except BaseException:
            self.lock.release()
            raise

    # -- the decision

    def _decide(self, overwrite: bool, resume: bool, ways_out: str, adopt: Callable[[Path], bool] | None
                ) -> tuple[str, Path, dict[str, Any]]:
        _recover_swap(self.path)
        present = self._present()
        if not present:  # nothing there (at most the record of a claim that wrote nothing; outputs removed)
            return "new", self.path, {}
        recorded = read_owner(self.path)
        if recorded is None and adopt is not None and adopt(self.path):
            recorded = {"command": self.command, "identity": self.identity, "adopted": True}
        problem = self._mismatch(recorded, present)
        if recorded is None and self.outputs is None:  # not ours to replace: they may be someone's data
            raise FolderHoldsOtherOutput(f"{problem}; --overwrite replaces only what an mme5 command wrote: "
                                         "remove them yourself, or choose another folder")
        if problem is None and not overwrite:
            if resume:
                return "resume", self.path, recorded or {}
            problem = f"{self.path} holds an earlier output of `{self.command}`"
        if not overwrite:
            ways_out = ways_out or "pass --overwrite to replace it, or choose another folder"
            raise FolderHoldsOtherOutput(f"{problem}; {ways_out}")
        if self.outputs is not None:
            for path in present:
                remove_path(path)
            (self.path / OWNER_RECORD).unlink(missing_ok=True)
            return "replace", self.path, {}
        if Path.cwd() == self.path or self.path in Path.cwd().parents:
            raise OutputFolderError(f"{self.path} holds the current folder, which replacing it would remove; "
                                    "run from elsewhere or choose another folder")
        staging = self.path.parent / f".{self.path.name}.replacing"
        staged = read_owner(staging)
        if staged is not None and self._mismatch(staged, [staging]) is None:
            return "replace", staging, staged  # an interrupted replacement, resumed
        remove_path(staging)
        return "replace", staging, {}

    def _present(self) -> list[Path]:
        """The command's outputs found in the folder (every entry but the owner record, without `outputs`)."""
        if not self.path.is_dir():
            return []
        if self.outputs is None:
            return [p for p in self.path.iterdir() if p.name != OWNER_RECORD]
        return sorted({p for pattern in self.outputs for p in self.path.glob(pattern)})

    def _mismatch(self, recorded: dict[str, Any] | None, present: list[Path]) -> str | None:
        if recorded is None:
            names = ", ".join(sorted(p.name for p in present)[:5])
            return (f"{self.path} holds files that no mme5 command recorded as its output ({names}"
                    f"{', ...' if len(present) > 5 else ''})")
        if recorded.get("command") != self.command:
            return f"{self.path} holds the output of `{recorded.get('command')}`, not of `{self.command}`"
        changes = identity_changes(recorded.get("identity", {}), self.identity)
        if changes:
            return (f"{self.path} holds the output of `{self.command}` with other settings: "
                    f"{describe_changes(changes)}")
        return None

    # -- the record

    def _write_record(self, complete: bool, **extra: Any) -> None:
        import datetime
        import sys

        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.record = {**self.record, "format": OWNER_FORMAT, "command": self.command,
                       "identity": self.identity, "argv": sys.argv, "updated": now, "complete": complete,
                       "created": self.record.get("created", now), **extra}
        # ASCII JSON: a path or argument that is not valid UTF-8 (a surrogate escape) is recorded escaped.
        with atomic_write(self.work / OWNER_RECORD) as file:
            file.write(json.dumps(self.record, indent=2, default=str) + "\n")

    def complete(self, **extra: Any) -> None:
        """Mark the output complete (`extra`: facts to record, e.g. counts) and swap a replacement in."""
        self._write_record(complete=True, **extra)
        if self.work != self.path:
            swap_in(self.work, self.path)
            self.work = self.path

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim_folder(path: str | os.PathLike, command: str, identity: dict[str, Any], *, overwrite: bool = False,
                 resume: bool = True, ways_out: str = "", outputs: tuple[str, ...] | None = None,
                 adopt: Callable[[Path], bool] | None = None, inputs: Iterable[str | os.PathLike] = ()
                 ) -> OutputFolder:
    """Lock `path` for `command` and check that it is new or holds this command's output of `identity`.

    Refused (before anything is written): a folder another live process holds (`FolderInUse`, naming the
    holder), or one holding another output (`FolderHoldsOtherOutput`, naming the keys that differ and
    `ways_out`) unless `overwrite`. `resume=False` (a command that starts afresh) refuses its own earlier
    output too. `overwrite` replaces whatever output is there, even an equal one. A lock whose holder died
    is taken over with a warning. `adopt(path)` recognises this command's own output of `identity` written
    before owner records existed (no record): it is resumed as such instead of refused. `inputs`: the paths
    the command reads; a folder that is or holds one is refused (replacing it would delete them).
    """
    import warnings

    check_apart(Path(path), inputs)
    try:
        folder = OutputFolder(Path(path), command, identity, overwrite, resume, ways_out, outputs, adopt)
    except OSError as error:  # a read-only folder, or a parent that cannot hold the lock beside it
        raise OutputFolderError(f"cannot write {path} or its lock beside it ({error.strerror}: "
                                f"{error.filename}); choose a folder you can write") from None
    if folder.lock.stale:
        warnings.warn(f"{folder.path}: took over the lock of {describe_holder(folder.lock.stale)}, which no "
                      "longer runs (it was stopped before it finished)", stacklevel=2)
    return folder


def check_apart(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output folder that is a file, or is or holds one of the command's `inputs`."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out} is a file; the output goes into a folder")
    target = out.resolve()
    for name in inputs:
        path = Path(name).resolve()
        if Path(name).exists() and (path == target or target in path.parents):
            raise OutputFolderError(f"{out} is or holds the input {name}: writing or replacing it would "
                                    "change what is read; write into a folder of its own")


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner record of an output folder, or None; an unreadable one is named."""
    record = path / OWNER_RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise OutputFolderError(f"{record}: unreadable owner record ({error}); remove it to let the command "
                                "decide afresh") from None


def swap_in(new: Path, target: Path) -> None:
    """Replace folder `target` by folder `new` (two renames; `_recover_swap` finishes one cut in between)."""
    old = target.parent / f".{target.name}.replaced"
    remove_path(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    remove_path(old)


def _recover_swap(target: Path) -> None:
    """A swap killed between its renames left `target` missing: put the complete replacement in, else the
    old output back."""
    old, new = target.parent / f".{target.name}.replaced", target.parent / f".{target.name}.replacing"
    if target.exists() or not old.exists():
        if target.exists():
            remove_path(old)  # the swap finished; only removing the old output was cut
        return
    staged = read_owner(new) if new.exists() else None
    os.replace(new if staged and staged.get("complete") else old, target)
    remove_path(old)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, if present."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
