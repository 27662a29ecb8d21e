import io
import itertools
import json
import re
import tarfile
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import make_sample

from mme5.backbones.base import PADDING_IMAGE_ROW, PADDING_ROW
from mme5.data.collate import ContrastiveCollator
from mme5.data.schema import Modality
from mme5.data.shards import ReadStats, ShardWriter
from mme5.data.stream import (
    MixedShardStream,
    Slot,
    Source,
    SourceReader,
    SourceRefused,
    check_batches_fit,
)


def write_source(path, count, prefix="s", per_shard=5, modality=Modality.IT2T):
    with ShardWriter(path, max_count=per_shard) as writer:
        for i in range(count):
            writer.write(make_sample(i, modality, negatives=i % 3, id=f"{prefix}{i:04d}", source=path.name))
    return Source(str(path))


def ids(batch):
    return [s.id for s in batch.samples]


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


@pytest.mark.parametrize("count, per_shard", [(40, 5), (12, 6)])  # 8 shards ≥ 4 slots; 2 shards < 4 slots
def test_slots_partition_each_epoch(tmp_path, count, per_shard):
    source = write_source(tmp_path / "a", count, per_shard=per_shard)
    seen = []
    for index in range(4):
        reader = SourceReader(source, Slot(index, 4), seed=0, stats=ReadStats(), strict=True)
        for sample, _ in reader:
            if reader.position["epoch"] > 0:
                break
            seen.append(sample.id)
    assert sorted(seen) == [f"s{i:04d}" for i in range(count)]  # every sample once, no slot overlaps


def test_stream_is_unbounded_and_reshuffles_shards_each_epoch(tmp_path):
    source = write_source(tmp_path / "a", 20)
    stream = MixedShardStream([source], batch_size=10, shuffle_buffer=1)
    batches = [ids(b) for b in take(stream, 6)]
    epochs = [sum(batches[i : i + 2], []) for i in range(0, 6, 2)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_weights_caps_and_per_source_batches(tmp_path):
    a = write_source(tmp_path / "a", 50, prefix="a")
    b = write_source(tmp_path / "b", 50, prefix="b")
    a.weight, b.weight, b.max_samples = 1.0, 3.0, 7
    stream = MixedShardStream([a, b], batch_size=20, shuffle_buffer=8)
    drawn = [i for batch in take(stream, 30) for i in ids(batch)]
    share_b = sum(i.startswith("b") for i in drawn) / len(drawn)
    assert 0.68 < share_b < 0.82
    assert {i for i in drawn if i.startswith("b")} == {f"b{i:04d}" for i in range(7)}

    a.weight, b.weight, b.max_samples = None, None, None  # by size: 50 and 50 samples
    c = write_source(tmp_path / "c", 150, prefix="c")  # 150 samples: three quarters of the draws
    drawn = [i for batch in take(MixedShardStream([a, c], batch_size=20, shuffle_buffer=8), 30)
             for i in ids(batch)]
    assert 0.68 < sum(i.startswith("c") for i in drawn) / len(drawn) < 0.82

    same = MixedShardStream([a, b], batch_size=4, batch_composition="per_source")
    for batch in take(same, 10):
        assert len({i[0] for i in ids(batch)}) == 1


def test_resume_continues_where_the_stream_stopped(tmp_path):
    sources = [write_source(tmp_path / "a", 23, prefix="a"), write_source(tmp_path / "b", 17, prefix="b")]
    stream = MixedShardStream(sources, batch_size=4, shuffle_buffer=1, seed=3)
    run = take(stream, 12)
    resumed = MixedShardStream(sources, batch_size=4, shuffle_buffer=1, seed=3, resume={0: run[4].position})
    assert [ids(b) for b in take(resumed, 7)] == [ids(b) for b in run[5:]]


def test_corrupt_samples_are_skipped_without_misaligning(tmp_path):
    path = tmp_path / "bad"
    path.mkdir()
    write_source(path, 6, per_shard=6)
    shard = path / "shard-000000.tar"
    good = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            good[member.name] = tar.extractfile(member).read()
    good["s0002.qry.png"] = good["s0002.qry.png"][:30]  # a truncated image
    with tarfile.open(shard, "w") as tar:
        for name, data in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = MixedShardStream([Source(str(path))], batch_size=5, shuffle_buffer=1)
    batch = take(stream, 1)[0]
    assert "s0002" not in ids(batch) and batch.skipped == 1
    assert "shard-000000.tar" in batch.skip_errors[0] and "s0002" in batch.skip_errors[0]
    for sample in batch.samples:  # each sample's sides are its own
        assert sample.query.text.endswith(str(int(sample.id[1:])))
    with pytest.raises(Exception, match="s0002"):
        take(MixedShardStream([Source(str(path))], batch_size=5, shuffle_buffer=1, strict=True), 1)


def six_samples(tmp_path):
    """One stream batch of 6 samples holding 0, 1 and 2 hard negatives."""
    source = write_source(tmp_path / "a", 6, per_shard=6)
    return take(MixedShardStream([source], batch_size=6, shuffle_buffer=1), 1)[0]


def recording_collate():
    """A collate function that keeps the items of each call and returns their number."""
    seen = []

    def collate(items):
        seen.append(list(items))
        return {"n": torch.tensor([len(items)])}

    return collate, seen


def test_collator_masks_missing_negatives_and_chunks(tmp_path):
    batch = six_samples(tmp_path)
    collate, seen = recording_collate()
    out = ContrastiveCollator(collate, num_negatives=2, chunk_size=4)(batch)
    counts = [len(s.negatives) for s in batch.samples]
    expected = torch.tensor([[k > j for j in range(2)] for k in counts])
    assert torch.equal(out.negative_mask, expected)
    assert [c.inputs["n"].item() for c in out.query] == [4, 2]
    flat_negatives = [item for chunk in seen[4:] for item in chunk]
    assert [i.text for i in flat_negatives] == [n.text for s in batch.samples for n in s.negatives[:2]]


def test_positive_content_keys_are_equal_exactly_for_equal_inputs(tmp_path):
    """The collator's positive keys (false-negative masking): the same published string and image bytes
    give the same key, written verbatim or made by the published rule; any difference gives another."""
    from helpers import image_bytes

    from mme5.data.schema import Side

    dog, red, blue = Side(text="dog"), image_bytes((200, 0, 0)), image_bytes((0, 0, 200))
    assert dog.content_key() == Side(text="dog", prompt="dog").content_key() == Side(text="dog").content_key()
    assert dog.content_key() != Side(text="cat").content_key()
    instruction = "Represent the given image."
    pictured = Side(instruction=instruction, image=red)
    verbatim = Side(image=red, prompt=f"<|image_1|>\n{instruction}\n")
    assert pictured.content_key() == verbatim.content_key()
    assert pictured.content_key() != Side(instruction=instruction, image=blue).content_key()
    assert pictured.content_key() != Side(instruction=instruction, text="x", image=red).content_key()
    batch = six_samples(tmp_path)
    collate, _ = recording_collate()
    out = ContrastiveCollator(collate, num_negatives=2, chunk_size=4)(batch)
    assert out.positive_keys.tolist() == [s.positive.content_key() for s in batch.samples]
    assert out.positive_keys.dtype == torch.long and (out.positive_keys >= 0).all()


def test_reference_negative_padding_repeats_the_last_negative(tmp_path):
    batch = six_samples(tmp_path)
    collate, seen = recording_collate()
    out = ContrastiveCollator(collate, num_negatives=3, negative_padding="repeat")(batch)
    counts = [len(s.negatives) for s in batch.samples]
    assert out.negative_mask.tolist() == [[count > 0] * 3 for count in counts]  # none stays without
    padded = [n.text for s in batch.samples if s.negatives
              for n in s.negatives + [s.negatives[-1]] * (3 - len(s.negatives))]
    assert [item.text for item in seen[2]] == padded
    with pytest.raises(ValueError, match="negative_padding"):
        ContrastiveCollator(collate, negative_padding="zeros")


def test_a_folder_of_shard_directories_is_one_source(tmp_path):
    """E.g. the part-<i>-of-<N> folders of a synthesis job array, without a merge step."""
    root = tmp_path / "synthetic"
    write_source(root / "part-00001-of-00002", 6, prefix="b")
    write_source(root / "part-00000-of-00002", 7, prefix="a")
    source = Source(str(root), max_samples=10)
    assert [Path(url).parent.name for url, _ in source.shard_plan()] == ["part-00000-of-00002"] * 2 + [
        "part-00001-of-00002"]  # 5 + 2 + 3 samples: name order, capped at 10
    assert sum(take for _, take in source.shard_plan()) == 10
    batch = take(MixedShardStream([Source(str(root))], batch_size=13, shuffle_buffer=1), 1)[0]
    assert sorted(ids(batch)) == [f"a{i:04d}" for i in range(7)] + [f"b{i:04d}" for i in range(6)]
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        Source(str(tmp_path / "empty")).shard_plan()


@pytest.mark.parametrize("lockstep", [False, True])
def test_a_sample_the_processor_refuses_is_dropped_whole_and_named(tmp_path, lockstep):
    """An injected processor fault on one sample's negative: that sample goes from every role, the others
    keep their rows, and the skip names the shard and the sample. Items cut to max_length are counted once,
    although the search for the fault collates some of them again."""
    batch = six_samples(tmp_path)
    victim = next(s for s in batch.samples if len(s.negatives) == 2)
    poison = victim.negatives[1].text
    cut = []  # every item collated counts as cut here

    def collate(items):
        cut.extend(item for item in items if item not in (PADDING_ROW, PADDING_IMAGE_ROW))
        if any(item is not None and item.text == poison for item in items):
            raise ValueError("aspect ratio out of range")
        return {"texts": [item.text for item in items]}

    collator = ContrastiveCollator(collate, num_negatives=2, lockstep=lockstep, truncated=lambda: len(cut))
    out = collator(batch)
    kept = [s for s in batch.samples if s.id != victim.id]
    assert out.ids == [s.id for s in kept] and out.skipped == batch.skipped + 1
    assert out.truncated == sum(2 + min(len(s.negatives), 2) for s in kept)

    def real(chunk):  # the rows that are items (lockstep chunks also hold padding rows)
        keep = chunk.keep.tolist() if chunk.keep is not None else [True] * len(chunk.inputs["texts"])
        return [text for text, k in zip(chunk.inputs["texts"], keep, strict=True) if k]

    assert real(out.query[0]) == [s.query.text for s in kept]
    assert real(out.positive[0]) == [s.positive.text for s in kept]
    assert real(out.negatives[0]) == [n.text for s in kept for n in s.negatives[:2]]
    assert out.negative_mask.tolist() == [[k > j for j in range(2)] for k in (len(s.negatives) for s in kept)]
    if lockstep:  # the victim's slots are padding rows: every rank still has B and B × K rows
        assert out.query[0].keep.tolist() == [s.id != victim.id for s in batch.samples]
        slots = [s.id != victim.id and k < len(s.negatives) for s in batch.samples for k in range(2)]
        assert out.negatives[0].keep.tolist()[: 6 * 2] == slots
    with pytest.raises(Exception, match=rf"shard-000000.tar: sample '{victim.id}': neg1"):
        ContrastiveCollator(collate, num_negatives=2, lockstep=lockstep, strict=True)(batch)


def test_a_truncated_shard_counts_every_lost_sample_and_names_it(tmp_path, caplog):
    """A shard cut inside its 4th of 12 samples loses 9 of them: all counted (not 1 tar error) and logged
    with the shard's name; the stream goes on with the next shard."""
    source = write_source(tmp_path / "a", 24, per_shard=12)
    shard = tmp_path / "a" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        cut = next(m.offset_data for m in tar.getmembers() if m.name.startswith("s0003.")) + 5
    shard.write_bytes(shard.read_bytes()[:cut])
    stats = ReadStats()
    reader = SourceReader(source, Slot(0, 1), seed=0, stats=stats, strict=False)
    read = list(itertools.islice(iter(reader), 16))  # one more than the epoch: past its last shard
    assert len({sample.id for sample, _ in read[:15]}) == 15  # 3 + 12 readable, the rest skipped
    assert stats.skipped["lost"] + stats.skipped["record"] == 9
    assert any("shard-000000.tar" in message and "lost" in message for message in stats.errors)
    assert "shard-000000.tar" in caplog.text and "skipped" in caplog.text


def read_tagged(reader, count):
    """`count` samples of a reader as (epoch, id): the epoch the reader was in when it read the sample."""
    out = []
    for sample, _ in itertools.islice(reader, count):
        out.append((reader.position["epoch"], sample.id))
    return out


@pytest.mark.parametrize("old, new, per_shard",
                         [(2, 1, 5), (1, 2, 5), (2, 3, 5), (4, 3, 5), (3, 2, 12), (1, 2, 30), (2, 3, 30)])
def test_a_resume_on_another_number_of_slots_reads_each_sample_of_an_epoch_once(tmp_path, old, new,
                                                                                per_shard):
    """Old slots stop at uneven points (one already in its next epoch); the new slots finish those epochs:
    over old and new reads, every epoch holds every sample exactly once. per_shard 12: fewer shards than
    slots (strided shards); 30: one shard, split strided over the new slots."""
    source = write_source(tmp_path / "a", 23, per_shard=per_shard)
    everything = sorted(f"s{i:04d}" for i in range(23))
    tagged, saved = [], {}
    for index in range(old):
        reader = SourceReader(source, Slot(index, old), seed=5, stats=ReadStats(), strict=True)
        tagged += read_tagged(reader, [30, 3, 0, 5][index])  # slot 0 reads past its first epoch
        saved[index] = dict(reader.position) if index != 2 else None  # slot 2 never produced a batch
    high = max(epoch for epoch, _ in tagged)
    for index in range(new):
        reader = SourceReader(source, Slot(index, new), seed=5, stats=ReadStats(), strict=True)
        reader.position = reader.resplit(saved, old)
        for sample, _ in reader:
            if reader.position["epoch"] > high + 1:
                break
            tagged.append((reader.position["epoch"], sample.id))
    for epoch in range(high + 2):
        assert sorted(i for e, i in tagged if e == epoch) == everything, epoch


def test_the_stream_resumes_on_fewer_slots_without_repeating_a_sample(tmp_path):
    """Two ranks stop; one rank resumes: the rest of the epoch of each source comes first, each sample once;
    a stream resumed on one slot from the same positions draws the same batches again (deterministic)."""
    sources = [write_source(tmp_path / "a", 23, prefix="a"), write_source(tmp_path / "b", 17, prefix="b")]
    consumed, positions = [], {}
    for rank, steps in ((0, 3), (1, 2)):
        stream = MixedShardStream(sources, batch_size=4, rank=rank, world_size=2, shuffle_buffer=1, seed=3)
        batches = take(stream, steps)
        consumed += [i for batch in batches for i in ids(batch)]
        positions[rank] = batches[-1].position
    resumed = take(MixedShardStream(sources, batch_size=4, shuffle_buffer=1, seed=3, resume=positions), 12)
    drawn = [i for batch in resumed for i in ids(batch)]
    for prefix, size in (("a", 23), ("b", 17)):
        old = [i for i in consumed if i.startswith(prefix)]
        rest = [i for i in drawn if i.startswith(prefix)][: size - len(old)]
        assert sorted(old + rest) == sorted(f"{prefix}{i:04d}" for i in range(size)), prefix
    again = take(MixedShardStream(sources, batch_size=4, shuffle_buffer=1, seed=3, resume=positions), 12)
    assert [ids(b) for b in again] == [ids(b) for b in resumed]
    # and the new positions resume on the new slot count like any other
    continued = take(MixedShardStream(sources, batch_size=4, shuffle_buffer=1, seed=3,
                                      resume={0: resumed[5].position}), 6)
    assert [ids(b) for b in continued] == [ids(b) for b in resumed[6:]]


def test_parts_that_share_sample_ids_are_refused_naming_both(tmp_path):
    """Case 8: a job array run twice into one --out with another --num-shards leaves parts holding the same
    ids; read as one source, those samples would come twice an epoch."""
    root = tmp_path / "synthetic"
    write_source(root / "part-00000-of-00002", 6, prefix="s")
    write_source(root / "part-00001-of-00002", 6, prefix="t")
    Source(str(root)).check_parts()  # disjoint parts: fine
    write_source(root / "part-00000-of-00003", 4, prefix="t")  # t0000..t0003 again
    overlap = "'t0000' is in part-00000-of-00003/shard-000000.tar and in part-00001-of-00002/shard-000000.tar"
    with pytest.raises(SourceRefused, match=overlap + ": its parts overlap"):
        Source(str(root)).check_parts()


def test_a_shard_holding_more_records_than_its_manifest_counts_is_refused(tmp_path):
    """Case 15: a count edited down by hand (num_samples along with it) would silently leave records
    unread; the reader finds the extra record and names the manifest and the shard."""
    source = write_source(tmp_path / "a", 10, per_shard=5)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["shards"][0]["count"], manifest["num_samples"] = 4, 9
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    reader = SourceReader(source, Slot(0, 1), seed=0, stats=ReadStats(), strict=False)
    with pytest.raises(SourceRefused, match=r"a/manifest.json: lists 4 records for shard-000000.tar, the "
                                            "shard holds more"):
        take(reader, 10)
    capped = SourceReader(Source(source.path, max_samples=3), Slot(0, 1), seed=0, stats=ReadStats(),
                          strict=False)
    assert len({sample.id for sample, _ in take(capped, 3)}) == 3  # a cap reads fewer on purpose: fine
    (tmp_path / "parts").mkdir()
    (tmp_path / "a").rename(tmp_path / "parts" / "a")
    write_source(tmp_path / "parts" / "b", 5, prefix="b")
    with pytest.raises(SourceRefused, match="lists 4 records for shard-000000.tar, the shard holds 5"):
        Source(str(tmp_path / "parts")).check_parts()  # parts are checked before training starts


@pytest.mark.parametrize("settings, slots, refused", [
    (dict(batch_size=8), 1, None),
    (dict(batch_size=12), 1, "the sources hold 10 samples, but each of the 1 stream slots"),  # > the data
    (dict(batch_size=6), 2, "each of the 2 stream slots"),  # 2 slots (ranks × workers) of 5 samples each
    (dict(batch_size=4, batch_composition="per_source"), 1, "source b holds 3 samples"),  # b alone
    (dict(batch_size=8, weights=(1.0, 1.0)), 1, "source b holds 3 samples"),  # 4 of each batch from b
])
def test_a_batch_larger_than_its_data_is_refused(tmp_path, settings, slots, refused):
    """Case 11: a batch that must draw more samples of a source than one slot holds of it an epoch would
    repeat samples inside the batch (the stream cycles epochs): refused, naming the numbers."""
    a, b = write_source(tmp_path / "a", 7, prefix="a"), write_source(tmp_path / "b", 3, prefix="b")
    a.weight, b.weight = settings.pop("weights", (None, None))
    stream = MixedShardStream([a, b], shuffle_buffer=1, **settings)
    fits = partial(check_batches_fit, [a, b], stream.batch_size, slots, stream.batch_composition)
    if refused is None:
        fits()
        first = ids(take(stream, 1)[0])
        assert len(set(first)) == len(first)
        return
    with pytest.raises(SourceRefused, match=re.escape(refused)):
        fits()
    if slots == 1 and stream.batch_composition == "mixed" and a.weight is None:  # what it would do: repeats
        assert len(set(ids(take(stream, 1)[0]))) < stream.batch_size
