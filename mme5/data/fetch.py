"""Download a published data set from the Hugging Face Hub, unpack its image archives, say what to run next.

    python -m mme5.data.fetch --dataset mme5-hardneg --out data/raw/mmE5-MMEB-hardneg [--subset ImageNet_1K]
    python -m mme5.data.fetch --dataset mmeb-eval --out data/MMEB-eval

Files come through `huggingface_hub.snapshot_download` into `--out` (resumable: a rerun fetches only what is
missing; `--subset` narrows it to the paths naming those subsets, plus the dataset card). Archives of
training images (.zip, .tar, .tar.gz, .tgz) are unpacked beside themselves once (a `<archive>.unpacked`
marker records it; members that would land outside the folder are refused); evaluation sets keep their
zips, which `mme5.eval` reads directly. The licence is read from the dataset card. Offline (no network, or
`HF_HUB_OFFLINE=1`) it stops at once and says how to bring the files over.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mme5.files import atomic_write
from mme5.hub import card_licence

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")


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
    "xtd10": Published("Haon-Chen/XTD-10", "XTD-10 in mmE5's row format (text→image, 10 languages)", False,
                       "xtd"),
}


def fetch(name: str, out: str | Path, subsets: list[str] | None = None, revision: str | None = None,
          token: str | None = None) -> Path:
    """Download data set `name` into `out` (only `subsets` if given), unpack its training archives; returns
    `out`. Raises ConnectionError with what to do when the hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    published = DATASETS[name]
    out = Path(out)
    patterns = [*(f"*{subset}*" for subset in subsets), "README.md"] if subsets else None
    try:
        snapshot_download(published.repo_id, repo_type="dataset", local_dir=out, allow_patterns=patterns,
                          revision=revision, token=token)
    except LocalEntryNotFoundError as error:
        reason = str(error).splitlines()[0]
        raise ConnectionError(
            f"{published.repo_id}: the Hugging Face Hub cannot be reached from here ({reason}). Fetch it on "
            f"a machine with internet (same command), copy {out} here, and rerun: files already there are "
            "kept") from None
    if published.unpack:
        for archive in archives(out):
            unpack(archive)
    return out


def archives(folder: Path) -> list[Path]:
    """The image archives under `folder` (not huggingface_hub's own cache folder)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(ARCHIVES)
                  and ".cache" not in p.relative_to(folder).parts)


def unpack(archive: Path) -> bool:
    """Extract `archive` beside itself unless done before; returns whether it extracted now."""
    marker = archive.with_name(archive.name + ".unpacked")
    if marker.exists():
        return False
    target = archive.parent.resolve()
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
    with atomic_write(marker) as file:
        file.write("unpacked\n")
    return True


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
    if role == "xtd":
        return [f"python -m mme5.eval --model MODEL --benchmark xtd --xtd {folder} --out runs/eval/MODEL"]
    subsets = sorted({p.parent for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl")
                      and ".cache" not in p.relative_to(folder).parts})
    return [f"python -m mme5.data.convert --input {subset} --images {folder} "
            f"--out data/shards/{folder.name}/{subset.relative_to(folder)}" for subset in subsets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mme5.data.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                        help="; ".join(f"{k}: {v.repo_id}" for k, v in DATASETS.items()))
    parser.add_argument("--out", required=True, type=Path, help="folder to download into")
    parser.add_argument("--subset", nargs="+", help="only these subsets (e.g. ImageNet_1K MSCOCO_t2i)")
    parser.add_argument("--revision", help="a branch, tag or commit of the data set")
    args = parser.parse_args(argv)
    try:
        folder = fetch(args.dataset, args.out, args.subset, args.revision)
    except ConnectionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{DATASETS[args.dataset].repo_id} → {folder} (licence: {licence(folder)})")
    print("next:")
    for command in next_steps(args.dataset, folder):
        print(f"  {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
