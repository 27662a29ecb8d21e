"""Hard-negative mining: the rank band, the false-negative margin and content duplicates against a brute force
on embeddings we control; resuming; the command on a tiny backbone. And the shared retrieval component."""

import json
import math
import multiprocessing
import os
import signal
import time
from dataclasses import replace

import pytest
import torch
from helpers import make_sample

from mme5.data import mine as mining
from mme5.data.collate import ContrastiveCollator
from mme5.data.schema import Modality, Side
from mme5.data.shards import ShardWriter, read_samples, shard_urls
from mme5.data.stream import StreamBatch
from mme5.files import FolderHoldsOtherOutput, identity_changes
from mme5.retrieval import nearest

N = 14


def angle(text: str) -> float:
    """Positive and query i sit at angle 0.2·i (query slightly off), so neighbours are the nearest indices."""
    role, index = text.split()[0], int(text.split()[-1])
    return 0.2 * index + (0.01 if role == "query" else 0.0)


def fake_embed(calls, angle=angle):
    def embed(items):
        calls.append(len(items))
        return torch.tensor([[math.cos(angle(item.text)), math.sin(angle(item.text)), 0.0] for item in items])
    return embed


def source(path, shared=False):
    """N samples (image+text queries, text positives); with `shared`, samples 5 and 6 share one positive."""
    with ShardWriter(path, max_count=4) as writer:
        for i in range(N):
            sample = make_sample(i, Modality.IT2T, negatives=1 if i == 3 else 0)
            if shared and i == 6:
                sample.positive = Side(instruction=sample.positive.instruction, text="positive 5")
            writer.write(sample)
    return path


def brute_force(i, band, margin, shared_with=None):
    """Candidate positives j (not i's own, nor one with its content) by (-cosine, j), band, margin."""
    query = angle(f"query {i}")
    own = i if shared_with is None else shared_with
    others = [j for j in range(N) if j != own and j != i and not (shared_with is not None and j == 6)]
    ranked = sorted(others, key=lambda j: (-math.cos(query - angle(f"positive {j}")), j))
    positive = math.cos(query - angle(f"positive {own}"))
    return [j for j in ranked[band[0] - 1 : band[1]]
            if math.cos(query - angle(f"positive {j}")) < margin * positive]


@pytest.mark.parametrize("band, margin, max_negatives",
                         [((1, 4), 2.0, 2), ((2, 6), 0.95, 3), ((1, 13), 0.999, 5)])
def test_mined_negatives_equal_a_brute_force(tmp_path, band, margin, max_negatives):
    calls = []
    settings = mining.MiningSettings(band, max_negatives, margin)
    manifest = mining.mine(source(tmp_path / "src"), tmp_path / "out", fake_embed(calls), "fake", settings,
                           shard_size=5)
    samples = sorted(read_samples(shard_urls(tmp_path / "out")), key=lambda s: s.id)
    assert [s.id for s in samples] == [f"s{i:05d}" for i in range(N)]
    for i, sample in enumerate(samples):
        mined = [n.text for n in sample.negatives if n.text.startswith("positive")]
        own = [n.text for n in sample.negatives[len(mined):]]
        assert own == (["negative0 3"] if i == 3 else [])  # the sample's own negatives follow, kept
        assert mined == [f"positive {j}" for j in brute_force(i, band, margin)[:max_negatives]], i
    counts = manifest["extra"]["mined"]["counts"]
    assert counts["samples"] == N and counts["mined"] == sum(len(s.negatives) for s in samples) - 1
    if margin == 0.95:  # the nearest neighbours (0.2 rad away) score above 0.95 × the positive
        assert counts["dropped_as_false_negative"] > 0
    assert manifest["extra"]["mined"]["rank_band"] == list(band)


def test_a_positive_shared_by_two_samples_is_never_mined_for_either(tmp_path):
    mining.mine(source(tmp_path / "src", shared=True), tmp_path / "out", fake_embed([]), "fake",
                mining.MiningSettings((1, 3), 3, 2.0))
    by_id = {s.id: s for s in read_samples(shard_urls(tmp_path / "out"))}
    for i in (5, 6):
        texts = [n.text for n in by_id[f"s{i:05d}"].negatives]
        assert "positive 5" not in texts and len(texts) == 3, (i, texts)


def test_mining_resumes_without_embedding_again(tmp_path, monkeypatch):
    settings = mining.MiningSettings((1, 5), 2, 0.99)
    reference = mining.mine(source(tmp_path / "src"), tmp_path / "ref", fake_embed([]), "fake", settings, 3)
    calls, written = [], {"n": 0}
    original = ShardWriter.write

    def dying(self, *args, **kwargs):
        written["n"] += 1
        if written["n"] == 8:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        mining.mine(tmp_path / "src", tmp_path / "out", fake_embed(calls), "fake", settings, 3)
    monkeypatch.setattr(ShardWriter, "write", original)
    resumed = mining.mine(tmp_path / "src", tmp_path / "out", fake_embed(calls), "fake", settings, 3)
    assert calls == [N, N]  # queries and candidates embedded once, by the first run
    for a, b in zip(shard_urls(tmp_path / "ref"), shard_urls(tmp_path / "out"), strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert resumed["num_samples"] == reference["num_samples"] == N
    assert mining.mine(tmp_path / "src", tmp_path / "out", None, "fake", settings, 3) == resumed  # complete
    replaced = mining.mine(tmp_path / "src", tmp_path / "replaced", fake_embed([]), "fake",
                           mining.MiningSettings((1, 5), 2, 0.99, placement="replace"), 3)
    assert replaced["extra"]["mined"]["placement"] == "replace"
    three = {s.id: [n.text for n in s.negatives] for s in read_samples(shard_urls(tmp_path / "replaced"))}
    assert three["s00003"] and "negative0 3" not in three["s00003"]  # its own negative is gone


def test_other_mining_into_the_same_out_is_refused_unless_overwrite_which_swaps_it_in(tmp_path):
    settings = mining.MiningSettings((1, 5), 2, 0.99)
    mining.mine(source(tmp_path / "src"), tmp_path / "out", fake_embed([]), "fake", settings, 3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")}
    other = mining.MiningSettings((1, 5), 1, 0.99)
    with pytest.raises(FolderHoldsOtherOutput, match=r"model: \"fake\" \(recorded\) → \"other\"") as error:
        mining.mine(tmp_path / "src", tmp_path / "out", fake_embed([]), "other", settings, 3)
    assert "--overwrite" in str(error.value)
    with pytest.raises(FolderHoldsOtherOutput, match=r"max_negatives: 2 \(recorded\) → 1 \(now\)"):
        mining.mine(tmp_path / "src", tmp_path / "out", fake_embed([]), "fake", other, 3)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")} == before  # nothing touched
    manifest = mining.mine(tmp_path / "src", tmp_path / "out", fake_embed([]), "fake", other, 3,
                           overwrite=True)
    assert manifest["extra"]["mined"]["max_negatives"] == 1
    assert all(len(s.negatives) <= 1 + (s.id == "s00003") for s in read_samples(shard_urls(tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no replacement left beside it


def test_mined_negatives_are_the_ones_the_collator_reads(tmp_path):
    """Case 7: every sample already has 3 negatives of its own; with `data.num_negatives` 1 or 3 the training
    batch holds the mined ones (placed first), and the manifest says how many land within the first K."""
    with ShardWriter(tmp_path / "src", max_count=4) as writer:
        for i in range(N):
            writer.write(make_sample(i, Modality.IT2T, negatives=3))
    manifest = mining.mine(tmp_path / "src", tmp_path / "out", fake_embed([]), "fake",
                           mining.MiningSettings((1, 13), 3, 2.0))
    samples = sorted(read_samples(shard_urls(tmp_path / "out")), key=lambda s: s.id)
    for k in (1, 3):
        seen = []

        def collate(items, seen=seen):
            seen.append(list(items))
            return {}

        batch = ContrastiveCollator(collate, num_negatives=k)(StreamBatch(samples, slot=0, position={}))
        assert batch.negative_mask.all()
        read = [item.text for item in seen[2]]  # query, positive, then the negatives, sample by sample
        mined = [f"positive {j}" for i in range(N) for j in brute_force(i, (1, 13), 2.0)[:k]]
        assert read == mined, k
        assert mining.mined_within(manifest, k) == k * N
    assert manifest["extra"]["mined"]["positions"] == {"0": N, "1": N, "2": N}
    appended = mining.mine(tmp_path / "src", tmp_path / "appended", fake_embed([]), "fake",
                           mining.MiningSettings((1, 13), 3, 2.0, placement="append"))
    assert mining.mined_within(appended, 3) == 0 and mining.mined_within(appended, 6) == 3 * N


def test_the_command_mines_with_a_tiny_backbone(tmp_path, tiny_mllama, tiny_shards, capsys, monkeypatch):
    command = ["--model", tiny_mllama, "--shards", tiny_shards, "--out", str(tmp_path / "out"),
               "--rank-band", "2:6", "--max-negatives", "2", "--margin", "1.5"]
    assert mining.main([*command, "--num-negatives", "1"]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out.strip().splitlines()[-1])
    before = {s.id: len(s.negatives) for s in read_samples(shard_urls(tiny_shards))}
    after = {s.id: len(s.negatives) for s in read_samples(shard_urls(tmp_path / "out"))}
    assert before.keys() == after.keys() and report["samples"] == len(before)
    assert sum(after.values()) - sum(before.values()) == report["counts"]["mined"] > 0
    # One slot a sample: the first mined negative of each sample that got one is read, the second is not.
    assert report["read_by_training"] == {"num_negatives": 1, "mined": sum(n > b for n, b in zip(
        after.values(), before.values(), strict=True))}
    assert f"reads {report['read_by_training']['mined']} of the {report['counts']['mined']}" in printed.err

    import mme5.checkpoint

    monkeypatch.setattr(mme5.checkpoint, "load_encoder", lambda *a, **k: pytest.fail("complete: not loaded"))
    assert mining.main(command) == 0  # the same mining again: complete, the model is not even loaded
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"] == report["counts"]
    assert mining.main([*command[:-1], "1.2"]) == 2  # another margin: refused, naming it and the way out
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "margin: 1.5 (recorded) → 1.2 (now)" in error
    assert "--overwrite" in error


def test_an_out_overlapping_the_source_is_refused(tmp_path, capsys):
    src = source(tmp_path / "src")
    for out in (src, src / "mined", tmp_path):
        with pytest.raises(ValueError, match="overlap"):
            mining.mine(src, out, fake_embed([]), "fake", mining.MiningSettings())
    assert mining.main(["--model", "unused", "--shards", str(src), "--out", str(src)]) == 2
    assert "overlap" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == sorted(["manifest.json", *(
        f"shard-{i:06d}.tar" for i in range(4))])  # nothing written into the source


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1536])


def _garble(path):
    path.write_bytes(b"x" * path.stat().st_size)


def _drop_last_sample(path):
    """Cut the shard after its first three samples (a clean tar boundary) and make the manifest's size agree,
    as a hand-edited or half-copied source would: only the count shows the loss."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keep = [m for m in members if not m.name.startswith(members[-1].name.split(".")[0])]
    end = keep[-1].offset_data + (keep[-1].size + 511) // 512 * 512
    path.write_bytes(path.read_bytes()[:end])
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for info in manifest["shards"]:
        if info["file"] == path.name:
            info["bytes"] = end
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "is missing"), (_truncate, "the manifest records"), (_garble, "cannot be read"),
    (_drop_last_sample, "3 samples read, the manifest counts 4")])
def test_a_damaged_source_shard_stops_mining_naming_it(tmp_path, damage, message):
    """Case 10: a source shard that is gone, truncated, unreadable or short of samples is an error naming
    the shard, never a mining run that drops its samples silently."""
    src = source(tmp_path / "src")
    damage(src / "shard-000001.tar")
    with pytest.raises(ValueError, match=message) as error:
        mining.mine(src, tmp_path / "out", fake_embed([]), "fake", mining.MiningSettings((1, 3), 1, 2.0))
    assert "shard-000001.tar" in str(error.value)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_a_source_whose_conversion_did_not_finish_is_refused(tmp_path):
    src = source(tmp_path / "src")
    manifest = json.loads((src / "manifest.json").read_text())
    (src / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="not marked complete"):
        mining.mine(src, tmp_path / "out", fake_embed([]), "fake", mining.MiningSettings())
    assert not (tmp_path / "out").exists()


def test_nearest_equals_a_brute_force_with_ties_and_exclusions():
    generator = torch.Generator().manual_seed(0)
    candidates = torch.nn.functional.normalize(torch.randn(30, 4, generator=generator), dim=-1)
    candidates[7] = candidates[3]  # an exact tie: the lower index first
    queries = torch.cat([candidates[3:4], torch.randn(4, 4, generator=generator)])
    excluded = [[0], [], [5, 6, 7], [], list(range(28))]
    scores, indices = nearest(queries, candidates, 10, excluded, chunk=2)
    for q in range(queries.shape[0]):
        sims = (candidates @ queries[q]).tolist()
        expected = sorted((j for j in range(30) if j not in excluded[q]), key=lambda j: (-sims[j], j))[:10]
        got = [j for j in indices[q].tolist() if j >= 0]
        assert got == expected, q
    assert indices[0].tolist()[:2] == [3, 7]
    assert indices[4].tolist()[2:] == [-1] * 8 and torch.isinf(scores[4, 2:]).all()


@pytest.mark.parametrize("band", ["abc", "50:10", "0:5"])
def test_a_bad_rank_band_is_a_usage_error_before_any_work(band, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mining.main(["--model", "unused", "--shards", "unused", "--out", "unused", "--rank-band", band])
    assert exit_info.value.code == 2 and "--rank-band" in capsys.readouterr().err


def test_within_keeps_candidates_to_samples_sharing_the_fields(tmp_path):
    """`within=("language",)`: a query's candidates are the positives of samples in its own language, and
    the picks equal the brute force restricted to them; the setting is recorded; unknown fields refused."""
    with ShardWriter(tmp_path / "src", max_count=4) as writer:
        for i in range(N):
            writer.write(make_sample(i, Modality.IT2T, negatives=0, language="de" if i % 2 else "en"))
    settings = mining.MiningSettings((1, 3), 2, 2.0, within=("language",))
    manifest = mining.mine(tmp_path / "src", tmp_path / "out", fake_embed([]), "fake", settings)
    for sample in read_samples(shard_urls(tmp_path / "out")):
        i = int(sample.id[1:])
        query = angle(f"query {i}")
        same = [j for j in range(N) if j != i and j % 2 == i % 2]
        ranked = sorted(same, key=lambda j: (-math.cos(query - angle(f"positive {j}")), j))
        assert [n.text for n in sample.negatives] == [f"positive {j}" for j in ranked[:2]], i
    assert manifest["extra"]["mined"]["within"] == ["language"]
    with pytest.raises(ValueError, match=r"within: unknown field\(s\) \['colour'\]"):
        mining.MiningSettings(within=("colour",))


def test_an_out_that_is_or_holds_the_model_is_refused_even_with_overwrite(tmp_path):
    """--overwrite swaps the folder away: `--out MODEL --overwrite` deleted the model it was mining with."""
    from mme5.files import OutputFolderError
    from mme5.hub import model_identity

    src = source(tmp_path / "src")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    settings = mining.MiningSettings()
    checkpoint = tmp_path / "runs" / "last.ckpt"
    checkpoint.write_bytes(b"weights")
    for model, out in ((tmp_path / "model", tmp_path / "model"), (checkpoint, tmp_path / "runs")):
        with pytest.raises(OutputFolderError, match="holds the input"):
            mining.mine(src, out, fake_embed([]), model_identity(model), settings, overwrite=True)
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
    assert checkpoint.read_bytes() == b"weights"


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-3"), ("--shard-size", "0"),
                                         ("--margin", "-1"), ("--margin", "nan"), ("--dtype", "float64"),
                                         ("--min-positive-score", "1.5"), ("--min-positive-score", "nan"),
                                         ("--min-positive-score", "-2"), ("--below-positive", "2.5"),
                                         ("--below-positive", "nan")])
def test_a_bad_number_or_dtype_is_a_usage_error_before_any_work(flag, value, tmp_path, capsys):
    """`--batch-size -3` mined from no embeddings without a word, `--shard-size 0` wrote a shard a sample,
    `--dtype float64` was a KeyError after --out was claimed; a threshold outside the cosine's range (or NaN,
    which no score reaches) kept or dropped every sample or candidate."""
    with pytest.raises(SystemExit) as exit_info:
        mining.main(["--model", "unused", "--shards", "unused", "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


NOISY = (2, 9)  # samples whose query sits 1 rad away from its positive: label noise to a mining model


def refined_angle(text: str) -> float:
    role, index = text.split()[0], int(text.split()[-1])
    return 0.2 * index + (0.01 + (index in NOISY) if role == "query" else 0.0)


def refinement_source(path):
    """N samples; samples 2 and 9 are noisy, sample 6 asks sample 5's query (a query with two positives)."""
    with ShardWriter(path, max_count=4) as writer:
        for i in range(N):
            sample = make_sample(i, Modality.IT2T, negatives=0)
            if i == 6:
                sample.query = make_sample(5, Modality.IT2T).query
            writer.write(sample)
    return path


def refined_brute_force(band, max_negatives, threshold, delta, report_only):
    """Qwen3-VL-Embedding §3.3 by hand: {kept sample: mined positive indices}, and the samples at or below t⁺.
    Scores are cosines of the angles; a query's positives are those of every sample asking it."""
    query_of = {i: 5 if i == 6 else i for i in range(N)}

    def score(i, j):
        return math.cos(refined_angle(f"query {query_of[i]}") - refined_angle(f"positive {j}"))

    low = [i for i in range(N) if score(i, i) <= threshold]
    kept = [i for i in range(N) if report_only or i not in low]
    mined = {}
    for i in kept:
        positives = [k for k in range(N) if query_of[k] == query_of[i]]
        mean = sum(score(k, k) for k in positives if k in kept) / sum(k in kept for k in positives)
        ranked = sorted((j for j in range(N) if j not in positives), key=lambda j: (-score(i, j), j))
        mined[i] = [j for j in ranked[band[0] - 1 : band[1]] if score(i, j) < mean + delta][:max_negatives]
    return mined, low, {i: score(i, i) for i in low}


@pytest.mark.parametrize("threshold, delta, report_only",
                         [(0.9, -0.05, False), (0.99, -0.02, False), (0.99, -0.015, True)])
def test_positive_refinement_and_below_positive_equal_a_brute_force(tmp_path, threshold, delta, report_only):
    """t⁺ 0.9 drops the noisy samples 2 and 9; 0.99 drops sample 6 too, so query 5's mean positive score is
    its other sample's alone (with --report-only, the mean of both). Dropped samples' positives stay
    candidates for the other queries; a query's two positives are never mined for it."""
    calls = []
    settings = mining.MiningSettings((1, 6), 3, None, min_positive_score=threshold, report_only=report_only,
                                     below_positive=delta)
    manifest = mining.mine(refinement_source(tmp_path / "src"), tmp_path / "out",
                           fake_embed(calls, refined_angle), "fake", settings, shard_size=5)
    expected, low, low_scores = refined_brute_force((1, 6), 3, threshold, delta, report_only)
    assert low == ([2, 6, 9] if threshold == 0.99 else [2, 9])
    samples = {int(s.id[1:]): s for s in read_samples(shard_urls(tmp_path / "out"))}
    assert sorted(samples) == sorted(expected) and manifest["num_samples"] == len(expected)
    for i, sample in samples.items():
        assert [n.text for n in sample.negatives] == [f"positive {j}" for j in expected[i]], i
    assert not report_only or any("positive 2" in [n.text for n in s.negatives] for s in samples.values())
    assert "positive 6" not in [n.text for n in samples[5].negatives]
    listed = [json.loads(line) for line in (tmp_path / "out" / mining.REFINEMENT).read_text().splitlines()]
    assert [(r["id"], r["shard"], r["row"], r["dropped"]) for r in listed] == [
        (f"s{i:05d}", f"shard-{i // 4:06d}.tar", i % 4, not report_only) for i in low]
    assert [r["positive_score"] for r in listed] == pytest.approx([low_scores[i] for i in low], abs=1e-5)
    recorded = manifest["extra"]["mined"]
    assert (recorded["min_positive_score"], recorded["report_only"], recorded["below_positive"],
            recorded["margin"], recorded["low_positives"]) == (threshold, report_only, delta, None,
                                                                mining.REFINEMENT)
    counts = recorded["counts"]
    assert counts["positive_below_min_score"] == len(low)
    assert counts["dropped_for_positive_score"] == (0 if report_only else len(low))
    assert counts["mined"] == sum(map(len, expected.values())) and counts["dropped_above_positive_mean"] > 0


def test_max_negatives_0_refines_the_positives_and_mines_nothing(tmp_path):
    """Positive refinement alone: the samples at or below t⁺ are dropped, the others written as they were
    (their own negatives untouched); without t⁺, 0 negatives is no mining at all and is refused."""
    source = tmp_path / "src"
    with ShardWriter(source, max_count=4) as writer:
        for i in range(N):
            writer.write(make_sample(i, Modality.IT2T, negatives=2))
    settings = mining.MiningSettings((1, 6), 0, None, min_positive_score=0.9)
    manifest = mining.mine(source, tmp_path / "out", fake_embed([], refined_angle), "fake", settings)
    original = {s.id: s for s in read_samples(shard_urls(source))}
    written = {s.id: s for s in read_samples(shard_urls(tmp_path / "out"))}
    assert sorted(written) == sorted(set(original) - {"s00002", "s00009"})  # the noisy ones, as above
    assert all(written[i].negatives == original[i].negatives for i in written)
    assert manifest["extra"]["mined"]["counts"]["mined"] == 0
    with pytest.raises(ValueError, match=r"at least 1 \(0 only with min_positive_score"):
        mining.MiningSettings((1, 6), 0, 0.95)


def test_the_command_reports_low_positives_and_refuses_contradictory_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mining, "lazy_embed", lambda args: fake_embed([], refined_angle))
    src = refinement_source(tmp_path / "src")
    command = ["--model", "fake", "--shards", str(src), "--out", str(tmp_path / "out"), "--rank-band", "1:6",
               "--below-positive", "0", "--min-positive-score", "0.9", "--report-only"]
    assert mining.main(command) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out.strip().splitlines()[-1])
    assert report["samples"] == N and report["counts"]["positive_below_min_score"] == 2
    assert f"2 samples' positive scored at most 0.9 (0 dropped); each is named in {tmp_path / 'out'}" \
        in printed.err
    recorded = json.loads((tmp_path / "out" / "manifest.json").read_text())["extra"]["mined"]
    assert recorded["margin"] is None and recorded["below_positive"] == 0.0  # δ replaces the default margin
    for flags, message in ((["--report-only"], "give it too"),
                           (["--margin", "0.9", "--below-positive", "0.1"], "not allowed with")):
        with pytest.raises(SystemExit) as exit_info:
            mining.main(["--model", "fake", "--shards", str(src), "--out", str(tmp_path / "other"), *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_folder_mined_before_positive_refinement_keeps_its_identity(tmp_path):
    """Settings added later are None when off, as an older folder's record reads them: it still resumes."""
    settings = mining.MiningSettings()
    now = mining.mining_identity(source(tmp_path / "src"), "m", settings, 1000)
    added = ("min_positive_score", "report_only", "below_positive")
    before = {k: v for k, v in now.items() if k not in added}
    assert identity_changes(before, now) == {}


def test_settings_outside_the_cosine_range_are_refused():
    for field, value in (("min_positive_score", 1.01), ("min_positive_score", math.nan),
                         ("below_positive", -3)):
        with pytest.raises(ValueError, match=rf"{field} must be between"):
            mining.MiningSettings(**{field: value})
    mining.MiningSettings(min_positive_score=-1.0, below_positive=2.0)  # the range's ends


def test_every_sample_below_the_threshold_stops_naming_them_instead_of_an_empty_source(tmp_path):
    src = refinement_source(tmp_path / "src")
    settings = mining.MiningSettings((1, 6), 3, None, min_positive_score=1.0)  # every cosine is at most 1
    with pytest.raises(ValueError, match=rf"every one of the {N} samples .* at most that \(highest: 1.0000"):
        mining.mine(src, tmp_path / "out", fake_embed([], refined_angle), "fake", settings, shard_size=5)
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "manifest.json").exists()
    listed = (tmp_path / "out" / mining.REFINEMENT).read_text().splitlines()
    assert len(listed) == N and all(json.loads(line)["dropped"] for line in listed)


def _mine_until_killed(src, out, settings, written):
    """Mining that hangs after its 6th sample (a shard of 5 finished, the next one open), to be SIGKILLed."""
    original = ShardWriter.write

    def hanging(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.num_written == 6:
            written.set()
            time.sleep(600)

    ShardWriter.write = hanging
    mining.mine(src, out, fake_embed([], refined_angle), "fake", settings, shard_size=5)


def test_a_refining_run_killed_mid_write_resumes_alike_and_other_flags_are_refused(tmp_path):
    """SIGKILLed mid-shard: other refinement flags are refused naming the flag, never mixed into the folder;
    the same flags resume to the uninterrupted output (shards and the list of low positives)."""
    settings = mining.MiningSettings((1, 6), 3, None, min_positive_score=0.9, below_positive=-0.05)
    src = refinement_source(tmp_path / "src")
    mining.mine(src, tmp_path / "ref", fake_embed([], refined_angle), "fake", settings, shard_size=5)
    context = multiprocessing.get_context("fork")
    written = context.Event()
    child = context.Process(target=_mine_until_killed, args=(src, tmp_path / "out", settings, written))
    child.start()
    assert written.wait(120)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "shard-000000.tar" in before and "manifest.json" in before  # one shard finished before the kill
    for key, value in (("min_positive_score", 0.99), ("report_only", True), ("below_positive", 0.0)):
        with pytest.raises(FolderHoldsOtherOutput, match=rf"{key}: .* \(recorded\) → .* \(now\)"):
            mining.mine(src, tmp_path / "out", fake_embed([], refined_angle), "fake",
                        replace(settings, **{key: value}), shard_size=5)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    calls = []
    mining.mine(src, tmp_path / "out", fake_embed(calls, refined_angle), "fake", settings, shard_size=5)
    assert calls == []  # the embeddings saved before the kill
    for name in [*(p.name for p in (tmp_path / "ref").glob("*.tar")), mining.REFINEMENT, "manifest.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
