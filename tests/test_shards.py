import io
import json
import tarfile

import pytest
from helpers import image_bytes, make_sample

from mme5.data.schema import Modality, Sample, SchemaError, Side, Task
from mme5.data.shards import (
    CorruptSample,
    ReadStats,
    ShardWriter,
    read_manifest,
    read_samples,
    record_to_sample,
    sample_to_record,
    shard_urls,
)


def write(tmp_path, samples, **kwargs):
    with ShardWriter(tmp_path, **kwargs) as writer:
        for i, sample in enumerate(samples):
            writer.write(sample, cursor=i + 1)
    return tmp_path


def test_round_trip_is_identical_for_every_modality(tmp_path):
    samples = [make_sample(i, modality=m, negatives=i % 4) for i, m in enumerate(Modality)]
    write(tmp_path, samples, max_count=3)
    back = list(read_samples(shard_urls(tmp_path), strict=True))
    assert back == samples
    assert len(shard_urls(tmp_path)) == 4  # 11 samples (video ones too), at most 3 a shard


def test_images_are_stored_as_given_bytes(tmp_path):
    jpeg = image_bytes(fmt="JPEG")
    sample = make_sample(0, Modality.I2T)
    sample.query.image = jpeg
    write(tmp_path, [sample])
    with tarfile.open(shard_urls(tmp_path)[0]) as tar:
        names = tar.getnames()
        assert tar.extractfile("s00000.qry.jpg").read() == jpeg
    assert names[0] == "s00000.json"


def test_manifest_counts_and_bounded_shards(tmp_path):
    samples = [make_sample(i, language="en" if i % 3 else "zh", task=Task.VQA if i % 2 else Task.RETRIEVAL)
               for i in range(10)]
    write(tmp_path, samples, max_count=4)
    manifest = read_manifest(tmp_path)
    assert manifest["complete"] and manifest["num_samples"] == 10
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["counts"]["language"] == {"en": 6, "zh": 4}
    assert manifest["counts"]["task"] == {"retrieval": 5, "vqa": 5}
    assert manifest["counts"]["modality"] == {"IT2T": 10}


def test_max_bytes_bounds_shard_size(tmp_path):
    samples = [make_sample(i) for i in range(6)]
    one = sum(len(v) for v in sample_to_record(samples[0]).values())
    write(tmp_path, samples, max_bytes=int(one * 2.5))
    assert [s["count"] for s in read_manifest(tmp_path)["shards"]] == [2, 2, 2]


def test_same_input_gives_byte_identical_shards(tmp_path):
    samples = [make_sample(i) for i in range(5)]
    a = (write(tmp_path / "a", samples) / "shard-000000.tar").read_bytes()
    b = (write(tmp_path / "b", samples) / "shard-000000.tar").read_bytes()
    assert a == b


def test_crash_leaves_no_partial_shard_and_resume_continues(tmp_path):
    samples = [make_sample(i) for i in range(7)]
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_count=3) as writer:
            for i, sample in enumerate(samples):
                if i == 5:
                    raise RuntimeError("killed")
                writer.write(sample, cursor=i + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar"]
    manifest = read_manifest(tmp_path)
    assert not manifest["complete"]

    with ShardWriter(tmp_path, max_count=3, resume=True) as writer:
        start = writer.resume_cursor
        assert start == 3
        for i in range(start, len(samples)):
            writer.write(samples[i], cursor=i + 1)
    assert list(read_samples(shard_urls(tmp_path))) == samples
    assert read_manifest(tmp_path)["complete"]


def test_leftover_tmp_shard_is_discarded_on_resume(tmp_path):
    write(tmp_path, [make_sample(0)])
    (tmp_path / ".shard-000001.tar.k2j4f9.tmp").write_bytes(b"half a tar")
    (tmp_path / "shard-000001.tar.tmp").write_bytes(b"half a tar, as earlier versions named it")
    ShardWriter(tmp_path, resume=True).close()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def corrupt_shard(tmp_path, mutate):
    """Write three samples, then rewrite the middle one's members through `mutate(members)`."""
    samples = [make_sample(i, Modality.I2T) for i in range(3)]
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            members = sample_to_record(sample)
            if sample.id == "s00001":
                mutate(members)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{sample.id}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path), samples


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda m: m.update({"qry.png": m["qry.png"][:40]}), "not a readable image"),
        (lambda m: m.update({"json": b"{not json"}), "not valid JSON"),
        (lambda m: m.pop("qry.png"), "which is missing"),
        (lambda m: m.update({"json": m["json"].replace(b'"I2T"', b'"X2Y"')}), "X2Y"),
    ],
)
def test_bad_records_are_skipped_and_named_or_raise_in_strict_mode(tmp_path, mutate, reason):
    url, samples = corrupt_shard(tmp_path, mutate)
    stats = ReadStats()
    back = list(read_samples(url, stats=stats))
    assert [s.id for s in back] == ["s00000", "s00002"]
    assert back[1] == samples[2]  # later samples keep their own sides: nothing shifts
    assert stats.num_skipped == 1
    assert "bad.tar" in stats.errors[0] and "s00001" in stats.errors[0] and reason in stats.errors[0]
    with pytest.raises(CorruptSample, match="s00001"):
        list(read_samples(url, strict=True))


def test_truncated_shard_is_counted(tmp_path):
    write(tmp_path, [make_sample(i) for i in range(4)])
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path) as tar:  # cut inside the third sample's query image
        cut = next(m.offset_data for m in tar.getmembers() if m.name.startswith("s00002.qry.")) + 10
    path.write_bytes(path.read_bytes()[:cut])
    stats = ReadStats()
    back = list(read_samples(str(path), stats=stats))
    assert len(back) == 2 and stats.skipped["record"] == 1  # the third sample lost its image member
    assert stats.skipped["shard"] >= 1  # and the shard ends early
    assert any("shard-000000.tar" in error and "s00002" in error for error in stats.errors)
    with pytest.raises(CorruptSample):
        list(read_samples(str(path), strict=True))


def test_schema_rejects_sides_that_do_not_match_the_modality():
    with pytest.raises(SchemaError, match="expects a I query"):
        Sample(id="x", task=Task.RETRIEVAL, modality=Modality.I2T, language="en", source="t",
               query=Side(text="only text"), positive=Side(text="a"))
    with pytest.raises(SchemaError, match="negative 0"):
        Sample(id="x", task=Task.RETRIEVAL, modality=Modality.T2I, language="en", source="t",
               query=Side(text="q"), positive=Side(image=image_bytes()), negatives=[Side(text="n")])
    with pytest.raises(SchemaError, match="needs text, an image"):
        Side(instruction="just an instruction", text="")


def test_record_errors_name_the_field():
    record = sample_to_record(make_sample(0))
    meta = json.loads(record["json"])
    del meta["sides"]["pos"]
    record["json"] = json.dumps(meta).encode()
    with pytest.raises(SchemaError, match=r"sides\.pos"):
        record_to_sample(record)


def edit_manifest(folder, change):
    """Apply `change` to a folder's manifest as a hand edit would."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_shard_listed_twice_in_a_manifest_is_read_once(tmp_path, caplog):
    """Case 15: a repeated entry (a hand-merged manifest) is read once, with a warning naming it."""
    write(tmp_path, [make_sample(i) for i in range(6)], max_count=3)
    edit_manifest(tmp_path, lambda m: m["shards"].insert(1, dict(m["shards"][0])))
    assert [info["file"] for info in read_manifest(tmp_path)["shards"]] == ["shard-000000.tar",
                                                                          "shard-000001.tar"]
    assert [s.id for s in read_samples(shard_urls(tmp_path))] == [f"s{i:05d}" for i in range(6)]
    assert "shard-000000.tar is listed more than once" in caplog.text


def test_a_count_edited_by_hand_is_refused_naming_the_manifest(tmp_path):
    """Case 15: `num_samples` must equal the shards' counts (a count a shard really holds is checked when
    it is read: tests/test_stream.py)."""
    write(tmp_path, [make_sample(i) for i in range(6)], max_count=3)
    edit_manifest(tmp_path, lambda m: m.update(num_samples=4))
    with pytest.raises(SchemaError, match=r"manifest.json: num_samples is 4 but its shards' counts add up "
                                          "to 6"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("content, reason", [
    (b'{"format": "mme5-shards/2", "shards": [', "not a readable manifest"),
    ('{"format": "mme5-shards/2", "note": "caf\u00e9"}'.encode("latin-1"), "not a readable manifest"),
    (b"[1, 2]", "a manifest is a JSON object"),
    (b'{"format": "mme5-shards/2", "num_samples": 1, "shards": [{"file": "a.tar"}]}', r"shards\[0\] needs"),
])
def test_an_unreadable_manifest_names_its_file(tmp_path, content, reason):
    """Case 15: bad JSON, bytes that are not UTF-8, or a malformed entry: an error naming the file."""
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(SchemaError, match=reason) as error:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(error.value)
