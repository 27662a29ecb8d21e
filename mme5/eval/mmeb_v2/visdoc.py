"""MMEB-V2's visual-document sets (ViDoRe v1/v2, VisRAG, ViDoSeek, MMLongBench) read from their BEIR
layout into a `RetrievalSet`, as VLM2Vec's `vidore` / `visrag` loaders and `eval.py` build them.

Layout of one set, `<root>/visdoc-tasks/<set name>/` (what `mme5.data.fetch --dataset mmeb-v2` writes: the
files of the set's hub annotation repo as published, its parquet per config and split, and the pages
beside them where the reference's `image_root` keeps them):
    queries/<split>-*.parquet   query-id, query (ViDoRe v2 adds `language`: not filtered, the 78 count
                                every language)
    corpus/<split>-*.parquet    corpus-id, image (the page; fetch writes it out as a page file)
    qrels/<split>-*.parquet     query-id, corpus-id, score
    <page file>                 each corpus-id's page (`page_file`): `<corpus-id>.png` (vidore loader);
                                VisRAG_* sets (visrag loader): the name's stem cut to 50 characters,
                                "_", the first 8 hex digits of the name's md5, the name's extension
<split> is the registry's `annotations.split` (test; train for VisRAG).

As the reference:
- qrels rows with score <= 0 are dropped; a repeated (query, document) pair keeps its highest score
  (`load_qrels_mapping`). A query with no qrels left is an error (the reference fails on it, KeyError).
- query item: the set's query instruction + the query text; candidate item: the target instruction + the
  page (instructions from the registry).
- candidates (`generate_cand_dataset`, eval_type global): the labelled documents of the queries, in
  query order, then the corpus, deduplicated by name (first seen kept); each query is ranked against all.
- `max_queries` keeps the first N queries (`sample_dataset`); the candidates are those of the kept ones.
Where it differs: a labelled document with no page file (absent from the corpus) stops the reference
(FileNotFoundError); here it is a column with no item (-1, scored -inf), counted in IDCG, with a warning
and their count in the set's line of scores.json (`unpaged_documents`).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mme5.eval.images import ImageStore, MissingImageError
from mme5.eval.mmeb_v2.registry import V2Set
from mme5.eval.retrieval import RetrievalSet, SetBuilder
from mme5.eval.rows import parquet_files, read_rows

QUERY_COLUMNS = ("query-id", "query")
CORPUS_COLUMNS = ("corpus-id",)
QRELS_COLUMNS = ("query-id", "corpus-id", "score")


def page_file(set_name: str, corpus_id: str) -> str:
    """The page's file name in the set's folder, as the set's reference loader names it."""
    if not set_name.startswith("VisRAG_"):
        return f"{corpus_id}.png"
    stem, ext = os.path.splitext(corpus_id)
    return f"{stem[:50]}_{hashlib.md5(corpus_id.encode('utf-8')).hexdigest()[:8]}{ext}"


def global_candidates(labelled: Sequence[Sequence[str]], corpus: Sequence[str] = ()) -> list[str]:
    """Every distinct candidate name of a global set: the queries' own, in order, then the corpus; the
    first occurrence kept (VLM2Vec `generate_cand_dataset`)."""
    return list(dict.fromkeys([name for names in labelled for name in names] + list(corpus)))


def read_table(folder: Path, config: str, split: str, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """("<config>/<file> row <i>", row) of one config's split; a null in a needed field is an error."""
    for file, i, row in read_rows(parquet_files(folder / config, split), columns=columns):
        where = f"{folder / config / file} row {i}"
        empty = [c for c in columns if row[c] is None]
        if empty:
            raise ValueError(f"{where}: field(s) {empty} empty")
        yield where, row


def read_qrels(folder: Path, split: str, query_ids: set[str]) -> dict[str, dict[str, float]]:
    """query-id -> {corpus-id: score} of the qrels with score > 0, a repeated pair at its highest score."""
    labels: dict[str, dict[str, float]] = {}
    for where, row in read_table(folder, "qrels", split, QRELS_COLUMNS):
        query = str(row["query-id"])
        if query not in query_ids:
            raise ValueError(f"{where}, field query-id: {query!r} is not a query of "
                             f"{folder / 'queries'}")
        score = grade(where, row["score"])
        if score > 0:
            graded = labels.setdefault(query, {})
            document = str(row["corpus-id"])
            graded[document] = max(graded.get(document, 0), score)
    return labels


def grade(where: str, score: object) -> float:
    """A qrels score as a number (a numeric string too: some BEIR sets were converted from TSV); anything
    else, NaN included, is an error naming the row: it would change the NDCG silently."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = math.nan
    if math.isnan(value):
        raise ValueError(f"{where}, field score: {score!r} is not a relevance grade (a number)")
    return value


def read_visdoc(folder: str | Path, spec: V2Set, max_queries: int | None = None) -> RetrievalSet:
    """The set in `folder` (layout above) as one ranking named after it: each query against every
    candidate, `relevance` the qrels grades, `gold` the first column of the highest grade."""
    folder, split = Path(folder), spec.annotations.split
    queries = list(read_table(folder, "queries", split, QUERY_COLUMNS))
    labels = read_qrels(folder, split, {str(row["query-id"]) for _, row in queries})
    builder = SetBuilder(spec.name, ImageStore([folder]))
    rows, graded = [], []
    for where, row in queries[:max_queries]:
        query = str(row["query-id"])
        if query not in labels:
            raise ValueError(f"{where}, field query-id: query {query!r} has no qrels row with score > 0 "
                             f"in {folder / 'qrels'}")
        rows.append(builder.item(spec.query_instruction, row["query"], None, where))
        graded.append(labels[query])
    corpus = [str(row["corpus-id"]) for _, row in read_table(folder, "corpus", split, CORPUS_COLUMNS)]
    names = global_candidates(graded, corpus)
    columns = _candidate_items(builder, spec, names, set(corpus))
    relevance = torch.zeros(len(rows), len(names))  # (Q, C)
    column = {name: j for j, name in enumerate(names)}
    for i, documents in enumerate(graded):
        for name, score in documents.items():
            relevance[i, column[name]] = float(score)
    candidates = torch.tensor(columns, dtype=torch.long).expand(len(rows), -1)  # (Q, C), one shared list
    builder.rank(spec.name, rows, candidates, relevance.argmax(dim=1), relevance)
    return builder.build()


def _candidate_items(builder: SetBuilder, spec: V2Set, names: Sequence[str], corpus: set[str]) -> list[int]:
    """Item row of each candidate's page; -1 for a labelled document outside the corpus with no page."""
    columns, unpaged = [], []
    for name in names:
        where = f"corpus-id {name!r}"
        try:
            columns.append(builder.item(spec.target_instruction, None, page_file(spec.loader, name), where))
        except MissingImageError:
            if name in corpus:
                raise  # the corpus's own page missing: an incomplete fetch, not a qrels oddity
            columns.append(-1)
            unpaged.append(name)
    if unpaged:
        builder.notes["unpaged_documents"] = len(unpaged)  # in scores.json beside the set's scores
        warnings.warn(f"{spec.name}: {len(unpaged)} labelled document(s) neither in the corpus nor with a "
                      f"page file, ranked last (-inf): {unpaged[:5]}", stacklevel=2)
    return columns
