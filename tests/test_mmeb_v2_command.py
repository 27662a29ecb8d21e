"""`python -m mme5.eval --benchmark mmeb-v2`: BEIR visual-document sets in the fetch layout scored by the
real command with a tiny model, every metric checked against a brute force written from VLM2Vec's
`RankingMetrics` definitions; the graded scorer, compare on two V2 runs and the training callback."""

from __future__ import annotations

import json
import math
import shlex
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from doc_blocks import doc_commands, run_doc_commands
from PIL import Image
from test_mmeb_v2_readers import serve_v2_hub
from test_mmeb_v2_visdoc import beir_set

import mme5.eval.__main__ as command
from mme5.checkpoint import load_encoder
from mme5.data import fetch
from mme5.eval.callbacks import MMEBV2Eval
from mme5.eval.compare import comparison
from mme5.eval.mmeb_v2 import benchmark
from mme5.eval.mmeb_v2.benchmark import MMEBV2
from mme5.eval.mmeb_v2.metrics import ranked_order
from mme5.eval.retrieval import Ranking, rank

pytestmark = pytest.mark.filterwarnings("ignore:.*labelled document.*:UserWarning")  # "gone", by design

SETS = ("ViDoRe_docvqa", "ViDoRe_arxivqa")
NAMES = ["d0", "d1", "d3", "gone", "d2", "d4"]  # the candidate columns `beir_set` yields
LABELS = [{"d0": 2, "d1": 1}, {"d3": 2, "gone": 1}, {"d1": 2}]  # its qrels, > 0, repeats at their max
COLOURS = ["red", "green", "blue", "yellow", "purple"]


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory):
    """Two visdoc sets under `<root>/visdoc-tasks/`, each page a different colour (no tied scores)."""
    root = tmp_path_factory.mktemp("mmeb-v2")
    for name in SETS:
        folder = beir_set(root / "visdoc-tasks" / name)
        for document, colour in zip(["d0", "d1", "d2", "d3", "d4"], COLOURS, strict=True):
            Image.new("RGB", (8, 8), colour).save(folder / f"{document}.png")
    return root


@pytest.fixture(scope="module")
def runs(v2_root, tiny_mllama, tmp_path_factory):
    """The command on both sets (every candidate in the predictions), then on one set's first 2 queries."""
    out = tmp_path_factory.mktemp("runs")
    args = ["--model", tiny_mllama, "--benchmark", "mmeb-v2", "--mmeb-v2", str(v2_root), "--device", "cpu",
            "--top-k", "6", "--batch-size", "8"]
    command.main([*args, "--subsets", *SETS, "--out", str(out / "both")])
    command.main([*args, "--subsets", SETS[0], "--max-queries", "2", "--out", str(out / "one")])
    return out / "both", out / "one"


def brute_force(prediction: list[str], labels: dict[str, float], k: int) -> dict[str, float]:
    """VLM2Vec `RankingMetrics` at k for one query, from its definitions (linear NDCG, graded gains, IDCG
    over every labelled document)."""
    hits = [doc for doc in prediction[:k] if doc in labels]
    first = next((i + 1 for i, doc in enumerate(prediction[:k]) if doc in labels), None)
    dcg = sum(labels.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(prediction[:k]))
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(sorted(labels.values(), reverse=True)[:k]))
    return {f"hit@{k}": float(bool(hits)), f"recall@{k}": len(hits) / len(labels),
            f"mrr@{k}": 1 / first if first else 0.0, f"ndcg_linear@{k}": dcg / idcg}


def test_command_scores_every_metric_as_the_brute_force(runs):
    both, _ = runs
    scores = json.loads((both / "scores.json").read_text())
    v2 = scores["mmeb-v2"]
    for name in SETS:
        # the command's own cosine scores of every candidate; the page-less "gone" is never predicted
        lines = [json.loads(line) for line in (both / "predictions" / "mmeb-v2" / f"{name}.jsonl").open()]
        assert [len(line["top"]) for line in lines] == [5, 5, 5]
        assert all(len(set(line["scores"])) == 5 for line in lines)  # distinct pages: no tie to break
        predicted = [[NAMES[column] for column in line["top"]] for line in lines]
        expected = {key: 100 * np.mean([brute_force(p, labels, k)[key] for p, labels in zip(predicted, LABELS,
                                                                                            strict=True)])
                    for k in (1, 5, 10) for key in brute_force(predicted[0], LABELS[0], k)}
        entry = v2["datasets"][name]
        assert {key: entry[key] for key in expected} == pytest.approx(expected, abs=1e-4)
        assert entry["score"] == entry["ndcg_linear@5"] and entry["queries"] == 3
        assert entry["meta_task"] == "VisDoc VDRv1" and entry["metric"] == "ndcg_linear@5"
        assert entry["unpaged_documents"] == 1  # "gone": said in the scores, not only in a warning
        assert scores["scalars"][f"mmeb-v2/{name}"] == entry["score"]
    main_scores = [v2["datasets"][name]["score"] for name in SETS]
    assert v2["VisDoc VDRv1"] == v2["visdoc"] == v2["mean_over_sets"] == pytest.approx(np.mean(main_scores))
    assert "Overall" not in v2 and v2["image"] is None and v2["sets"]["in_benchmark"] == 78
    assert v2["num_frames"] == 8 and v2["input_format"]["max_length"] > 0  # what the model was fed


def test_command_writes_the_papers_table_and_the_leaderboard_file(runs):
    both, _ = runs
    scores = json.loads((both / "scores.json").read_text())["mmeb-v2"]
    report = (both / "results.md").read_text()
    assert ("| Model | Image CLS | Image QA | Image RET | Image GD | Image | Video CLS | Video QA | "
            "Video RET | Video MRET | Video | VisDoc VDRv1 | VisDoc VDRv2 | VisDoc VR | VisDoc OOD | "
            "VisDoc | mean over 2 of 78 sets |") in report
    assert f"| VisDoc VDRv1 | ViDoRe_docvqa | ndcg_linear@5 | {scores['datasets'][SETS[0]]['score']:.1f} |" \
        in report
    board = json.loads((both / "leaderboard.json").read_text())
    docvqa = board["metrics"]["visdoc"]["ViDoRe_docvqa"]
    assert docvqa["ndcg_linear@5"] == pytest.approx(scores["datasets"][SETS[0]]["ndcg_linear@5"] / 100)
    assert docvqa["num_pred"] == 3
    assert board["metrics"]["visdoc"]["ViDoRe_tatdqa"] == "FILE_N/A"  # not run, in a modality that was
    assert board["metrics"]["image"]["ImageNet-1K"] == "DIR_N/A"
    assert board["metadata"]["model_name"] and "report_generated_date" in board["metadata"]


def test_a_rerun_resumes_from_the_per_set_cache(runs, v2_root, tiny_mllama, capsys):
    both, _ = runs
    parts = sorted(both.glob("cache/*/*/part-*.pt"))
    assert {p.parent.name for p in parts} == {f"mmeb-v2__{name}" for name in SETS}
    before = json.loads((both / "scores.json").read_text())["scalars"]
    command.main(["--model", tiny_mllama, "--benchmark", "mmeb-v2", "--mmeb-v2", str(v2_root), "--device",
                  "cpu", "--top-k", "6", "--batch-size", "8", "--subsets", *SETS, "--out", str(both)])
    assert sorted(both.glob("cache/*/*/part-*.pt")) == parts
    assert json.loads((both / "scores.json").read_text())["scalars"] == before
    assert "mmeb-v2: visdoc " in capsys.readouterr().out


def test_num_frames_is_a_setting_of_the_run(runs, v2_root, tiny_mllama, capsys):
    """`--num-frames` (Qwen3-VL-Embedding scores video with 64) reaches the model and scores.json, and is part
    of what the folder holds: a re-run with another value is refused, not mixed into the cached scores."""
    _, one = runs
    args = ["--model", tiny_mllama, "--benchmark", "mmeb-v2", "--mmeb-v2", str(v2_root), "--device", "cpu",
            "--subsets", SETS[0], "--max-queries", "2"]
    out = one.parent / "frames"
    command.main([*args, "--num-frames", "3", "--out", str(out)])
    v2 = json.loads((out / "scores.json").read_text())["mmeb-v2"]
    assert v2["num_frames"] == 3 and v2["input_format"]["num_frames"] == 3
    with pytest.raises(SystemExit):
        command.main([*args, "--num-frames", "5", "--out", str(out)])
    assert "num_frames" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command.parse([*args, "--num-frames", "0", "--out", str(out)])
    assert "--num-frames must be at least 1" in capsys.readouterr().err


def test_compare_puts_two_v2_runs_side_by_side(runs):
    runs = {name: json.loads((folder / "scores.json").read_text())
            for name, folder in zip(["both", "one"], runs, strict=True)}
    header, _, first, second = comparison(runs).splitlines()
    assert header.endswith("| V2 Image | V2 Video | V2 VisDoc | V2 All |")
    both, one = runs["both"]["mmeb-v2"], runs["one"]["mmeb-v2"]
    assert first.endswith(f"| – | – | {both['visdoc']:.1f} | {both['mean_over_sets']:.1f} (mean over 2 of 78 "
                          "sets) |")
    assert second.endswith(f"| {one['visdoc']:.1f} | {one['mean_over_sets']:.1f} (mean over 1 of 78 sets "
                           "(first 2 queries of each set)) |")


def test_missing_set_folders_are_listed_with_the_fetch_command(v2_root):
    with pytest.raises(FileNotFoundError, match=r"no folder for 22 MMEB-V2 data set\(s\) \['ViDoRe_infovqa', "
                                                r"[^]]*, '\.\.\.'\] .*python -m mme5\.data\.fetch --dataset "
                                                r"mmeb-v2 --out "):
        MMEBV2(v2_root, modalities=["visdoc"])  # the first 10 named: not a wall of names
    with pytest.raises(FileNotFoundError, match=r"gone: no such folder; fetch MMEB-V2 into it with "
                                                r"`python -m mme5\.data\.fetch --dataset mmeb-v2 --out "
                                                r"\S+gone`"):
        MMEBV2(v2_root / "gone")
    with pytest.raises(ValueError, match=r"\['ViDoRe_docvqa'\] are not of the modalities \['image'\]"):
        MMEBV2(v2_root, subsets=["ViDoRe_docvqa"], modalities=["image"])
    with pytest.raises(ValueError, match=r"unknown MMEB-V2 data set\(s\) 'Nope': the registry's 78 are "
                                         r"ImageNet-1K, .*ViDoRe_docvqa"):
        MMEBV2(v2_root, subsets=["Nope"])


@pytest.mark.parametrize(("typed", "meant"), [("MSR-VT", "MSR-VTT"), ("vidore_docvqa", "ViDoRe_docvqa"),
                                              ("smthsmthv2", "SmthSmthV2")])
def test_a_misspelled_subset_is_refused_naming_the_set_it_most_likely_means(v2_root, typed, meant):
    with pytest.raises(ValueError, match=rf"data set\(s\) '{typed}' \(did you mean '{meant}'\?\)"):
        MMEBV2(v2_root, subsets=["ViDoRe_docvqa", typed])


def test_a_modality_without_reader_is_refused(v2_root, monkeypatch):
    monkeypatch.setattr(benchmark, "READERS", {"visdoc": benchmark.READERS["visdoc"]})
    with pytest.raises(ValueError, match=r"MMEB-V2 \['video'\] sets have no reader yet"):
        MMEBV2(v2_root, modalities=["visdoc", "video"])


def test_cli_needs_the_v2_folder_and_all_includes_it_when_given(v2_root, tmp_path, monkeypatch, capsys):
    base = ["--model", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra, message in [(["--benchmark", "mmeb-v2"], "--benchmark mmeb-v2 needs --mmeb-v2"),
                           (["--data", str(tmp_path), "--modalities", "visdoc"], "--modalities selects")]:
        with pytest.raises(SystemExit):
            command.parse([*base, *extra])
        assert message in capsys.readouterr().err
    monkeypatch.setattr(command, "MMEB", lambda *args: SimpleNamespace(name="mmeb"))
    monkeypatch.setattr(command, "XTD", lambda *args: SimpleNamespace(name="xtd"))
    args = command.parse([*base, "--data", str(tmp_path), "--subsets", "Shape", "--mmeb-v2", str(v2_root),
                          "--modalities", "visdoc", "--max-queries", "1"])
    with pytest.raises(FileNotFoundError, match="ViDoRe_infovqa"):  # every visdoc set: --subsets is MMEB's
        command.benchmarks(args)
    monkeypatch.setattr(benchmark, "select", lambda subsets, modalities, sets: [
        s for s in benchmark.MMEB_V2 if s.name in SETS])
    assert [b.name for b in command.benchmarks(args)] == ["mmeb", "mmeb-v2", "xtd"]
    assert command.benchmarks(command.parse([*base, "--data", str(tmp_path)]))[1].name == "xtd"
    (tmp_path / "mmeb-v2").mkdir()  # the demo world's layout: --data holds mmeb-v2/, which "all" includes
    assert command.parse([*base, "--data", str(tmp_path)]).mmeb_v2 == tmp_path / "mmeb-v2"


def test_graded_scoring_in_chunks_equals_the_whole_and_the_reference_order():
    """rank() with relevance: per-query metrics equal ranking_metrics' definitions over the full order,
    whatever the chunking; "descending" is numpy's argsort of the negated scores over the listed
    columns only, a -inf column in the middle of the row last."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(9, 4, generator=generator), dim=1)
    candidates = torch.tensor([[3, 4, -1, 5, 6, 7], [3, 8, 4, 5, -1, -1], [8, 7, 6, 5, 4, 3]])
    relevance = torch.tensor([[2.0, 0, 1, 0, 0, 1], [0, 1, 2, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    ranking = Ranking(torch.tensor([0, 1, 2]), candidates, relevance.argmax(dim=1), relevance)
    for ties in ("pessimistic", "descending"):
        whole, chunked = rank(ranking, embeddings, ties=ties), rank(ranking, embeddings, budget=1, ties=ties)
        scores = (embeddings[candidates.clamp(min=0)] * embeddings[ranking.queries][:, None]).sum(-1)
        scores = scores.masked_fill(candidates < 0, float("-inf"))
        for q in range(3):
            listed = [c for c in range(6) if candidates[q, c] >= 0]
            order = [listed[i] for i in np.argsort(-scores[q, listed].numpy())]  # the reference's prediction
            labels = {c: relevance[q, c].item() for c in range(6) if relevance[q, c] > 0}
            for k in (1, 5, 10):
                for key, value in brute_force(order, labels, k).items():
                    assert whole.metrics[key][q].item() == pytest.approx(value, abs=1e-6), (ties, q, key)
                    assert chunked.metrics[key][q] == whole.metrics[key][q]
            assert whole.ranks[q] == order.index(ranking.gold[q].item()) + 1
    tied = torch.tensor([[0.5, float("-inf"), 0.5, 0.5]])
    assert ranked_order(tied, torch.zeros(1, 4), "reference")[0].tolist() == [0, 2, 3, 1]


def test_callback_logs_the_v2_scalars(v2_root, tiny_mllama):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(global_step=3, is_global_zero=True, loggers=[logger],
                              precision_plugin=SimpleNamespace(forward_context=nullcontext))
    module = SimpleNamespace(encoder=load_encoder(tiny_mllama).encoder)
    callback = MMEBV2Eval(str(v2_root), subsets=list(SETS), max_queries=2, batch_size=8)
    callback.setup(trainer, module, "fit")
    callback.run(trainer, module)
    [(step, metrics)] = logged
    assert step == 3
    assert {f"eval/mmeb-v2/{key}" for key in [*SETS, "VisDoc VDRv1", "visdoc", "mean_over_sets", "seconds"]} \
        == set(metrics)
    assert 0 <= metrics["eval/mmeb-v2/visdoc"] <= 100


def test_the_docs_fetch_mmeb_v2_and_score_a_model_on_it(tmp_path, monkeypatch, demo_backbone):
    """docs/evaluation.md's MMEB-V2 commands: the fetch in this process, from the fake hub (which another
    process cannot reach), then the evaluation as a user runs it, of a tiny model on the two sets the fake
    hub holds (`--subsets UCF101 ViDoRe_docvqa` added: the other 76 are not there)."""
    serve_v2_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    fetched, scored = doc_commands("docs/evaluation.md", "MMEB-V2 (image, video, visual documents)")
    assert fetch.main(shlex.split(fetched.removeprefix("python -m mme5.data.fetch "))) == 0
    run_doc_commands([scored.replace("CKPT_OR_EXPORT", demo_backbone) + " --subsets UCF101 ViDoRe_docvqa"],
                     tmp_path)
    v2 = json.loads((tmp_path / "runs/eval/v2/scores.json").read_text())["mmeb-v2"]
    assert {name: entry["queries"] for name, entry in v2["datasets"].items()} == {"UCF101": 1,
                                                                                 "ViDoRe_docvqa": 1}
