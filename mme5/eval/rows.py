"""The published row format of retrieval sets (MMEB-eval parquet; XTD in its MMEB-style form): one row a
query, `qry_text`, `qry_img_path` ("" if none), and its own candidates `tgt_text` / `tgt_img_path` (lists,
gold first). MMEB and XTD read it with the same code. The texts are published strings: each item is fed
to the model verbatim (`Item.prompt`), only the image placeholder replaced by the family's token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from mme5.eval.retrieval import SetBuilder
from mme5.files import files_fingerprint

COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


def data_identity(root: Path, files: Sequence[Path]) -> dict[str, str]:
    """Where a benchmark's data is and a fingerprint of its files (names, sizes, modification times), for
    `scores.json`: two score files with the same fingerprint were computed on the same rows."""
    return {"root": str(root.resolve()), "fingerprint": files_fingerprint(list(files))}


def parquet_files(folder: Path, split: str = "test") -> list[Path]:
    """The files of one split as the hub saves them (`<split>-00000-of-00001.parquet`, ...)."""
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {split}-*.parquet file")
    return files


def read_rows(files: Sequence[Path], max_rows: int | None = None,
              columns: Sequence[str] = COLUMNS) -> Iterator[tuple[str, int, dict]]:
    """(file name, row in file, row) of parquet files in order, only `columns` (each must be there), at
    most `max_rows` rows."""
    seen = 0
    for file in files:
        table = pq.read_table(file)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing}; found {table.column_names}")
        for i, row in enumerate(table.select(list(columns)).to_pylist()):
            if max_rows is not None and seen >= max_rows:
                return
            seen += 1
            yield file.name, i, row


def add_rows(builder: SetBuilder, key: str, files: Sequence[Path], max_rows: int | None = None) -> None:
    """Read row-format files into ranking `key` of `builder`: query vs. its own list, gold at index 0."""
    queries, candidates = [], []
    for file, i, row in read_rows(files, max_rows):
        where = f"{file} row {i}"
        texts, images = row["tgt_text"] or [], row["tgt_img_path"] or []
        if not texts or len(texts) != len(images):
            raise ValueError(f"{builder.name}, {where}: tgt_text has {len(texts)} entries and tgt_img_path "
                             f"{len(images)}; expected the same number, at least 1 (gold first)")
        queries.append(builder.item("", None, row["qry_img_path"], f"{where}, qry_img_path",
                                    prompt=row["qry_text"] or ""))
        candidates.append([builder.item("", None, image, f"{where}, tgt_img_path[{j}]", prompt=text or "")
                           for j, (text, image) in enumerate(zip(texts, images, strict=True))])
    builder.rank(key, queries, candidates, [0] * len(queries))
