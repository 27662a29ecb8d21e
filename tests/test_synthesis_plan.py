"""The synthesis plan: deterministic, weighted as configured, splittable, and round-trips through disk."""

import pytest

from mme5.data.schema import Modality, Task
from mme5.synthesis.languages import LANGUAGES, default_language_weights, language_name
from mme5.synthesis.plan import COMBINATIONS, make_plan, read_plan, split, summary, write_plan


def test_languages_are_93_distinct_with_english_most_weighted():
    assert len(LANGUAGES) == 93 and len(set(LANGUAGES.values())) == 93
    weights = default_language_weights()
    assert sum(weights.values()) == pytest.approx(1.0)
    assert max(weights, key=weights.get) == "en"
    assert language_name("sw") == "Swahili"


def test_same_seed_gives_identical_plan_bytes(tmp_path):
    a = write_plan(make_plan(500, seed=7), tmp_path / "a.jsonl").read_bytes()
    b = write_plan(make_plan(500, seed=7), tmp_path / "b.jsonl").read_bytes()
    c = write_plan(make_plan(500, seed=8), tmp_path / "c.jsonl").read_bytes()
    assert a == b
    assert a != c


def test_ids_are_stable_and_unique():
    plan = make_plan(300, seed=3)
    assert [s.id for s in plan[:2]] == ["syn-3-0", "syn-3-1"]
    assert len({s.id for s in plan}) == 300
    assert make_plan(300, seed=3)[:100] == make_plan(100, seed=3)  # a longer plan extends a shorter one


def test_default_weights_are_roughly_respected():
    n = 6000
    counts = summary(make_plan(n, seed=0))
    assert set(counts["combination"]) == {f"{t}/{m}" for t, m in COMBINATIONS}
    for count in counts["combination"].values():
        assert abs(count - n / len(COMBINATIONS)) < 0.2 * n / len(COMBINATIONS)
    assert next(iter(counts["language"])) == "en"
    assert counts["language"]["en"] / n == pytest.approx(0.3, abs=0.03)
    assert sum(counts["task"].values()) == sum(counts["language"].values()) == n


def test_custom_weights_are_respected():
    plan = make_plan(4000, seed=1,
                     combination_weights={(Task.RETRIEVAL, Modality.T2I): 3.0, ("vqa", "IT2T"): 1.0},
                     language_weights={"de": 1.0, "ja": 1.0})
    combos = summary(plan)["combination"]
    assert set(combos) == {"retrieval/T2I", "vqa/IT2T"}
    assert combos["retrieval/T2I"] / combos["vqa/IT2T"] == pytest.approx(3, rel=0.15)
    assert set(summary(plan)["language"]) == {"de", "ja"}


@pytest.mark.parametrize("kwargs", [
    {"combination_weights": {(Task.VQA, Modality.I2I): 1.0}},  # not one of the paper's combinations
    {"language_weights": {"xx": 1.0}},
    {"language_weights": {"en": -1.0, "de": 2.0}},
    {"language_weights": {"en": 0.0}},
])
def test_bad_weights_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_plan(10, seed=0, **kwargs)


def test_split_partitions_the_plan():
    plan = make_plan(103, seed=5)
    shards = [split(plan, 4, i) for i in range(4)]
    ids = [s.id for shard in shards for s in shard]
    assert sorted(ids) == sorted(s.id for s in plan) and len(ids) == len(set(ids))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert split(plan, 4, 2) == shards[2]
    with pytest.raises(ValueError):
        split(plan, 4, 4)


def test_plan_round_trips_through_disk(tmp_path):
    plan = make_plan(50, seed=2)
    path = write_plan(plan, tmp_path / "sub" / "plan.jsonl")
    assert read_plan(path) == plan
    assert [p.name for p in path.parent.iterdir()] == ["plan.jsonl"]  # no temporary file left behind
    write_plan(plan[:10], path)  # an atomic overwrite replaces the whole file
    assert read_plan(path) == plan[:10]


def test_bad_plan_line_names_file_and_line(tmp_path):
    path = write_plan(make_plan(3, seed=0), tmp_path / "plan.jsonl")
    path.write_text(path.read_text() + '{"id": "x", "task": "dancing"}\n')
    with pytest.raises(ValueError, match=r"plan\.jsonl:4"):
        read_plan(path)
