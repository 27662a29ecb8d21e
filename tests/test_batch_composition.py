"""`data.batch_composition` (issue 26 item 4): per_source batches come from one source group on every rank and
worker, groups are drawn by weight, and resuming (same or another number of slots) stays exact; mixed batches
are those of the stream before the setting existed."""

import hashlib
import itertools
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from helpers import make_sample
from test_stream import ids, take, write_source
from test_train import assert_same_gradients, full_batch_step, run_distributed
from torch.utils.data import DataLoader

import mme5.data.stream as stream_module
from mme5.data.datamodule import ShardDataModule
from mme5.data.schema import Modality
from mme5.data.shards import ShardWriter
from mme5.data.stream import MixedShardStream, Source, SourceRefused, check_batches_fit, group_schedule


def sources_of(tmp_path, *sizes, **groups):
    """Sources a, b, c, ... of `sizes` samples (ids start with their letter); `groups`: name → group."""
    made = []
    for letter, size in zip("abcdef", sizes, strict=False):
        source = write_source(tmp_path / letter, size, prefix=letter, per_shard=4)
        source.group = groups.get(letter)
        made.append(source)
    return made


def origins(batch, runs=1):
    """The set of source letters in each of a batch's `runs` runs."""
    letters = [i[0] for i in ids(batch)]
    size = len(letters) // runs
    return [frozenset(letters[k * size : (k + 1) * size]) for k in range(runs)]


def on_worker(monkeypatch, worker, workers):
    """Make the stream see itself in dataloader worker `worker` of `workers` (as a worker process would)."""
    info = SimpleNamespace(id=worker, num_workers=workers)
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: info)


def global_steps(monkeypatch, sources, ranks, workers, steps, **settings):
    """Per global step, every rank's batch, as the DataLoader serves them: worker t mod W's next batch."""
    per_slot = {}
    for rank, worker in itertools.product(range(ranks), range(workers)):
        on_worker(monkeypatch, worker, workers)
        stream = MixedShardStream(sources, rank=rank, world_size=ranks, shuffle_buffer=1, **settings)
        per_slot[rank, worker] = take(stream, -(-steps // workers))
    return [[per_slot[rank, t % workers][t // workers] for rank in range(ranks)] for t in range(steps)]


def test_mixed_batches_are_those_of_the_stream_before_batch_composition(tmp_path):
    """Regression: 2 ranks' batches and positions, then a resume on 3 ranks, digest as the code before
    `batch_composition` (commit e53d8a4) gave them (paths left out)."""
    a = write_source(tmp_path / "a", 23, prefix="a")
    b = write_source(tmp_path / "b", 17, prefix="b", per_shard=4)
    a.weight = 2.0
    out = []
    for rank in range(2):
        stream = MixedShardStream([a, b], batch_size=3, rank=rank, world_size=2, seed=7, shuffle_buffer=4)
        out += [[ids(batch), batch.position] for batch in take(stream, 15)]
    saved = {0: out[4][1], 1: out[21][1]}
    for rank in range(3):
        stream = MixedShardStream([a, b], batch_size=3, rank=rank, world_size=3, seed=7, shuffle_buffer=4,
                                  resume=saved)
        out += [[ids(batch), batch.position] for batch in take(stream, 6)]
    text = json.dumps(out, sort_keys=True).replace(str(tmp_path), "")
    assert hashlib.sha1(text.encode()).hexdigest() == "a5add91a15bd898487d368836c027e6d6b83e144"


@pytest.mark.parametrize("interleave", [None, 2])
def test_per_source_steps_hold_one_group_on_every_rank_and_worker(tmp_path, monkeypatch, interleave):
    """2 ranks × 2 workers: each run of global step t (the whole batch, or each `interleave_batch_size`
    samples) comes, on every rank, from the group the schedule of step t names (not of a worker's batch
    count: consecutive steps are drawn independently); b and c share a group, so their samples meet."""
    sources = sources_of(tmp_path, 40, 24, 24, b="cls", c="cls")
    runs = 1 if interleave is None else 3
    steps = global_steps(monkeypatch, sources, ranks=2, workers=2, steps=24, batch_size=6, seed=1,
                         batch_composition="per_source", interleave_batch_size=interleave)
    members = {"a": {"a"}, "cls": {"b", "c"}}
    met = False
    for step, batches in enumerate(steps):
        schedule = group_schedule(1, step, {"a": 40, "cls": 24 + 24}, runs)
        for run, group in enumerate(schedule):
            letters = set().union(*(origins(batch, runs)[run] for batch in batches))
            assert letters <= members[group], (step, run, group, letters)
            met |= letters == {"b", "c"}
    assert met
    if interleave:  # the schedule does mix groups inside a batch
        assert any(len(set(group_schedule(1, step, {"a": 40, "cls": 48}, runs))) > 1 for step in range(24))


def test_ranks_agree_through_real_dataloader_workers(tmp_path):
    """The same, with real worker processes and the DataLoader's own order of workers."""
    sources = sources_of(tmp_path, 24, 24)
    loaders = [iter(DataLoader(MixedShardStream(sources, batch_size=2, rank=rank, world_size=2, seed=4,
                                                shuffle_buffer=1, batch_composition="per_source"),
                               batch_size=None, num_workers=2)) for rank in range(2)]
    for step in range(8):
        letters = {i[0] for loader in loaders for i in ids(next(loader))}
        assert len(letters) == 1, (step, letters)


def test_groups_are_drawn_by_weight(tmp_path):
    """Brute force over many steps: each group's share of runs is its weight share; the stream's batches
    follow that schedule with a group weighing its sources' weights (a source without one: its samples), and
    inside a group its sources are drawn by weight."""
    weights = {"a": 1.0, "b": 2.0, "cls": 5.0}
    drawn = Counter(g for step in range(4000) for g in group_schedule(3, step, weights, runs=2))
    for group, weight in weights.items():
        assert abs(drawn[group] / 8000 - weight / 8) < 0.02, group
    a, b, c = sources_of(tmp_path, 24, 12, 36, b="cls", c="cls")
    by_size, by_weight = {"a": 24, "cls": 12 + 36}, {"a": 3, "cls": 1 + 1}
    for weights, expected in (((None, None, None), by_size), ((3.0, 1.0, 1.0), by_weight)):
        a.weight, b.weight, c.weight = weights
        stream = MixedShardStream([a, b, c], batch_size=4, seed=2, shuffle_buffer=1,
                                  batch_composition="per_source")
        batches = take(stream, 400)
        schedule = [group_schedule(2, step, expected, runs=1)[0] for step in range(400)]
        assert [("a" if origins(batch) == [{"a"}] else "cls") for batch in batches] == schedule
        letters = Counter(i[0] for batch in batches for i in ids(batch))
        share_b = (b.weight or 12) / ((b.weight or 12) + (c.weight or 36))
        assert abs(letters["b"] / (letters["b"] + letters["c"]) - share_b) < 0.06, weights


@pytest.mark.parametrize("workers", [1, 2])
def test_a_resumed_per_source_stream_equals_the_uninterrupted_one(tmp_path, monkeypatch, workers):
    sources = sources_of(tmp_path, 23, 17, 13, c="bc", b="bc")
    settings = dict(batch_size=4, seed=5, shuffle_buffer=1, batch_composition="per_source",
                    interleave_batch_size=2)
    for worker in range(workers):
        on_worker(monkeypatch, worker, workers)
        run = take(MixedShardStream(sources, **settings), 14)
        resumed = MixedShardStream(sources, **settings, resume={worker: run[5].position})
        assert [ids(b) for b in take(resumed, 8)] == [ids(b) for b in run[6:]]


@pytest.mark.parametrize("new", [1, 3])
def test_a_per_source_resume_on_another_number_of_ranks_reads_each_sample_of_an_epoch_once(tmp_path, new):
    """Two ranks stop at the same step; `new` ranks go on: over old and new reads every epoch of each source
    holds each of its samples once, and the new ranks still agree on each step's source. Batches of one
    sample, so that the position after a batch gives the epoch its sample was read in."""
    sources = sources_of(tmp_path, 23, 17)
    settings = dict(batch_size=1, seed=3, shuffle_buffer=1, batch_composition="per_source")

    def tagged(batch):
        (sample,) = batch.samples
        return sample.id[0], batch.position["sources"][sample.id[0]]["epoch"], sample.id

    reads, saved = [], {}
    for rank in range(2):
        batches = take(MixedShardStream(sources, rank=rank, world_size=2, **settings), 13)
        reads += map(tagged, batches)
        saved[rank] = batches[-1].position
    high = max(epoch for _, epoch, _ in reads)
    streams = [iter(MixedShardStream(sources, rank=rank, world_size=new, resume=saved, **settings))
               for rank in range(new)]
    for _ in range(200):
        step = [tagged(next(stream)) for stream in streams]
        assert len({letter for letter, _, _ in step}) == 1  # one source for the step on every rank
        reads += step
    for letter, size in (("a", 23), ("b", 17)):
        for epoch in range(high + 2):
            got = sorted(i for source, e, i in reads if source == letter and e == epoch)
            assert got == [f"{letter}{i:04d}" for i in range(size)], (letter, epoch)


def test_the_composition_is_recorded_and_bad_settings_are_refused(tmp_path):
    a, b, c = sources_of(tmp_path, 12, 3, 3, b="cls", c="cls")
    data = ShardDataModule([a, b, c], "unused", batch_size=4, batch_composition="per_source",
                           interleave_batch_size=2)
    assert data.hparams["batch_composition"] == "per_source" and data.hparams["interleave_batch_size"] == 2
    assert [s["group"] for s in data.hparams["sources"]] == [None, "cls", "cls"]  # in checkpoints
    with pytest.raises(ValueError, match=r"interleave_batch_size .* needs data.batch_composition: per_"):
        ShardDataModule([a], "unused", batch_size=4, interleave_batch_size=2)
    with pytest.raises(ValueError, match=r"interleave_batch_size \(3\) must divide data.batch_size \(4\)"):
        ShardDataModule([a], "unused", batch_size=4, batch_composition="per_source", interleave_batch_size=3)
    with pytest.raises(ValueError, match="source a: its name is also the group of other sources"):
        MixedShardStream([a, Source(b.path, group="a")], batch_size=2)
    check_batches_fit([a, b, c], 6, 1, "per_source")  # b and c fill a batch together: 6 samples
    with pytest.raises(SourceRefused, match=r"group cls holds 6 samples.*data.batch_composition: mixed"):
        check_batches_fit([a, b, c], 7, 1, "per_source")
    check_batches_fit([a, b, c], 7, 1, "mixed")


def test_the_data_module_streams_per_source_batches(tmp_path, tiny_mllama):
    """The setting reaches the stream through `train_dataloader` (collated batches of one source each)."""
    sources = sources_of(tmp_path, 12, 12)
    data = ShardDataModule(sources, tiny_mllama, batch_size=4, num_negatives=1, num_workers=0,
                           shuffle_buffer=1, batch_composition="per_source")
    batches = list(itertools.islice(iter(data.train_dataloader()), 6))
    assert all(len({i[0] for i in batch.ids}) == 1 for batch in batches)
    assert {batch.ids[0][0] for batch in batches} == {"a", "b"}


# ----------------------------------------------------------------------------- under Lightning DDP


@pytest.fixture(scope="module")
def second_source(tmp_path_factory):
    """48 samples whose ids (t...) tell them from the `tiny_shards` ones (s...), in 2 shards."""
    path = tmp_path_factory.mktemp("second")
    with ShardWriter(path, max_count=24) as writer:
        for i in range(48):
            writer.write(make_sample(i, list(Modality)[i % 7], negatives=i % 3, id=f"t{i:05d}"))
    return str(path)


@pytest.mark.slow
def test_per_source_under_ddp_one_source_a_step_full_batch_gradient_and_resume(tmp_path, tiny_mllama,
                                                                              tiny_shards, second_source):
    """2 processes (gloo), gradient cache on: each step's batch comes from one source on both ranks, the
    gradient is the single process's on the global batch, and an interrupted run resumes the same run."""
    options = ["--per-source", second_source, "--steps", "3"]
    straight = run_distributed(tmp_path / "straight", tiny_mllama, tiny_shards, "ddp", *options)
    # Which source a sample came from: its id's first letter.
    steps = [{i[0] for rank in step for i in rank} for step in straight["ids_per_step"]]
    assert all(len(letters) == 1 for letters in steps), steps
    assert set().union(*steps) == {"s", "t"}  # both drawn (seed 0): a mix-up could show
    gradients, _ = full_batch_step(tiny_mllama, [tiny_shards, second_source], straight)
    assert_same_gradients(straight, gradients)

    interrupted = tmp_path / "interrupted"
    run_distributed(interrupted, tiny_mllama, tiny_shards, "ddp", *options, "--stop-at", "2")
    resumed = run_distributed(interrupted, tiny_mllama, tiny_shards, "ddp", *options,
                              "--resume", str(interrupted / "ckpt" / "last.ckpt"))
    assert resumed["global_step"] == 3 and resumed["ids"] == straight["ids"]
    assert resumed["ids_per_step"] == straight["ids_per_step"][2:]
    for name, weight in straight["after"].items():
        torch.testing.assert_close(resumed["after"][name], weight, atol=1e-6, rtol=1e-5, msg=name)
