"""MMEB-V2 visual-document reader: a BEIR set in the fetch layout read back, scored against brute force
written from VLM2Vec's `RankingMetrics.ndcg_at_k` (linear, graded, IDCG over every labelled document)."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mme5.eval.mmeb_v2.metrics import ranked_order, ranking_metrics
from mme5.eval.mmeb_v2.registry import MMEB_V2
from mme5.eval.mmeb_v2.visdoc import global_candidates, page_file, read_visdoc

SPEC = next(s for s in MMEB_V2 if s.name == "ViDoRe_docvqa")
QRELS = [("q0", "d0", 2), ("q0", "d1", 1), ("q0", "d2", 0),  # grade 0: not labelled
         ("q1", "d3", 1), ("q1", "d3", 2),  # a repeated pair: the higher grade counts
         ("q1", "gone", 1),  # labelled, but neither in the corpus nor a page
         ("q2", "d1", 2)]


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(out, format="PNG")
    return out.getvalue()


def write(folder, config, split, table: dict):
    (folder / config).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), folder / config / f"{split}-00000-of-00001.parquet")


def beir_set(folder, qrels=QRELS, queries=("q0", "q1", "q2")):
    corpus = ["d0", "d1", "d2", "d3", "d4"]
    write(folder, "queries", "test", {"query-id": list(queries), "query": [f"text of {q}" for q in queries]})
    write(folder, "corpus", "test", {"corpus-id": corpus,
                                    "image": [{"bytes": png(), "path": f"{d}.png"} for d in corpus]})
    query_ids, corpus_ids, grades = zip(*qrels, strict=True)
    write(folder, "qrels", "test", {"query-id": list(query_ids), "corpus-id": list(corpus_ids),
                                   "score": list(grades)})
    for d in corpus:  # the pages as fetch writes them out (the reference's image_root)
        (folder / page_file(SPEC.name, d)).write_bytes(png())
    return folder


def brute_ndcg_linear(prediction, labels: dict, k):
    """`RankingMetrics.ndcg_at_k(form="linear")` with graded rel_scores, written from its definition."""
    dcg = sum(labels.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(prediction[:k]))
    ideal = sorted(labels.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def test_beir_set_reads_as_the_reference_builds_it(tmp_path):
    with pytest.warns(UserWarning, match="gone"):
        data = read_visdoc(beir_set(tmp_path), SPEC)
    ranking = data.rankings[SPEC.name]
    # candidates: the labelled documents in query order, then the rest of the corpus, each once
    names = ["d0", "d1", "d3", "gone", "d2", "d4"]
    assert ranking.candidates.shape == (3, 6)
    assert ranking.candidates[0, 3] == -1  # no page: a column scored -inf
    assert data.notes == {"unpaged_documents": 1}
    pages = [data.items[c].image.path.rsplit("/", 1)[1] for c in ranking.candidates[0].tolist() if c >= 0]
    assert pages == [f"{n}.png" for n in names if n != "gone"]
    assert ranking.relevance.tolist() == [[2, 1, 0, 0, 0, 0], [0, 0, 2, 1, 0, 0], [0, 2, 0, 0, 0, 0]]
    assert ranking.gold.tolist() == [0, 2, 1]
    queries = [data.items[q] for q in ranking.queries.tolist()]
    assert [(q.instruction, q.text, q.image) for q in queries] == [
        (SPEC.query_instruction, f"text of {q}", None) for q in ("q0", "q1", "q2")]
    assert {data.items[c].instruction for c in ranking.candidates[0].tolist() if c >= 0} == {
        SPEC.target_instruction}


def test_ndcg_linear_at_5_equals_brute_force(tmp_path):
    with pytest.warns(UserWarning):
        ranking = read_visdoc(beir_set(tmp_path), SPEC).rankings[SPEC.name]
    names = ["d0", "d1", "d3", "gone", "d2", "d4"]
    labels = [{"d0": 2, "d1": 1}, {"d3": 2, "gone": 1}, {"d1": 2}]
    scores = torch.tensor(np.random.default_rng(0).normal(size=ranking.candidates.shape), dtype=torch.float)
    scores = scores.masked_fill(ranking.candidates < 0, float("-inf"))
    got = ranking_metrics(ranked_order(scores, ranking.relevance), ranking.relevance)["ndcg_linear@5"]
    # the reference ranks only candidates that exist: "gone" is never predicted, yet counts in IDCG
    expected = np.mean([brute_ndcg_linear([names[j] for j in np.argsort(-row.numpy()) if names[j] != "gone"],
                                          label, 5) for row, label in zip(scores, labels, strict=True)])
    assert got == pytest.approx(expected)
    assert 0 < got < 1


def test_max_queries_keeps_the_first_and_their_candidates(tmp_path):
    ranking = read_visdoc(beir_set(tmp_path), SPEC, max_queries=1).rankings[SPEC.name]  # "gone": not kept
    assert ranking.candidates.shape == (1, 5)  # d0, d1, then d2, d3, d4 of the corpus; "gone" not labelled
    assert ranking.relevance.tolist() == [[2, 1, 0, 0, 0]]


def test_qrels_row_naming_an_unknown_query_is_an_error(tmp_path):
    beir_set(tmp_path, qrels=[*QRELS, ("q9", "d0", 1)])
    with pytest.raises(ValueError, match=r"qrels/test-00000-of-00001\.parquet row 7, field query-id: 'q9'"):
        read_visdoc(tmp_path, SPEC)


def test_qrels_scores_as_numeric_strings_grade_alike_and_any_other_is_an_error_naming_the_row(tmp_path):
    with pytest.warns(UserWarning, match="gone"):
        graded = read_visdoc(beir_set(tmp_path / "ints"), SPEC).rankings[SPEC.name].relevance
        as_text = [(q, d, str(score)) for q, d, score in QRELS]  # a set converted from BEIR's TSV
        assert torch.equal(read_visdoc(beir_set(tmp_path / "text", qrels=as_text), SPEC)
                           .rankings[SPEC.name].relevance, graded)
    for bad in ("high", float("nan")):
        qrels = [(q, d, bad if i == 1 else (str(s) if isinstance(bad, str) else float(s)))
                 for i, (q, d, s) in enumerate(QRELS)]
        with pytest.raises(ValueError, match=r"qrels/test-00000-of-00001\.parquet row 1, field score: "
                                             r"('high'|nan) is not a relevance grade"):
            read_visdoc(beir_set(tmp_path / str(bad), qrels=qrels), SPEC)


def test_query_without_positive_qrels_is_an_error(tmp_path):
    beir_set(tmp_path, queries=("q0", "q1", "q2", "q3"), qrels=[*QRELS, ("q3", "d0", 0)])
    with pytest.raises(ValueError, match=r"queries/test-00000-of-00001\.parquet row 3, field query-id: "
                                         r"query 'q3' has no qrels row with score > 0"):
        read_visdoc(tmp_path, SPEC)


def test_missing_column_names_the_file_and_field(tmp_path):
    beir_set(tmp_path)
    write(tmp_path, "qrels", "test", {"query-id": ["q0"], "corpus-id": ["d0"]})
    with pytest.raises(ValueError, match=r"qrels/test-00000-of-00001\.parquet: missing column\(s\) "
                                         r"\['score'\]"):
        read_visdoc(tmp_path, SPEC)


def test_visrag_page_names_follow_the_visrag_loader():
    name = "x" * 60 + ".jpg"  # md5 of the full name, stem cut to 50
    assert page_file("VisRAG_ChartQA", name) == "x" * 50 + "_6a1e9009.jpg"
    assert page_file("ViDoRe_docvqa", "17") == "17.png"


def test_global_candidates_keep_first_occurrence():
    assert global_candidates([["b", "a"], ["a", "c"]], ["c", "d", "b"]) == ["b", "a", "c", "d"]
