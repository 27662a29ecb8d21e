"""Download a published data set from the Hugging Face Hub, unpack its image archives, say what to run next.

    python -m mme5.data.fetch --dataset mme5-hardneg --out data/raw/mmE5-MMEB-hardneg [--subset ImageNet_1K]
    python -m mme5.data.fetch --dataset mmeb-eval --out data/MMEB-eval
    python -m mme5.data.fetch --dataset mmeb-v2 --out data/MMEB-V2 [--modalities image video visdoc]

Files come through `huggingface_hub.snapshot_download` into `--out` (resumable: a rerun fetches only what is
missing; `--subset` narrows it to the paths naming those subsets, plus the dataset card; a subset naming no
file is an error). Archives of training images (.zip, .tar, .tar.gz, .tgz) are unpacked beside themselves
once (a `<archive>.unpacked` marker records it, with the archive's identity: one the hub replaced is unpacked
again; members that would land outside the folder are refused);
evaluation sets keep their zips, which `mme5.eval` reads directly. The licence is read from the dataset card.

`--out` is claimed for one data set and revision (`mme5.files.claim_folder`): fetching more subsets of it
into the same folder adds them; another data set or revision is refused unless `--overwrite`. Success is
said only when every requested file is there at the size the hub lists (recorded in the folder's owner
record). Offline (no network, or `HF_HUB_OFFLINE=1`) a request that an earlier fetch completed and whose
files are all still there succeeds, saying it was not checked against the hub; any other stops at once and
says how to bring the files over.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mme5.eval.mmeb_v2.registry import MODALITIES
from mme5.files import OutputFolder, OutputFolderError, atomic_write, claim_folder
from mme5.hub import card_licence
from mme5.settings import command_parser

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
COMMAND = "mme5.data.fetch"
ALL = "*"  # the subsets recorded for a fetch of the whole data set


@dataclass(frozen=True)
class Published:
    """A published data set: its hub id, what it is, and whether its image archives are unpacked."""

    repo_id: str
    about: str
    unpack: bool  # training images are read as files by the converter; evaluation reads zips as they are
    role: str  # "train" (convert it) or "mmeb" / "xtd" (evaluate on it)


DATASETS = {
    "mmeb-train": Published("TIGER-Lab/MMEB-train", "MMEB's 20 training subsets (original / "
                            "diverse_instruction / train splits), no hard negatives", True, "train"),
    "mme5-hardneg": Published("intfloat/mmE5-MMEB-hardneg", "the MMEB-train subsets (+ TAT-DQA, ArxivQA, "
                              "InfoSeek) with mined hard negatives, as mmE5 trains", True, "train"),
    "mme5-synthetic": Published("intfloat/mmE5-synthetic", "mmE5's synthetic multilingual data "
                                "(Classification, Retrieval, VQA; ~560K rows)", True, "train"),
    "mmeb-eval": Published("TIGER-Lab/MMEB-eval", "MMEB's 36 evaluation sets (+ CIFAR-100), images in zips",
                           False, "mmeb"),
    "mmeb-v2": Published("TIGER-Lab/MMEB-V2", "MMEB-V2's 78 sets: image, video-frame and visual-document "
                         "media and the annotation repos its loaders read (layout: mme5.data.fetch_mmeb_v2)",
                         True, "mmeb-v2"),
    "xtd10": Published("Haon-Chen/XTD-10", "XTD-10 in mmE5's row format (text→image, 10 languages)", False,
                       "xtd"),
}


@dataclass
class Fetched:
    """What a fetch left: the folder, and whether it was checked against the hub (not when offline)."""

    folder: Path
    online: bool


def fetch_identity(name: str, revision: str | None) -> dict[str, str | None]:
    """What an output folder of `fetch` holds: one data set at one revision (its subsets may grow)."""
    return {"dataset": DATASETS[name].repo_id, "revision": revision}


def fetch(name: str, out: str | Path, subsets: list[str] | None = None, revision: str | None = None,
          token: str | None = None, overwrite: bool = False) -> Fetched:
    """Download data set `name` into `out` (only `subsets` if given) and unpack its training archives.

    Raises ConnectionError (with what to do) when the hub cannot be reached and the request was not
    completed before, ValueError for a subset that names no file, OutputFolderError for a folder that holds
    another output."""
    subsets = sorted(set(subsets)) if subsets else None
    with claim_folder(out, COMMAND, fetch_identity(name, revision), overwrite=overwrite, adopt=fetched_before,
                      ways_out="pass --overwrite to replace it, or choose another --out") as folder:
        online = True
        try:
            files = download(DATASETS[name].repo_id, folder.work, request_patterns(subsets), revision, token,
                             subsets)
        except ConnectionError:
            if not completed_before(folder, subsets):
                raise
            online, files = False, {}
        if DATASETS[name].unpack:
            for archive in archives(folder.work):
                unpack(archive)
        folder.complete(files={**folder.record.get("files", {}), **files},
                        subsets=merged_subsets(folder.record.get("subsets"), subsets))
    return Fetched(Path(out), online)


def fetched_before(folder: Path) -> bool:
    """A folder that huggingface_hub downloaded into before fetch recorded its owner (its local-dir cache is
    there): resumed, every file checked against the hub's listing, instead of downloaded again."""
    return (folder / ".cache" / "huggingface").is_dir()


def download(repo_id: str, folder: Path, patterns: list[str] | None, revision: str | None, token: str | None,
             subsets: list[str] | None = None) -> dict[str, int | None]:
    """Fetch the files of `repo_id` matching `patterns` (None: all) into `folder`; returns {path: size} of
    every one, each checked present at the size the hub lists (huggingface_hub alone returns a non-empty
    folder as it is when offline). `subsets`: the request's, each must name a file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError, LocalEntryNotFoundError

    try:  # the listing first: it fails when the hub cannot be reached, whatever the folder holds
        listing = snapshot_download(repo_id, repo_type="dataset", local_dir=folder, allow_patterns=patterns,
                                    revision=revision, token=token, dry_run=True)
    except (DryRunError, LocalEntryNotFoundError) as error:
        cause = error.__cause__ or error
        reason = f"{type(cause).__name__}: {(str(cause) or 'no detail').splitlines()[0]}"
        raise ConnectionError(
            f"{repo_id}: the Hugging Face Hub cannot be reached from here ({reason}). Fetch it on a machine "
            "with internet (same command), copy the folder here, and rerun: files already there are kept"
        ) from None
    files = {info.filename: info.file_size for info in listing}
    unmatched = [s for s in subsets or [] if not any(requested(path, [s]) and path != "README.md"
                                                     for path in files)]
    if unmatched:
        raise ValueError(f"{repo_id}: --subset {' '.join(unmatched)} names no file of the data set (subsets "
                         "are folder and file names of the repository, e.g. ImageNet_1K)")
    commit = listing[0].commit_hash if listing else revision
    snapshot_download(repo_id, repo_type="dataset", local_dir=folder, allow_patterns=patterns,
                      revision=commit, token=token)
    if missing := incomplete(folder, files):
        raise OSError(f"{folder}: the download left {len(missing)} file(s) missing or short: "
                      f"{', '.join(missing[:5])}; delete them and rerun to fetch them again")
    return files


def incomplete(folder: Path, files: dict[str, int | None]) -> list[str]:
    """The listed files that are not in `folder` at their listed size (a size the hub does not give is not
    compared)."""
    return [path for path, size in sorted(files.items()) if not (folder / path).is_file()
            or (size is not None and (folder / path).stat().st_size != size)]


def merged_subsets(recorded: str | list[str] | None, subsets: list[str] | None) -> str | list[str]:
    """The subsets fetched completely so far, this request's added (ALL: the whole data set)."""
    return ALL if recorded == ALL or subsets is None else sorted({*(recorded or []), *subsets})


def request_patterns(subsets: list[str] | None) -> list[str] | None:
    """The hub paths a request takes: those naming a subset, and the card (None: every path)."""
    return [*(f"*{subset}*" for subset in subsets), "README.md"] if subsets else None


def requested(path: str, subsets: list[str] | None) -> bool:
    return subsets is None or any(fnmatch.fnmatch(path, pattern) for pattern in request_patterns(subsets))


def completed_before(folder: OutputFolder, subsets: list[str] | None) -> bool:
    """Whether an earlier fetch into `folder` completed this request and its files are all still there at
    their sizes: what an offline rerun may call done."""
    recorded = folder.record.get("subsets")
    if not (recorded == ALL or (subsets is not None and set(subsets) <= set(recorded or []))):
        return False
    files = {path: size for path, size in folder.record.get("files", {}).items() if requested(path, subsets)}
    return not incomplete(folder.work, files)


def archives(folder: Path) -> list[Path]:
    """The image archives under `folder` (not huggingface_hub's own cache folder)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(ARCHIVES)
                  and ".cache" not in p.relative_to(folder).parts)


def unpack(archive: Path) -> bool:
    """Extract `archive` beside itself unless this archive was before; returns whether it extracted now."""
    if unpacked_before([archive]):
        return False
    target = archive.parent.resolve()
    with unpacking(str(archive)):
        _extract(archive, target)
    mark_unpacked([archive])
    return True


MARKER = "unpacked"  # the first word of an `<archive>.unpacked` marker; the archive's identity follows


def _marker(parts: Sequence[Path]) -> Path:
    return parts[0].with_name(parts[0].name + ".unpacked")


def archive_identity(parts: Sequence[Path], edge: int = 1 << 20) -> str:
    """The part files' names, sizes, first and last MiB: changes when the hub publishes another archive under
    the same name (a rerun downloads it), survives copying the folder (which changes modification times)."""
    digest = hashlib.sha1()
    for part in parts:
        size = part.stat().st_size
        digest.update(f"{part.name}:{size}:".encode())
        with open(part, "rb") as file:
            digest.update(file.read(edge))
            file.seek(max(0, size - edge))
            digest.update(file.read(edge))
    return digest.hexdigest()


def unpacked_before(parts: Sequence[Path]) -> bool:
    """Whether this archive (these parts) was unpacked: its marker names its identity. A marker of an
    earlier version holds no identity and is trusted. One of another archive is said (a warning): the new
    one is unpacked over the old one's files, and those it lacks stay."""
    marker = _marker(parts)
    if not marker.is_file():
        return False
    words = marker.read_text(encoding="utf-8").split()
    if words == [MARKER] or words == [MARKER, archive_identity(parts)]:
        return True
    warnings.warn(f"{parts[0]}: the hub replaced this archive since it was unpacked; unpacking it again over "
                  "the earlier one's files (those it no longer holds stay: delete what it unpacked and rerun "
                  "for a clean copy)", stacklevel=2)
    return False


def mark_unpacked(parts: Sequence[Path]) -> None:
    with atomic_write(_marker(parts)) as file:
        file.write(f"{MARKER} {archive_identity(parts)}\n")


def _extract(archive: Path, target: Path) -> None:
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                _check_inside(target, member, archive)
            bundle.extractall(target)
    else:
        with tarfile.open(archive) as bundle:
            for member in bundle.getmembers():
                _check_inside(target, member.name, archive)
                if member.issym() or member.islnk():
                    raise ValueError(f"{archive}: member {member.name!r} is a link; refused")
            bundle.extractall(target, filter="data")


@contextmanager
def unpacking(name: str) -> Iterator[None]:
    """An archive that cannot be read to its end (cut, damaged, not an archive) becomes a ValueError naming
    it and the way out: the hub client checks sizes, not content, and would keep the bad file."""
    try:
        yield
    except tarfile.FilterError as error:  # a member tarfile's data filter refuses (a device file, ...)
        raise ValueError(f"{name}: member refused ({error})") from None
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as error:
        detail = " ".join(str(error).split())  # tarfile lists each method it tried, one a line
        raise ValueError(f"{name}: a damaged or cut archive ({type(error).__name__}: {detail}); delete its "
                         "file(s) and rerun to download them again") from None


def _check_inside(target: Path, member: str, archive: Path) -> None:
    if not (target / member).resolve().is_relative_to(target):
        raise ValueError(f"{archive}: member {member!r} would be written outside {target}; refused")


def licence(folder: Path) -> str:
    """The dataset card's licence, or a note that the card does not say."""
    return card_licence(folder) or "not stated in the dataset card: check it before use"


def next_steps(name: str, folder: Path) -> list[str]:
    """The commands that use what was fetched."""
    role = DATASETS[name].role
    if role == "mmeb":
        return [f"python -m mme5.eval --model MODEL --benchmark mmeb --mmeb {folder} --out runs/eval/MODEL"]
    if role == "mmeb-v2":
        return [f"python -m mme5.eval --model MODEL --benchmark mmeb-v2 --mmeb-v2 {folder} "
                "--out runs/eval/MODEL"]
    if role == "xtd":
        return [f"python -m mme5.eval --model MODEL --benchmark xtd --xtd {folder} --out runs/eval/MODEL"]
    subsets = sorted({p.parent for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl")
                      and ".cache" not in p.relative_to(folder).parts})
    return [f"python -m mme5.data.convert --input {subset} --images {folder} "
            f"--out data/shards/{folder.name}/{subset.relative_to(folder)}" for subset in subsets]


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(prog="python -m mme5.data.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                        help="; ".join(f"{k}: {v.repo_id}" for k, v in DATASETS.items()))
    parser.add_argument("--out", required=True, type=Path, help="folder to download into")
    parser.add_argument("--subset", nargs="+", help="only these subsets (e.g. ImageNet_1K MSCOCO_t2i)")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES,
                        help="mmeb-v2 only: the modalities to fetch (media and annotations; default: all)")
    parser.add_argument("--revision", help="a branch, tag or commit of the data set")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (another data set or revision)")
    args = parser.parse_args(argv)
    # Each option narrows one kind of fetch; ignored, it would fetch everything (MMEB-V2: hundreds of GB).
    if args.dataset == "mmeb-v2" and args.subset:
        parser.error("--subset narrows the other data sets; MMEB-V2 is fetched by --modalities (its media "
                     "come in one archive per modality), and evaluated by `mme5.eval --subsets`")
    if args.dataset != "mmeb-v2" and args.modalities:
        parser.error(f"--modalities narrows MMEB-V2 only; narrow {args.dataset} with --subset")
    try:
        if args.dataset == "mmeb-v2":
            from mme5.data.fetch_mmeb_v2 import fetch_mmeb_v2
            fetched = fetch_mmeb_v2(args.out, args.modalities or MODALITIES, args.revision,
                                    overwrite=args.overwrite)
        else:
            fetched = fetch(args.dataset, args.out, args.subset, args.revision, overwrite=args.overwrite)
    except (OutputFolderError, OSError, ValueError) as error:  # OSError: offline, unknown repo or revision
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = fetched.folder
    if not fetched.online:
        print(f"note: the hub cannot be reached; every requested file was fetched into {folder} before and "
              "is there at its listed size (not checked for a newer revision)", file=sys.stderr)
    print(f"{DATASETS[args.dataset].repo_id} → {folder} (licence: {licence(folder)})")
    print("next:")
    for command in next_steps(args.dataset, folder):
        print(f"  {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
