"""Video sides on the data path: schema, shards, stream, collate and the pairs converter (issue 23)."""

import itertools
import json
import tarfile

import pytest
from helpers import image_bytes, make_sample, video_frames
from test_stream import recording_collate

from mme5.backbones.base import PADDING_IMAGE_ROW, PADDING_ROW
from mme5.data.collate import ContrastiveCollator, side_item
from mme5.data.schema import Modality, Sample, SchemaError, Side, Task
from mme5.data.shards import ShardWriter, read_samples, record_to_sample, sample_to_record, shard_urls
from mme5.data.stream import MixedShardStream, Source

# ----------------------------------------------------------------------------- schema


def test_a_video_side_has_its_kind_and_modality():
    frames = video_frames(0)
    assert Side(instruction="Describe the video.", video=frames).kind == "V"
    assert Side(text="what happens?", video=frames).kind == "VT"
    caption = Side(text="a red square moves left")
    assert Modality.of(Side(video=frames, instruction="Describe"), caption) == Modality.V2T
    assert Modality.of(caption, Side(video=frames, instruction="Understand")) == Modality.T2V
    assert (Modality.VT2T.query, Modality.T2VT.target) == ("VT", "VT")


@pytest.mark.parametrize("side, reason", [
    (dict(image=image_bytes(), video=video_frames(0)), "image or a video, not both"),
    (dict(text="x", video=[]), "non-empty list of frames"),
    (dict(text="x", video=image_bytes()), "non-empty list of frames"),
    (dict(text="x", video=[image_bytes(), "frame.jpg"]), "frame 1 must be its encoded file bytes"),
])
def test_a_bad_video_side_is_refused_naming_why(side, reason):
    with pytest.raises(SchemaError, match=reason):
        Side(**side)


def test_a_sample_checks_video_sides_against_its_modality():
    with pytest.raises(SchemaError, match="expects a V query, found I"):
        Sample("s0", Task.RETRIEVAL, Modality.V2T, "en", "unit", Side(instruction="x", image=image_bytes()),
               Side(text="caption"))


def test_content_keys_cover_every_frame_in_order():
    """Equal frames in equal order give equal keys; another frame, order, split of the bytes, or the same
    bytes as an image give another (a false negative is masked only for the same input)."""
    a, b = image_bytes((200, 0, 0)), image_bytes((0, 0, 200))

    def key(**media):
        return Side(instruction="Describe the video.", **media).content_key()

    assert key(video=[a, b]) == key(video=[a, b])
    assert len({key(video=[a, b]), key(video=[b, a]), key(video=[a]), key(video=[a, b, b]),
                key(video=[a + b]), key(image=a)}) == 6
    rendered = Side(instruction="Describe the video.", video=[a, b])
    verbatim = Side(video=[a, b], prompt="<|image_1|>\nDescribe the video.\n")
    assert rendered.content_key() == verbatim.content_key()  # the placeholder stands for the video too


# ----------------------------------------------------------------------------- shards


def video_samples(count, modality=Modality.VT2T, negatives=2):
    return [make_sample(i, modality, negatives=i % (negatives + 1)) for i in range(count)]


def write(path, samples, per_shard=4):
    with ShardWriter(path, max_count=per_shard) as writer:
        for i, sample in enumerate(samples):
            writer.write(sample, cursor=i + 1)
    return path


def test_frames_are_stored_one_member_each_bit_exact_and_in_order(tmp_path):
    sample = make_sample(3, Modality.T2V, negatives=1)
    write(tmp_path, [sample])
    with tarfile.open(shard_urls(tmp_path)[0]) as tar:
        members = {name: tar.extractfile(name).read() for name in tar.getnames()}
    meta = json.loads(members["s00003.json"])
    listed = meta["sides"]["pos"]["video"]
    assert listed == [f"pos.f{i:05d}.{'jpg' if i % 2 else 'png'}" for i in range(len(sample.positive.video))]
    assert [members[f"s00003.{name}"] for name in listed] == sample.positive.video
    assert meta["sides"]["qry"].get("video") is None and "qry.f00000.png" not in str(members)
    back = list(read_samples(shard_urls(tmp_path), strict=True))
    assert back == [sample] and back[0].negatives[0].video == sample.negatives[0].video


def test_a_missing_frame_member_is_refused_naming_the_field():
    record = sample_to_record(make_sample(0, Modality.V2T))
    del record["qry.f00002.png"]
    with pytest.raises(SchemaError, match=r"sides\.qry\.video' names member 'qry\.f00002\.png'"):
        record_to_sample(record)
    record = sample_to_record(make_sample(0, Modality.V2T))
    meta = json.loads(record["json"])
    meta["sides"]["qry"]["video"] = "qry.f00000.png"
    record["json"] = json.dumps(meta).encode()
    with pytest.raises(SchemaError, match=r"sides\.qry\.video' must list frame member names"):
        record_to_sample(record)


# ----------------------------------------------------------------------------- stream and collate


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def video_source(tmp_path, count=18):
    """Video retrieval and video QA samples beside image ones, in one source of several shards."""
    modalities = [Modality.T2V, Modality.VT2T, Modality.IT2T]
    samples = [make_sample(i, modalities[i % 3], negatives=(i + 1) % 3) for i in range(count)]
    write(tmp_path / "v", samples)
    return Source(str(tmp_path / "v")), {s.id: s for s in samples}


def test_the_stream_carries_video_sides_and_resumes_exactly(tmp_path):
    source, written = video_source(tmp_path)
    shuffled = take(MixedShardStream([source], batch_size=4, shuffle_buffer=8, seed=1), 8)
    for batch in shuffled:  # decoded after the shuffle buffer: frames bit-exact, sides their own
        assert all(sample == written[sample.id] for sample in batch.samples)
    run = take(MixedShardStream([source], batch_size=4, shuffle_buffer=1, seed=1), 8)  # exact resume: 1
    resumed = MixedShardStream([source], batch_size=4, shuffle_buffer=1, seed=1, resume={0: run[2].position})
    assert [[s.id for s in b.samples] for b in take(resumed, 5)] == [[s.id for s in b.samples]
                                                                      for b in run[3:]]


@pytest.mark.parametrize("lockstep", [False, True])
def test_collate_gives_items_every_frame_as_bytes_with_masks_and_keys(tmp_path, lockstep):
    """Queries, positives and negatives reach the adapter in sample order with all their frames as the
    stored bytes; missing negatives are masked (lockstep: padding rows that `keep` leaves out)."""
    source, _ = video_source(tmp_path)
    batch = take(MixedShardStream([source], batch_size=6, shuffle_buffer=1), 1)[0]
    collate, seen = recording_collate()
    out = ContrastiveCollator(collate, num_negatives=2, chunk_size=4, lockstep=lockstep)(batch)

    def real(calls):  # the items of these collate calls, less lockstep's padding rows
        return [item for items in calls for item in items if item not in (PADDING_ROW, PADDING_IMAGE_ROW)]

    def media(side):
        return tuple(side.video) if side.video else None, side.image is not None

    expected_negatives = [media(n) for s in batch.samples for n in s.negatives[:2]]
    assert [(i.video, i.image is not None) for i in real(seen[:2])] == [media(s.query) for s in batch.samples]
    assert [i.video for i in real(seen[2:4])] == [media(s.positive)[0] for s in batch.samples]
    assert [i.video for i in real(seen[4:])] == [video for video, _ in expected_negatives]
    assert any(video for video, _ in expected_negatives)
    assert out.negative_mask.tolist() == [[len(s.negatives) > k for k in range(2)] for s in batch.samples]
    assert out.positive_keys.tolist() == [s.positive.content_key() for s in batch.samples]
    if lockstep:
        assert sum(int(c.keep.sum()) for c in out.negatives) == int(out.negative_mask.sum())


def test_side_item_passes_every_frame_undecoded():
    side = Side(text="what happens?", video=video_frames(1, 5))
    item = side_item(side)
    assert item.video == tuple(side.video) and item.image is None and item.text == "what happens?"


# ----------------------------------------------------------------------------- the pairs converter


def frames_folder(folder, names):
    """A frames folder holding `names` (each a distinct small image) plus a file that is no frame."""
    folder.mkdir(parents=True)
    for index, name in enumerate(names):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (folder / name).write_bytes(image_bytes((index * 30, 0, 255 - index * 30), fmt=fmt))
    (folder / "notes.txt").write_text("not a frame")
    return folder


def test_pairs_with_frames_folders_convert_to_video_sides(tmp_path):
    from mme5.data.convert import convert
    from mme5.data.pairs import PairFormat

    root = tmp_path / "media"
    clip = frames_folder(root / "clips" / "a", ["frame_10.jpg", "frame_2.png", "frame_1.JPG"])
    frames_folder(root / "clips" / "b", ["0001.jpg", "0002.jpg"])
    (root / "clips" / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    frames_folder(root / "clips" / "empty", [])
    (root / "page.png").write_bytes(image_bytes())
    rows = [{"query": "a square moves left", "positive_video": "clips/a", "negative_videos": ["clips/b"]},
            {"query": "a dot", "positive_video": "clips/c.mp4"},
            {"query": "a dot", "positive_video": "clips/empty"},
            {"query": "a dot", "positive_video": "clips/missing"},
            {"query": "a dot", "positive_video": "clips/b", "positive_image": "page.png"}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = convert([str(tmp_path / "in")], root, tmp_path / "out", task="retrieval", layout=PairFormat(),
                       seed=None, progress=False)
    [sample] = list(read_samples(shard_urls(tmp_path / "out"), strict=True))
    assert sample.modality == Modality.T2V
    names = ["frame_1.JPG", "frame_2.png", "frame_10.jpg"]  # natural order, the text file left out
    assert sample.positive.video == [(clip / name).read_bytes() for name in names]
    assert sample.positive.prompt == "<|image_1|>\nUnderstand the content of the provided video.\n"
    negative = root / "clips" / "b"
    assert sample.negatives[0].video == [(negative / n).read_bytes() for n in ("0001.jpg", "0002.jpg")]
    report = manifest["extra"]["report"]
    assert report["skipped"] == {"video_file": 1, "missing_video": 2, "image_and_video": 1}
    errors = "\n".join(report["errors"])
    assert "pairs.jsonl: row 1: field 'positive_video': " in errors
    assert "no video decoder is installed" in errors
    assert "row 2: field 'positive_video': frames folder" in errors and "holds no frames" in errors
    assert "row 3: field 'positive_video': frames folder" in errors and "is missing" in errors
    assert "row 4: field 'positive_video': a side holds an image or a video, not both" in errors


def test_a_video_query_with_a_question_is_vt2t_and_a_frames_column_alone_suffices(tmp_path):
    from mme5.data.convert import convert
    from mme5.data.pairs import PairFormat

    root = tmp_path / "media"
    frames_folder(root / "v1", ["1.jpg", "2.jpg", "3.jpg"])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "qa.csv").write_text("question,clip,answer\nwhat moves?,v1,the square\n")
    pairs = PairFormat.parse(["query=question", "query_video=clip", "positive=answer"],
                             query_instruction="Answer a question based on the content of a video:")
    convert([str(tmp_path / "in")], root, tmp_path / "out", task="vqa", layout=pairs, progress=False)
    [sample] = list(read_samples(shard_urls(tmp_path / "out"), strict=True))
    assert sample.modality == Modality.VT2T and len(sample.query.video) == 3
    assert sample.query.prompt == ("<|image_1|>\nAnswer a question based on the content of a video: "
                                   "what moves?\n")
    (tmp_path / "in2").mkdir()  # a positive given only as frames: no text column needed
    (tmp_path / "in2" / "r.csv").write_text("caption,clip\na square,v1\n")
    convert([str(tmp_path / "in2")], root, tmp_path / "out2", task="retrieval", progress=False,
            layout=PairFormat.parse(["query=caption", "positive_video=clip"]))
    assert [s.modality for s in read_samples(shard_urls(tmp_path / "out2"))] == [Modality.T2V]


def test_video_samples_for_a_family_that_reads_no_video_are_refused_on_several_ranks(tmp_path, tiny_mllama):
    """Each would be dropped from its batch: said on one rank, refused on several (unequal batch sizes)."""
    from mme5.data.datamodule import ShardDataModule
    from mme5.data.stream import SourceRefused

    with ShardWriter(tmp_path / "mixed", max_count=8) as writer:
        for i in range(8):
            writer.write(make_sample(i, [Modality.I2T, Modality.V2T][i % 2]))
    data = ShardDataModule([{"path": str(tmp_path / "mixed")}], str(tiny_mllama), batch_size=2,
                           num_negatives=0, num_workers=0)
    with pytest.warns(UserWarning, match=r"holds video samples \{'V2T': 4\}.*they are skipped"):
        data.check_sources(1)
    with pytest.raises(SourceRefused, match="on 2 ranks their batches would differ in size"):
        data.check_sources(2)
