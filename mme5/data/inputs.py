"""What the converter reads: tables of rows from files (parquet, JSONL, CSV) or Hugging Face `datasets`.

An input is a file, a folder of files, a `datasets` folder written by `save_to_disk`, or a hub dataset id
(`namespace/name`, optionally `@revision` and `:config`, e.g. `TIGER-Lab/MMEB-train:ImageNet_1K`). Each
becomes a `Table`: it counts its rows, streams them from a position (file order), loads them for random
access (the converter's seeded permutation), lists its columns (a JSONL file's: every key its rows use), and
identifies its content for the conversion's identity. An input named twice (a file, and the folder that holds
it) is read once.

Text files (JSONL, CSV) are UTF-8, a leading byte-order mark allowed (Excel and Notepad write one); a file in
another encoding, or a file name that is not UTF-8, is refused up front, naming the file (and the first bad
byte), before a row is converted. A JSON string escaping a lone surrogate (`"\udce9"`) is a bad row: no
UTF-8 shard or report can hold it.

Splits: Hugging Face folders name their files `<split>-00000-of-00001.parquet`, and `datasets` hold named
splits; only the chosen split is read ("all": every one). Image columns of a `datasets` dataset are read
undecoded: a row holds the image's original bytes (`{"bytes": ..., "path": ...}`), stored as given.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

FILE_SUFFIXES = (".parquet", ".jsonl", ".csv")
SPLIT_FILE = re.compile(r"(?P<split>[A-Za-z_]+)-\d{5}-of-\d{5}")  # Hugging Face's parquet file names
DEFAULT_SPLIT = "train"  # what the reference trains on (`train[:50000]`)
# namespace/name, then optionally @revision and :config (a hub id holds neither character).
HUB_DATASET = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[^:]+))?(:(?P<config>.+))?")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes
TEXT_ENCODING = "utf-8-sig"  # UTF-8, a leading byte-order mark dropped


class BadRow(ValueError):
    """A row that cannot become a sample; `field` names the column at fault."""

    def __init__(self, field_name: str, reason: str, kind: str):
        super().__init__(f"field '{field_name}': {reason}")
        self.field = field_name
        self.reason = reason
        self.kind = kind

    def renamed(self, field_name: str) -> BadRow:
        """The same fault, named by another field (the user's column of a published field)."""
        return BadRow(field_name, self.reason, self.kind)


Row = dict[str, Any] | BadRow


class Table(ABC):
    """Rows of one input, in a stable order."""

    name: str  # how messages and the manifest name it
    source: str  # the default source name of its samples
    task_hints: tuple[str, ...]  # names that may tell its task (a folder named `retrieval`, ...)
    split: str | None  # the split it holds, where its name or its dataset says

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def rows(self, start: int = 0) -> Iterator[tuple[int, Row]]:
        """(row index, row) pairs from `start`, streamed."""

    @abstractmethod
    def load(self) -> Sequence[Row]:
        """Every row, indexable by row index."""

    @abstractmethod
    def columns(self) -> list[str]:
        """The column names (where rows name their own, as JSONL's do: every name a row uses)."""

    @abstractmethod
    def identity(self) -> str:
        """Changes when the content may have changed."""


@dataclass
class FileTable(Table):
    """A parquet, JSONL or CSV file."""

    path: Path

    def __post_init__(self) -> None:
        self.name = str(self.path)
        if not encodable(self.name):
            raise ValueError(f"{printable(self.name)}: the file name is not UTF-8 (shards and reports name "
                             "rows by it); rename it, e.g. with convmv")
        self.source = self.path.parent.name
        self.task_hints = (self.path.parent.name, self.path.stem.split("-")[0])
        self.split = match["split"] if (match := SPLIT_FILE.fullmatch(self.path.stem)) else None
        if self.path.suffix != ".parquet":
            check_utf8(self.path)

    def __len__(self) -> int:
        if self.path.suffix == ".parquet":
            return pq.ParquetFile(self.path).metadata.num_rows
        if self.path.suffix == ".csv":
            with open(self.path, newline="", encoding=TEXT_ENCODING) as handle:
                return sum(1 for _ in csv.DictReader(handle))
        with open(self.path, "rb") as handle:
            return sum(1 for line in handle if line.strip())

    def rows(self, start: int = 0) -> Iterator[tuple[int, Row]]:
        """An unparsable JSONL line yields a BadRow in its place."""
        if self.path.suffix == ".parquet":
            index = 0
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=512):
                for row in batch.to_pylist():
                    if index >= start:
                        yield index, row
                    index += 1
            return
        if self.path.suffix == ".csv":
            with open(self.path, newline="", encoding=TEXT_ENCODING) as handle:
                for index, row in enumerate(csv.DictReader(handle)):
                    if index >= start:
                        yield index, row
            return
        with open(self.path, "rb") as handle:  # decoded line by line: one bad line is one bad row
            index = 0
            for raw in handle:
                if not raw.strip():
                    continue
                if index >= start:
                    yield index, _json_row(raw)
                index += 1

    def load(self) -> Sequence[Row]:
        return [row for _, row in self.rows()]

    def columns(self) -> list[str]:
        if self.path.suffix == ".parquet":
            return pq.ParquetFile(self.path).schema_arrow.names
        if self.path.suffix == ".csv":
            with open(self.path, newline="", encoding=TEXT_ENCODING) as handle:
                return next(csv.reader(handle), [])
        return self._json_keys

    @cached_property
    def _json_keys(self) -> list[str]:
        """Every key of the file's JSON rows, in order of first use."""
        keys: dict[str, None] = {}
        for _, row in self.rows():
            if isinstance(row, dict):
                keys.update(dict.fromkeys(row))
        return list(keys)

    def identity(self) -> str:
        stat = self.path.stat()
        return f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _json_row(raw: bytes) -> Row:
    """One JSONL line (of a file checked to be UTF-8) as a row, or the BadRow that says why it is none."""
    try:
        row = json.loads(raw.decode(TEXT_ENCODING))
    except json.JSONDecodeError as error:
        return BadRow("(row)", f"invalid JSON: {error}", "bad_json")
    if not isinstance(row, dict):
        return BadRow("(row)", "not a JSON object", "bad_json")
    for key, value in row.items():
        texts = value if isinstance(value, list) else [value]
        if not encodable(key) or not all(encodable(text) for text in texts if isinstance(text, str)):
            return BadRow(printable(key), "a lone surrogate escape (\\udXXX) in its text, which is not "
                          "Unicode", "bad_encoding")
    return row


def encodable(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (lone surrogates, from undecodable file names or JSON escapes,
    cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with what UTF-8 cannot hold written as backslash escapes, for messages and reports."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8, naming its first bad byte by offset and line: read as UTF-8, a
    file in another encoding would lose or garble rows."""
    decoder, newline = codecs.getincrementaldecoder("utf-8")(), b"\n"
    offset, line = 0, 1
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                seen = pending + chunk
                bad, line = offset - len(pending) + error.start, line + seen[: error.start].count(newline)
                raise ValueError(f"{path}: not UTF-8: byte {bad} (line {line}, 0x{seen[error.start]:02x}) "
                                 "cannot be decoded; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                                 ) from None
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(newline)


class DatasetTable(Table):
    """One split of a Hugging Face `datasets` dataset, its image columns undecoded (original bytes)."""

    def __init__(self, dataset: Any, name: str, source: str, split: str | None):
        for column, feature in undecoded(dataset.features).items():
            if feature != dataset.features[column]:
                dataset = dataset.cast_column(column, feature)  # the schema only: no data rewritten
        self.dataset = dataset
        self.name = name
        self.source = source
        self.task_hints = (source,)
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, start: int = 0) -> Iterator[tuple[int, Row]]:
        yield from enumerate(self.dataset.select(range(start, len(self.dataset))), start)

    def load(self) -> Sequence[Row]:
        return self.dataset  # memory-mapped Arrow: indexing reads one row

    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def identity(self) -> str:
        return f"{self.name}|{self.dataset._fingerprint}"


def undecoded(features: Any) -> Any:
    """A copy of `features` whose image features (at any depth) yield bytes and paths, not PIL images."""
    from datasets import Image

    def walk(feature: Any) -> Any:
        if isinstance(feature, Image):
            return Image(decode=False)
        if isinstance(feature, dict):
            return type(feature)({key: walk(value) for key, value in feature.items()})
        if hasattr(feature, "feature"):  # List, Sequence, LargeList
            return type(feature)(**{**vars(feature), "feature": walk(feature.feature)})
        return feature

    return walk(features)


# ----------------------------------------------------------------------------- finding inputs


def find_tables(inputs: list[str], split: str = DEFAULT_SPLIT) -> list[Table]:
    """The tables of `inputs` in a stable order, each once: files as given, folders searched recursively
    (keeping only the `split` files of a folder that names its files by split), `datasets` folders and hub
    ids."""
    tables: list[Table] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            tables += saved_dataset(path, split)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES)
            tables += [FileTable(f) for f in select_split(files, split)]
        elif path.suffix in FILE_SUFFIXES and path.is_file():
            tables.append(FileTable(path))
        elif not path.exists() and path.suffix not in FILE_SUFFIXES and HUB_DATASET.fullmatch(name):
            tables += hub_dataset(name, split)
        else:
            raise FileNotFoundError(f"{path}: not a parquet/JSONL/CSV file, a folder holding them, a "
                                    "`datasets` folder (save_to_disk) or a hub dataset id "
                                    "(namespace/name[:config])")
    if not tables:
        raise FileNotFoundError(f"no .parquet, .jsonl or .csv files under {inputs}")
    unique: dict[str, Table] = {}
    for table in tables:
        unique.setdefault(table.identity(), table)
    return list(unique.values())


def select_split(files: list[Path], split: str) -> list[Path]:
    """The files of `split`, folder by folder; a folder whose files name no split keeps them all."""
    if split == "all":
        return files
    chosen: list[Path] = []
    for folder in dict.fromkeys(f.parent for f in files):
        here = [f for f in files if f.parent == folder]
        splits = {f: match["split"] for f in here if (match := SPLIT_FILE.fullmatch(f.stem))}
        if not splits:
            chosen += here
            continue
        if split not in splits.values():
            held = sorted(set(splits.values()))
            raise FileNotFoundError(f"{folder}: no '{split}' split; its files hold {held} (pick --split, "
                                    "or --split all)")
        chosen += [f for f in here if splits.get(f, split) == split]
    return chosen


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a Hugging Face dataset needs the `datasets` package: "
                          "pip install 'mme5[datasets]'") from None
    return datasets


def saved_dataset(folder: Path, split: str) -> list[Table]:
    """The tables of a `save_to_disk` folder: a Dataset as it is, a DatasetDict's `split` ("all": each)."""
    loaded = _datasets().load_from_disk(str(folder))
    if not hasattr(loaded, "keys"):
        return [DatasetTable(loaded, str(folder), folder.name, None)]
    return [DatasetTable(loaded[name], f"{folder}[{name}]", folder.name, name)
            for name in _splits(loaded.keys(), split, str(folder))]


def hub_dataset(spec: str, split: str) -> list[Table]:
    """The tables of a hub dataset `namespace/name[@revision][:config]` (downloaded into the datasets cache;
    offline, from that cache only)."""
    datasets = _datasets()
    match = HUB_DATASET.fullmatch(spec)
    repo, revision, config = match["repo"], match["revision"], match["config"]
    source = config or repo.split("/")[1]
    try:
        loaded = datasets.load_dataset(repo, config, revision=revision,
                                       split=None if split == "all" else split)
    except ConnectionError as error:
        raise ConnectionError(
            f"{spec}: not a local path, and the Hugging Face Hub cannot be reached from here nor has the "
            f"datasets cache a copy ({error}). Load it where there is network (the same command fills the "
            "cache), copy the cache here (HF_HOME), or save it with `save_to_disk` and pass that folder"
        ) from None
    except ValueError as error:  # an unknown split or config: datasets names the ones it has
        raise FileNotFoundError(f"{spec}: {error} (pick --split / :config)") from None
    if split != "all":
        return [DatasetTable(loaded, f"{spec}[{split}]", source, split)]
    return [DatasetTable(loaded[name], f"{spec}[{name}]", source, name) for name in loaded]


def _splits(held: Any, split: str, where: str) -> list[str]:
    held = list(held)
    if split == "all":
        return held
    if split not in held:
        raise FileNotFoundError(f"{where}: no '{split}' split; it holds {held} (pick --split, or "
                                "--split all)")
    return [split]
