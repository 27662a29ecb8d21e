"""Hard-negative mining: the rank band, the false-negative margin and content duplicates against a brute force
on embeddings we control; resuming; the command on a tiny backbone. And the shared retrieval component."""

import json
import math

import pytest
import torch
from helpers import make_sample

from mme5.data import mine as mining
from mme5.data.schema import Modality, Side
from mme5.data.shards import ShardWriter, read_samples, shard_urls
from mme5.retrieval import nearest

N = 14


def angle(text: str) -> float:
    """Positive and query i sit at angle 0.2·i (query slightly off), so neighbours are the nearest indices."""
    role, index = text.split()[0], int(text.split()[-1])
    return 0.2 * index + (0.01 if role == "query" else 0.0)


def fake_embed(calls):
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
        own = [n.text for n in sample.negatives[: 1 if i == 3 else 0]]
        assert own == (["negative0 3"] if i == 3 else [])  # the sample's own negatives come first, kept
        mined = [n.text for n in sample.negatives[len(own):]]
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
    replaced = mining.mine(tmp_path / "src", tmp_path / "replaced", fake_embed([]), "fake",
                           mining.MiningSettings((1, 5), 2, 0.99, replace=True), 3)
    assert replaced["extra"]["mined"]["replace"] is True
    three = {s.id: [n.text for n in s.negatives] for s in read_samples(shard_urls(tmp_path / "replaced"))}
    assert three["s00003"] and "negative0 3" not in three["s00003"]  # its own negative is gone
    with pytest.raises(FileExistsError, match="another mining run"):
        mining.mine(tmp_path / "src", tmp_path / "out", fake_embed([]), "other model", settings, 3)


def test_the_command_mines_with_a_tiny_backbone(tmp_path, tiny_mllama, tiny_shards, capsys):
    assert mining.main(["--model", tiny_mllama, "--shards", tiny_shards, "--out", str(tmp_path / "out"),
                        "--rank-band", "2:6", "--max-negatives", "2", "--margin", "1.5"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    before = {s.id: len(s.negatives) for s in read_samples(shard_urls(tiny_shards))}
    after = {s.id: len(s.negatives) for s in read_samples(shard_urls(tmp_path / "out"))}
    assert before.keys() == after.keys() and report["samples"] == len(before)
    assert sum(after.values()) - sum(before.values()) == report["counts"]["mined"] > 0


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
