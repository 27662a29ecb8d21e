"""MMEB-V2 foundation: the registry against VLM2Vec's own files, the metrics against brute force written
from `RankingMetrics`' definitions, frame sampling against the reference formula, the aggregates."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from mme5.eval.metrics import gold_ranks, metrics_from_ranks
from mme5.eval.mmeb_v2.aggregate import aggregate, leaderboard_json, main_score
from mme5.eval.mmeb_v2.frames import frame_indices, frame_order
from mme5.eval.mmeb_v2.metrics import ranked_order, ranking_metrics
from mme5.eval.mmeb_v2.registry import MMEB_V2, MOMENTSEEKER_QUERY_INSTRUCTIONS, sets_of
from mme5.eval.registry import OVERALL, PARTIAL_MEAN

REFERENCE = Path(__file__).parent / "data" / "vlm2vec"  # facts read from VLM2Vec (Apache-2.0): README


def reference_yaml(modality: str) -> dict:
    """The eval yaml's sets of `modality`: each one's eval_type, dataset_parser and dataset_name."""
    return json.loads((REFERENCE / "eval_sets.json").read_text())[modality]


# --- registry ---

def test_registry_counts_and_membership_match_report_score_v2():
    report = json.loads((REFERENCE / "report_score_v2.json").read_text())
    for modality, names in report["modality2dataset"].items():
        assert [s.name for s in sets_of(modality)] == names  # same sets, same (leaderboard) order
        assert {s.metric for s in sets_of(modality)} == {report["modality2metric"][modality]}
    assert [len(sets_of(m)) for m in ("image", "video", "visdoc")] == [36, 18, 24]
    assert len({s.name for s in MMEB_V2}) == 78


@pytest.mark.parametrize("modality", ["image", "video", "visdoc"])
def test_registry_eval_type_matches_yaml(modality):
    entries = reference_yaml(modality)
    for s in sets_of(modality):
        assert entries[s.name]["eval_type"] == s.eval_type, s.name
    extra = set(entries) - {s.name for s in sets_of(modality)}
    # the yaml also runs the English-only ViDoRe-v2 variants, which the 78 do not count
    assert extra == ({"ViDoRe_biomedical_lectures_v2", "ViDoRe_economics_reports_v2", "ViDoRe_esg_reports_v2"}
                     if modality == "visdoc" else set())


def test_video_and_visdoc_instructions_are_the_loaders():
    """Each set's loader (the yaml's dataset_parser) holds its instructions; classification reads them
    from DATASET_INSTRUCTION by the yaml's dataset_name."""
    parsers = json.loads((REFERENCE / "instructions.json").read_text())["parsers"]
    by_name = parsers["video_classification_utils"]["DATASET_INSTRUCTION"]
    for modality in ("video", "visdoc"):
        entries = reference_yaml(modality)
        for s in sets_of(modality):
            entry = entries[s.name]
            constants = parsers.get(entry["dataset_parser"], {})
            if entry["dataset_parser"] in ("video_classification", "ssv2"):
                expected = (by_name[entry["dataset_name"]], "")
            elif "TASK_PROMPT" in constants:  # QA: the answer options are encoded bare
                expected = (constants["TASK_PROMPT"], "")
            elif entry["dataset_parser"] == "momentseeker":
                expected = (constants["TASK_INST_QRY_VIDEO"], constants["TASK_INST_TGT"])
                assert MOMENTSEEKER_QUERY_INSTRUCTIONS == {
                    "text": constants["TASK_INST_QRY_TEXT"], "image": constants["TASK_INST_QRY_IMG"],
                    "video": constants["TASK_INST_QRY_VIDEO"]}
            else:
                expected = (constants["TASK_INST_QRY"], constants["TASK_INST_TGT"])
            assert (s.query_instruction, s.target_instruction) == expected, s.name
    assert by_name["Breakfast"].endswith(" ")  # kept verbatim


def test_annotation_sources():
    by_name = {s.name: s.annotations for s in MMEB_V2}
    assert by_name["ImageNet-1K"].repo == "ziyjiang/MMEB_Test_Instruct"
    assert by_name["ImageNet-1K"].config == "ImageNet-1K"
    assert (by_name["MSR-VTT"].repo, by_name["MSR-VTT"].config) == ("VLM2Vec/MSR-VTT", "test_1k")
    assert (by_name["YouCook2"].repo, by_name["YouCook2"].split) == ("lmms-lab/YouCook2", "val")
    assert by_name["ViDoSeek-page"].repo == "VLM2Vec/ViDoSeek-page-fixed"
    assert by_name["MMLongBench-page"].repo == "VLM2Vec/MMLongBench-page-fixed"
    assert by_name["ViDoRe_esg_reports_v2_multilingual"].repo == "vidore/esg_reports_v2"
    assert by_name["VisRAG_PlotQA"].repo == "openbmb/VisRAG-Ret-Test-PlotQA"


# --- metrics: brute force from RankingMetrics' definitions, one query at a time ---

def brute_force(prediction: list[int], rels: dict[int, float], k: int) -> dict[str, float]:
    labels = [doc for doc, rel in rels.items() if rel > 0]
    top = prediction[:k]
    hits = len(set(top) & set(labels))
    rr = next((1.0 / (i + 1) for i, doc in enumerate(top) if doc in labels), 0.0)
    dcg = sum(rels.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(top))
    ideal = sorted((rels[d] for d in labels), reverse=True)[:k]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    return {f"hit@{k}": float(hits > 0), f"recall@{k}": hits / len(labels) if labels else 1.0,
            f"mrr@{k}": rr, f"ndcg_linear@{k}": dcg / idcg if idcg > 0 else 0.0}


def brute_force_mean(order: torch.Tensor, relevance: torch.Tensor) -> dict[str, float]:
    per_query = []
    for row, grades in zip(order.tolist(), relevance.tolist(), strict=True):
        rels = {doc: grade for doc, grade in enumerate(grades) if grade > 0}
        per_query.append({key: value for k in (1, 5, 10) for key, value in brute_force(row, rels, k).items()})
    return {key: float(np.mean([q[key] for q in per_query])) for key in per_query[0]}


def graded_case() -> tuple[torch.Tensor, torch.Tensor]:
    """12 candidates: graded relevance 0/1/2, a query with more relevant documents than k=5, one with a
    single relevant document, and ties."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 12, generator=generator)
    relevance = torch.zeros(5, 12)
    relevance[0, [3, 7]] = torch.tensor([2.0, 1.0])
    relevance[1, :8] = torch.tensor([1, 2, 1, 2, 1, 2, 1, 1.0])  # 8 relevant > k = 5
    relevance[2, 11] = 1.0
    scores[3] = 0.5  # all tied, relevant at 2 (grade 2) and 9 (grade 1)
    relevance[3, [2, 9]] = torch.tensor([2.0, 1.0])
    scores[4, [1, 4]] = scores[4, 6].item()  # a tie with the relevant candidate 6
    relevance[4, 6] = 1.0
    return scores, relevance


@pytest.mark.parametrize("ties", ["pessimistic", "reference"])
def test_metrics_equal_brute_force(ties):
    scores, relevance = graded_case()
    order = ranked_order(scores, relevance, ties)
    assert sorted(order[0].tolist()) == list(range(12))
    got, expected = ranking_metrics(order, relevance), brute_force_mean(order, relevance)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_query_without_relevant_documents_is_reference_convention():
    scores, relevance = torch.tensor([[0.3, 0.2]]), torch.zeros(1, 2)
    got = ranking_metrics(ranked_order(scores, relevance), relevance)
    assert (got["hit@1"], got["recall@1"], got["mrr@1"], got["ndcg_linear@1"]) == (0.0, 1.0, 0.0, 0.0)


def test_pessimistic_order_puts_less_relevant_ties_first():
    scores, relevance = graded_case()
    order = ranked_order(scores, relevance, "pessimistic")
    assert order[3].tolist()[-2:] == [9, 2]  # all tied: grade 1 then grade 2, last
    # the single-gold case agrees with the project's rank rule for MMEB
    gold = torch.tensor([6])
    single = ranking_metrics(order[4:], relevance[4:])
    by_rank = metrics_from_ranks(gold_ranks(scores[4:], gold))
    assert single["hit@1"] * 100 == pytest.approx(by_rank["precision@1"])
    assert single["recall@5"] * 100 == pytest.approx(by_rank["recall@5"])


def test_reference_order_is_numpys_argsort_of_the_negated_scores():
    scores, relevance = graded_case()
    order = ranked_order(scores, relevance, "reference")
    expected = np.argsort(-scores.numpy(), axis=1)
    assert order.tolist() == expected.tolist()
    # a short list keeps list order among ties (insertion sort): the gold at column 0 wins
    tied = torch.zeros(1, 4)
    assert ranked_order(tied, torch.tensor([[1.0, 0, 0, 0]]), "reference")[0].tolist() == [0, 1, 2, 3]


def test_padding_columns_come_last_and_do_not_change_the_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, float("-inf")]])
    relevance = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    for ties in ("pessimistic", "reference"):
        assert ranked_order(scores, relevance, ties)[0].tolist() == [1, 2, 0, 3]


def test_unknown_tie_rule_is_refused():
    with pytest.raises(ValueError, match="ties must be one of"):
        ranked_order(torch.zeros(1, 2), torch.zeros(1, 2), "argmax")


# --- frames: VLM2Vec vision_utils.py process_video_frames / sample_frames ---

def reference_frames(n: int, num_frames: int | None) -> list[int]:
    """The reference's formula, written out: sample only when num_frames <= n."""
    if num_frames == 0:
        return []
    if num_frames and num_frames <= n:
        return [int(x) for x in np.linspace(0, n - 1, num_frames)]  # astype(int): toward zero
    return list(range(n))


@pytest.mark.parametrize("n", [1, 5, 8, 13, 64])
@pytest.mark.parametrize("num_frames", [None, 0, 1, 8, 64])
def test_frame_indices_match_reference(n, num_frames):
    assert frame_indices(n, num_frames) == reference_frames(n, num_frames)


def test_frame_indices_values():
    assert frame_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(5, 8) == [0, 1, 2, 3, 4]  # fewer frames than asked: all of them, no padding


def test_frame_order_is_natural_and_keeps_images_only():
    names = ["frame_10.jpg", "frame_2.JPG", "frame_1.png", "notes.txt", "Frame_3.jpeg"]
    assert frame_order(names) == ["frame_1.png", "frame_2.JPG", "Frame_3.jpeg", "frame_10.jpg"]


# --- aggregates and the leaderboard JSON ---

def synthetic_scores() -> dict[str, float]:
    value = {"image": 0.649, "video": 0.346, "visdoc": 0.692}
    return {s.name: value[s.modality] + (0.01 if s.meta_task.endswith(("CLS", "VDRv1")) else 0.0)
            for s in MMEB_V2}


def test_aggregate_means_over_data_sets():
    scores = synthetic_scores()
    out = aggregate(scores)
    assert out[OVERALL] == pytest.approx(sum(scores.values()) / 78)
    assert out["video"] == pytest.approx((5 * 0.356 + 13 * 0.346) / 18)
    assert out["Video CLS"] == pytest.approx(0.356)
    assert out["VisDoc VDRv2"] == pytest.approx(0.692)
    published = {"image": 64.9, "video": 34.6, "visdoc": 69.2}  # VLM2Vec-V2: All 59.2
    flat = aggregate({s.name: published[s.modality] for s in MMEB_V2})
    assert round(flat[OVERALL], 1) == 59.2


def test_partial_run_has_no_overall():
    scores = {s.name: 0.5 for s in sets_of("video")}
    out = aggregate(scores)
    assert OVERALL not in out and out[PARTIAL_MEAN] == pytest.approx(0.5)
    assert out["image"] is None and out["Image CLS"] is None


def test_leaderboard_json_layout():
    full = {s.name: {s.metric: 0.5, "num_pred": 3, "num_data": 3}
            for s in sets_of("image") + sets_of("visdoc")}
    del full["ImageNet-1K"]
    meta = {"model_name": "m", "data_source": "Self-Reported"}
    out = leaderboard_json(meta, full, generated=datetime(2026, 1, 1))
    assert out["metadata"] == {**meta, "report_generated_date": "2026-01-01T00:00:00"}
    assert list(out["metrics"]) == ["image", "video", "visdoc"]
    assert out["metrics"]["image"]["ImageNet-1K"] == "FILE_N/A"
    assert out["metrics"]["image"]["N24News"] == {"hit@1": 0.5, "num_pred": 3, "num_data": 3}
    assert set(out["metrics"]["video"].values()) == {"DIR_N/A"}
    visdoc = out["metrics"]["visdoc"]
    assert "ViDoSeek-page-fixed" in visdoc and "ViDoSeek-page" not in visdoc and "ViDoSeek-doc" in visdoc
    json.dumps(out)
    assert main_score(full["ViDoRe_arxivqa"], MMEB_V2[-1]) == 0.5
