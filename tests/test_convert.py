import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from doc_blocks import doc_commands, run_doc_commands
from helpers import image_bytes

from mme5.data import convert as conv
from mme5.data.schema import Modality, Task
from mme5.data.shards import read_manifest, read_samples, shard_urls
from mme5.files import OutputFolderError


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    for i in range(6):
        (root / "coco" / f"{i}.jpg").write_bytes(image_bytes((40 * i, 10, 10), fmt="JPEG"))
    (root / "coco" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 20)
    return root


def mmeb_rows():
    """Rows as published in mmE5-MMEB-hardneg: stringified negative lists, an image placeholder."""
    return [
        {"qry": "<|image_1|>\nRepresent the given image with the following question: What is red?",
         "qry_image_path": "coco/0.jpg", "pos_text": "the ball", "pos_image_path": "",
         "neg_text": "['the cup', 'the hat']", "neg_image_path": "['', '']"},
        {"qry": "<|image_1|>\nRepresent the given image with the following question: What is blue?",
         "qry_image_path": "coco/1.jpg", "pos_text": "the sky", "pos_image_path": "",
         "neg_text": "['the sea', '', 'the sky']", "neg_image_path": "['', '', '']"},
        {"qry": "<|image_1|>\nRepresent the given image with the following question: Which?",
         "qry_image_path": "coco/missing.jpg", "pos_text": "x", "pos_image_path": "",
         "neg_text": "[]", "neg_image_path": "[]"},
        {"qry": "<|image_1|>\nRepresent the given image with the following question: Which?",
         "qry_image_path": "coco/2.jpg", "pos_text": "", "pos_image_path": "",
         "neg_text": "[]", "neg_image_path": "[]"},
        {"qry": "<|image_1|>\nRepresent the given image with the following question: And?",
         "qry_image_path": "coco/3.jpg", "pos_text": "y", "pos_image_path": "",
         "neg_text": "__import__('os').system('echo pwned')", "neg_image_path": "[]"},
    ]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parse_list_is_safe():
    assert conv.parse_list("['a', \"b\"]", "neg_text") == ["a", "b"]
    assert conv.parse_list(["a", None], "neg_text") == ["a", ""]
    with pytest.raises(conv.BadRow, match="neg_text"):
        conv.parse_list("__import__('os').system('true')", "neg_text")


def test_mmeb_hardneg_parquet(tmp_path, image_root):
    write_parquet(tmp_path / "in" / "VQA_toy" / "train-00000-of-00001.parquet", mmeb_rows())
    manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", task="vqa", progress=False)
    samples = sorted(read_samples(shard_urls(tmp_path / "out"), strict=True), key=lambda s: s.id)
    assert [s.id for s in samples] == ["VQA_toy-000-00000000", "VQA_toy-000-00000001"]
    first, second = samples
    assert first.modality == Modality.IT2T and first.task == Task.VQA and first.source == "VQA_toy"
    assert first.query.instruction == "Represent the given image with the following question:"
    assert first.query.text == "What is red?"
    assert first.query.image == (image_root / "coco" / "0.jpg").read_bytes()
    assert [n.text for n in first.negatives] == ["the cup", "the hat"]
    assert [n.text for n in second.negatives] == ["the sea"]  # empty and positive-equal dropped

    report = manifest["extra"]["report"]
    assert report["rows"] == 5 and report["written"] == 2
    assert report["skipped"] == {"missing_image": 1, "empty_positive": 1, "bad_list": 1}
    assert report["quirks"]["stringified_negatives"] == 2  # counted on rows that were written
    assert report["quirks"]["negative_equals_positive_dropped"] == 1
    errors = "\n".join(report["errors"])
    assert "train-00000-of-00001.parquet: row 2: field 'qry_image_path'" in errors
    assert "row 3: field 'pos_text'" in errors and "row 4: field 'neg_text'" in errors


def test_strict_mode_stops_at_the_first_bad_row(tmp_path, image_root):
    write_parquet(tmp_path / "in" / "x.parquet", mmeb_rows())
    with pytest.raises(ValueError, match=r"x.parquet: row 2: field 'qry_image_path'"):
        conv.convert([str(tmp_path / "in" / "x.parquet")], image_root, tmp_path / "out", task="vqa",
                     strict=True, progress=False)


def synthetic_rows():
    """mmE5-synthetic rows (JSONL): a `modality` field, real lists, quirks of the published data."""
    return [
        {"qry": "Find me an everyday image that matches the given caption: two red balls",
         "qry_image_path": "", "pos_text": "", "pos_image_path": "coco/0.jpg", "modality": "T2I",
         "neg_text": [""], "neg_image_path": ["coco/1.jpg"], "language": "es"},
        {"qry": "<|image_1|>\nFind me an everyday image that matches the given caption: a blue box",
         "qry_image_path": "", "pos_text": "", "pos_image_path": "coco/2.jpg", "modality": "T2I",
         "neg_text": [], "neg_image_path": ["coco/broken.jpg"]},
        {"qry": "<|image_1|>\nRepresent the given image.", "qry_image_path": "coco/4.jpg",
         "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": "coco/5.jpg",
         "modality": "I2I", "neg_text": [], "neg_image_path": []},
        {"qry": "a caption", "qry_image_path": "coco/4.jpg", "pos_text": "t", "pos_image_path": "",
         "modality": "T2T"},
    ]


def test_synthetic_jsonl_with_quirks(tmp_path, image_root):
    path = tmp_path / "in" / "Retrieval" / "part.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps(r) for r in synthetic_rows()]
    path.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    manifest = conv.convert([str(path)], image_root, tmp_path / "out", language="en", progress=False)
    samples = list(read_samples(shard_urls(tmp_path / "out"), strict=True))
    assert [s.modality for s in samples] == [Modality.T2I, Modality.I2I]
    assert samples[0].language == "es" and samples[0].task == Task.RETRIEVAL
    assert samples[0].query.text == "two red balls" and samples[0].positive.text is None
    assert len(samples[0].negatives) == 1 and samples[1].language == "en"
    report = manifest["extra"]["report"]
    assert report["skipped"] == {"corrupt_image": 1, "bad_json": 1, "bad_modality": 1}
    assert report["quirks"]["stray_image_token"] == 1
    assert any("part.jsonl: row 2: field '(row)': invalid JSON" in e for e in report["errors"])


def test_resume_after_interruption_gives_the_same_shards(tmp_path, image_root, monkeypatch):
    rows = [dict(mmeb_rows()[0], qry_image_path=f"coco/{i % 6}.jpg") for i in range(9)]
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", rows)
    args = dict(inputs=[str(tmp_path / "in")], image_root=image_root, shard_size=2, progress=False)
    reference = conv.convert(out_dir=tmp_path / "ref", **args)

    calls = {"n": 0}
    original = conv.RowConverter.convert

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(conv.RowConverter, "convert", dying)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(out_dir=tmp_path / "out", **args)
    assert read_manifest(tmp_path / "out")["num_samples"] == 4
    monkeypatch.setattr(conv.RowConverter, "convert", original)
    resumed = conv.convert(out_dir=tmp_path / "out", **args)

    assert resumed["extra"]["report"] == reference["extra"]["report"]
    for a, b in zip(shard_urls(tmp_path / "ref"), shard_urls(tmp_path / "out"), strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert conv.convert(out_dir=tmp_path / "out", **args) == resumed  # finished: nothing redone
    with pytest.raises(OutputFolderError, match=r"shard_size: 2 \(recorded\) → 3 \(now\).*--overwrite"):
        conv.convert(out_dir=tmp_path / "out", **dict(args, shard_size=3))

    # Shards of an earlier version of the converter (no owner record): the same conversion is adopted
    # and resumed, another is refused.
    (tmp_path / "out" / ".mme5-owner.json").unlink()
    with pytest.raises(OutputFolderError, match="no mme5 command recorded"):
        conv.convert(out_dir=tmp_path / "out", **dict(args, shard_size=3))
    assert conv.convert(out_dir=tmp_path / "out", **args) == resumed


def test_cli(tmp_path, image_root, capsys):
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    assert conv.main(["--input", str(tmp_path / "in"), "--images", str(image_root), "--out",
                      str(tmp_path / "out"), "--max-negatives", "1"]) == 0
    assert "2 samples in 1 shards from 2 rows" in capsys.readouterr().out
    samples = list(read_samples(shard_urls(tmp_path / "out")))
    assert samples[0].task == Task.VQA and len(samples[0].negatives) == 1


def test_image_paths_that_leave_the_image_root_are_refused(tmp_path, image_root):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes((1, 2, 3), fmt="JPEG"))
    (image_root / "coco" / "link.jpg").symlink_to(secret)
    escapes = ["../secret.jpg", str(secret), "coco/link.jpg"]
    rows = [mmeb_rows()[0] | {"qry_image_path": path} for path in escapes] + [mmeb_rows()[1]]
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", rows)
    manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", progress=False)
    report = manifest["extra"]["report"]
    assert manifest["num_samples"] == 1 and report["skipped"] == {"path_escape": 3}
    assert all("leaves the image root" in error and "qry_image_path" in error for error in report["errors"])
    allowed = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out2", progress=False,
                           allow_outside_images=True)
    assert allowed["num_samples"] == 4


def test_bad_rows_are_named_not_fatal_to_the_file(tmp_path, image_root):
    """A numeric qry, a JSON escape of a lone surrogate (text no UTF-8 shard can hold), a row without qry:
    each one bad row, named; the rest converts. (A non-UTF-8 byte refuses the whole file: see
    test_text_files_in_another_encoding_are_refused_naming_the_byte.)"""
    good = {"qry": "<|image_1|>\nFind the caption:", "qry_image_path": "coco/0.jpg", "pos_text": "a ball"}
    no_qry = {"pos_text": "y", "qry_image_path": "coco/1.jpg"}
    text_only = {"qry": "Find the answer:", "pos_text": "text only"}
    lines = [json.dumps(good).encode(), json.dumps(good | {"qry": 7}).encode(),
             b'{"qry": "caf\\udce9", "pos_text": "x"}', json.dumps(no_qry).encode(),
             json.dumps(good).encode(), json.dumps(text_only).encode()]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    manifest = conv.convert([str(tmp_path / "in" / "rows.jsonl")], image_root, tmp_path / "out", task="vqa",
                            progress=False)
    report = manifest["extra"]["report"]
    assert manifest["num_samples"] == 2
    assert report["skipped"] == {"bad_type": 1, "bad_encoding": 1, "missing_column": 1, "bad_modality": 1}
    errors = "\n".join(report["errors"])
    assert "rows.jsonl: row 1: field 'qry': expected a string, found int" in errors
    assert "rows.jsonl: row 2: field 'qry': a lone surrogate" in errors
    assert "rows.jsonl: row 3: field 'qry': column missing" in errors
    assert "rows.jsonl: row 5" in errors and "T2T is not a multimodal combination" in errors


def test_a_parquet_without_the_required_columns_is_named(tmp_path, image_root):
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet",
                  [{"question": "What?", "qry_image_path": "coco/0.jpg", "pos_text": "x"}])
    with pytest.raises(ValueError, match=r"train.parquet: missing column\(s\) \['qry'\]"):
        conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", progress=False)


def test_nothing_converted_exits_non_zero(tmp_path, image_root, capsys):
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    wrong_root = tmp_path / "elsewhere"
    wrong_root.mkdir()
    assert conv.main(["--input", str(tmp_path / "in"), "--images", str(wrong_root), "--out",
                      str(tmp_path / "out")]) == 1
    assert "no sample written from 2 rows (is --images the right folder?" in capsys.readouterr().err


def test_decompression_bombs_are_corrupt_images_not_crashes(tmp_path, image_root, monkeypatch):
    monkeypatch.setenv("MME5_MAX_IMAGE_PIXELS", "100")  # a 16x16 image is above this cap
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", progress=False)
    report = manifest["extra"]["report"]
    assert manifest["num_samples"] == 0 and report["skipped"] == {"corrupt_image": 2}
    assert "exceed the cap of 100" in report["errors"][0] and "coco/0.jpg" in report["errors"][0]


def split_rows(split: str, count: int) -> list[dict]:
    return [{"qry": f"{split} query {i}", "qry_image_path": f"coco/{i % 6}.jpg",
             "pos_text": f"{split} answer {i}"} for i in range(count)]


def test_a_hub_layout_folder_converts_one_split_and_records_it(tmp_path, image_root):
    """A folder laid out like TIGER-Lab/MMEB-train (original, diverse_instruction, train files): the train
    split by default, as the reference; --split chooses; a missing split is an error naming the others."""
    folder = tmp_path / "in" / "ImageNet_1K"
    for split, count in (("original", 5), ("diverse_instruction", 7), ("train", 6)):
        write_parquet(folder / f"{split}-00000-of-00001.parquet", split_rows(split, count))
    manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "train", progress=False)
    texts = {s.query.text for s in read_samples(shard_urls(tmp_path / "train"))}
    assert texts == {f"train query {i}" for i in range(6)}
    assert manifest["extra"]["options"]["split"] == "train"
    assert [Path(f).name for f in manifest["extra"]["inputs"]] == ["train-00000-of-00001.parquet"]
    original = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "original", split="original",
                            progress=False)
    assert original["num_samples"] == 5
    assert conv.convert([str(tmp_path / "in")], image_root, tmp_path / "all", split="all",
                        progress=False)["num_samples"] == 18
    with pytest.raises(FileNotFoundError, match=r"ImageNet_1K: no 'test' split; its files hold "
                                                r"\['diverse_instruction', 'original', 'train'\]"):
        conv.convert([str(tmp_path / "in")], image_root, tmp_path / "none", split="test", progress=False)


def test_rows_are_written_in_a_seeded_global_permutation(tmp_path, image_root):
    """Two ordered files become one seeded permutation (same seed, same order; another seed, another);
    --no-shuffle keeps file order; the order is recorded. (An interrupted permuted conversion resumes into
    the same shards: test_resume_after_interruption_gives_the_same_shards, which converts permuted.)"""
    for name in ("a", "b"):
        write_parquet(tmp_path / "in" / "Set" / f"{name}.parquet", split_rows(name, 20))

    def order(out, **kwargs):
        manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / out, task="retrieval",
                                shard_size=7, progress=False, **kwargs)
        return [s.query.text for s in read_samples(shard_urls(tmp_path / out))], manifest

    file_order = [f"{name} query {i}" for name in ("a", "b") for i in range(20)]
    first, manifest = order("s0")
    assert sorted(first) == sorted(file_order) and first != file_order
    assert manifest["extra"]["options"]["order"] == "permuted, seed 0"
    assert order("s0-again")[0] == first
    assert order("s1", seed=1)[0] not in (first, file_order)
    kept, manifest = order("kept", seed=None)
    assert kept == file_order and manifest["extra"]["options"]["order"] == "file order"


def test_pairs_from_csv_and_jsonl_with_mapped_columns_and_named_bad_rows(tmp_path, image_root):
    """Your own pairs/triplets: columns mapped, sides rendered in the published format with the default
    or per-row instruction, list cells parsed, a bad row named by file, row and column."""
    from mme5.data.pairs import PairFormat

    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "mine.csv", "w", newline="") as handle:
        handle.write("caption,file,negs,neg_files\n"
                     "a red cup,coco/0.jpg,\"['a blue cup']\",\"['coco/1.jpg']\"\n"
                     "a hat,coco/2.jpg,,\n"
                     ",coco/3.jpg,,\n")  # no caption: an empty query, skipped and named
    rows = [{"caption": "a dog", "file": "coco/4.jpg", "query_instruction": "Find the picture:"},
            {"file": "coco/5.jpg"},  # no caption column: refused, named
            {"caption": "a cat", "file": "missing.jpg"}]
    (tmp_path / "in" / "more.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = PairFormat.parse(["query=caption", "positive_image=file", "negatives=negs",
                              "negative_images=neg_files"], query_instruction="Find me an image:")
    manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", task="retrieval",
                            layout=pairs, seed=None, progress=False)
    samples = {s.query.prompt: s for s in read_samples(shard_urls(tmp_path / "out"))}
    assert set(samples) == {"Find me an image: a red cup\n", "Find me an image: a hat\n",
                            "Find the picture: a dog\n"}
    cup = samples["Find me an image: a red cup\n"]
    assert cup.positive.prompt == "<|image_1|>\nRepresent the given image.\n"
    assert cup.positive.image == (image_root / "coco" / "0.jpg").read_bytes()
    assert [n.prompt for n in cup.negatives] == ["<|image_1|>\na blue cup\n"]
    assert cup.negatives[0].image == (image_root / "coco" / "1.jpg").read_bytes()
    report = manifest["extra"]["report"]
    assert report["skipped"] == {"missing_column": 1, "missing_image": 1, "empty_side": 1}
    errors = "\n".join(report["errors"])
    assert "more.jsonl: row 1: field 'caption': column missing" in errors
    assert "mine.csv: row 2: field 'caption': empty text and no image or video" in errors
    assert manifest["extra"]["options"]["format"]["pairs"]["query"] == "caption"
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption'\] of the pairs format"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.csv").write_text("text,file\nhello,coco/0.jpg\n")
        conv.convert([str(tmp_path / "bad")], image_root, tmp_path / "out2", task="retrieval", layout=pairs,
                     progress=False)
    with pytest.raises(ValueError, match="expected NAME=COLUMN"):
        PairFormat.parse(["qry=caption"])


def test_a_saved_datasets_dataset_with_image_columns_converts_without_an_image_root(tmp_path):
    """A `datasets` folder (save_to_disk) of pairs with image columns: its train split by default, images
    stored as the bytes the dataset holds (a JPEG stays that JPEG), a list-of-images column as negatives,
    a bad row named by the dataset, row and the user's column; --split picks another split."""
    datasets = pytest.importorskip("datasets")
    jpegs = [image_bytes((60 * i, 20, 200), fmt="JPEG") for i in range(4)]
    train = datasets.Dataset.from_dict({
        "caption": ["a red kite", "a blue boat", None, "a green hat"],
        "photo": [{"bytes": jpeg, "path": None} for jpeg in jpegs],
        "others": [[{"bytes": jpegs[1], "path": None}], [], [], []],
    }).cast_column("photo", datasets.Image()).cast_column("others", datasets.List(datasets.Image()))
    test = datasets.Dataset.from_dict({"caption": ["a test cup"], "others": [[]],
                                       "photo": [{"bytes": jpegs[0], "path": None}]})
    test = test.cast(train.features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    from mme5.data.pairs import PairFormat

    pairs = PairFormat.parse(["query=caption", "positive_image=photo", "negative_images=others"],
                             query_instruction="Find me an image:")
    manifest = conv.convert([str(tmp_path / "saved")], None, tmp_path / "out", task="retrieval", layout=pairs,
                            progress=False)
    samples = {s.query.text: s for s in read_samples(shard_urls(tmp_path / "out"))}
    assert set(samples) == {"a red kite", "a blue boat", "a green hat"}
    kite = samples["a red kite"]
    assert kite.query.prompt == "Find me an image: a red kite\n"
    assert kite.positive.image == jpegs[0]
    assert kite.positive.prompt == "<|image_1|>\nRepresent the given image.\n"
    assert [n.image for n in kite.negatives] == [jpegs[1]]
    assert samples["a green hat"].positive.image == jpegs[3]
    assert manifest["extra"]["inputs"] == [f"{tmp_path / 'saved'}[train]"]
    assert manifest["extra"]["report"]["errors"] == [
        f"{tmp_path / 'saved'}[train]: row 2: field 'caption': empty text and no image or video"]
    other = conv.convert([str(tmp_path / "saved")], None, tmp_path / "test", task="retrieval", layout=pairs,
                         split="test", progress=False)
    assert other["num_samples"] == 1
    with pytest.raises(FileNotFoundError, match=r"no 'validation' split; it holds \['train', 'test'\]"):
        conv.convert([str(tmp_path / "saved")], None, tmp_path / "v", layout=pairs, split="validation",
                     progress=False)


def test_a_saved_dataset_in_the_published_format_reads_image_paths_under_the_root(tmp_path, image_root):
    """MMEB-train loaded with `datasets` and saved: published rows whose images are paths under --images;
    without --images such a row is named, not guessed."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(split_rows("train", 4)).save_to_disk(str(tmp_path / "ImageNet_1K"))
    manifest = conv.convert([str(tmp_path / "ImageNet_1K")], image_root, tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 4
    sample = next(iter(read_samples(shard_urls(tmp_path / "out"))))
    assert sample.task == Task.CLASSIFICATION and sample.source == "ImageNet_1K"  # from the folder name
    assert sample.query.image == (image_root / "coco" / f"{sample.query.text.split()[-1]}.jpg").read_bytes()
    rootless = conv.convert([str(tmp_path / "ImageNet_1K")], None, tmp_path / "rootless", progress=False)
    assert rootless["num_samples"] == 0
    assert re.search(r"ImageNet_1K: row \d: field 'qry_image_path': image path 'coco/\d.jpg' but no image "
                     r"root \(pass --images\)", rootless["extra"]["report"]["errors"][0])


def test_an_unreachable_hub_dataset_fails_at_once_with_what_to_do(tmp_path):
    """A hub dataset id offline: a clear error, exit status 2, nothing written."""
    import subprocess
    import sys

    pytest.importorskip("datasets")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "mme5.data.convert", "--input",
                             "TIGER-Lab/MMEB-train:ImageNet_1K", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: TIGER-Lab/MMEB-train:ImageNet_1K: not a local path, and the Hugging Face Hub cannot be " \
           "reached" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_hub_dataset_id_maps_to_load_dataset_with_its_revision_config_and_split(tmp_path, image_root,
                                                                                 monkeypatch):
    """`namespace/name@revision:config` → datasets.load_dataset(name, config, revision, split); the config
    names the source (an MMEB subset tells its task); a missing file with a table suffix is no hub id."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(repo, config, revision=None, split=None):
        calls.append((repo, config, revision, split))
        return datasets.Dataset.from_list(split_rows(split, 3))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    manifest = conv.convert(["TIGER-Lab/MMEB-train@v1:ImageNet_1K"], image_root, tmp_path / "out",
                            progress=False)
    assert calls == [("TIGER-Lab/MMEB-train", "ImageNet_1K", "v1", "train")]
    assert manifest["extra"]["inputs"] == ["TIGER-Lab/MMEB-train@v1:ImageNet_1K[train]"]
    sample = next(iter(read_samples(shard_urls(tmp_path / "out"))))
    assert (sample.source, sample.task) == ("ImageNet_1K", Task.CLASSIFICATION)
    with pytest.raises(FileNotFoundError, match="my-data/pairs.jsonl: not a parquet/JSONL/CSV file"):
        conv.convert(["my-data/pairs.jsonl"], image_root, tmp_path / "none", progress=False)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- issue 21: the output folder


def cli_args(tmp_path, image_root, *extra):
    return ["--input", str(tmp_path / "in"), "--images", str(image_root), "--out", str(tmp_path / "out"),
            *extra]


def shard_bytes(folder):
    return {Path(url).name: Path(url).read_bytes() for url in shard_urls(folder)}


def test_a_complete_conversion_run_again_does_nothing_and_other_settings_are_refused_naming_them(
        tmp_path, image_root, capsys):
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    assert conv.main(cli_args(tmp_path, image_root)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert conv.main(cli_args(tmp_path, image_root)) == 0
    out = capsys.readouterr().out
    assert "already holds this conversion, complete; nothing to do" in out and "2 samples" in out
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert {k: v for k, v in after.items() if k != ".mme5-owner.json"} == \
        {k: v for k, v in before.items() if k != ".mme5-owner.json"}
    assert conv.main(cli_args(tmp_path, image_root, "--max-negatives", "1")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "max_negatives: null (recorded) → 1 (now)" in err and "--overwrite" in err
    assert "Traceback" not in err


def test_overwrite_writes_beside_and_swaps_in_only_when_complete(tmp_path, image_root, monkeypatch):
    """An interrupted --overwrite leaves the old conversion whole (never a mix of two conversions' shards);
    the next --overwrite finishes and swaps the new one in, with none of the old shards left."""
    rows = [dict(mmeb_rows()[0], qry_image_path=f"coco/{i % 6}.jpg") for i in range(9)]
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", rows)
    args = dict(inputs=[str(tmp_path / "in")], image_root=image_root, out_dir=tmp_path / "out",
                progress=False)
    old = conv.convert(shard_size=2, **args)
    old_shards = shard_bytes(tmp_path / "out")
    assert len(old_shards) == 5

    calls = {"n": 0}
    original = conv.RowConverter.convert

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(conv.RowConverter, "convert", dying)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(shard_size=3, overwrite=True, **args)
    assert read_manifest(tmp_path / "out") == old and shard_bytes(tmp_path / "out") == old_shards
    monkeypatch.setattr(conv.RowConverter, "convert", original)
    new = conv.convert(shard_size=3, overwrite=True, **args)
    assert new["extra"]["options"]["shard_size"] == 3 and new["num_samples"] == 9
    assert sorted(shard_bytes(tmp_path / "out")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left


def test_a_second_conversion_into_a_folder_being_written_is_refused_at_once_naming_the_first(
        tmp_path, image_root, capsys):
    """Two converts into one --out (issue 21 case 16): the second stops at once, naming the first's pid;
    the first's folder is untouched."""
    import subprocess
    import sys

    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mme5.files import claim_folder; "
         "folder = claim_folder(sys.argv[1], 'mme5.data.convert', {}); print('held', flush=True); "
         "time.sleep(60)", str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert conv.main(cli_args(tmp_path, image_root)) == 2
        err = capsys.readouterr().err
        assert f"is being written by pid {holder.pid} on host" in err and "mme5.data.convert" in err
        assert not list((tmp_path / "out").glob("shard-*"))
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=f"took over the lock of pid {holder.pid}"):  # it died holding it
        assert conv.main(cli_args(tmp_path, image_root, "--overwrite")) == 0


# ----------------------------------------------------------------------------- issue 21: inputs named


def test_unknown_pair_columns_are_refused_naming_the_known_ones(tmp_path, image_root):
    """A misspelt pairs column (`negative_image`, `querry_instruction`) would leave every sample without
    its negatives or instruction: refused, with the columns the format reads and the ways out."""
    from mme5.data.pairs import PairFormat

    (tmp_path / "in").mkdir()
    row = {"query": "a red cup", "positive_image": "coco/0.jpg", "negative_image": ["coco/1.jpg"]}
    (tmp_path / "in" / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    run = dict(image_root=image_root, task="retrieval", layout=PairFormat(), progress=False)
    with pytest.raises(ValueError, match=r"pairs.jsonl: unknown column\(s\) 'negative_image' \(did you mean "
                                         r"'negative_images'\?\); the pairs format reads \['query', .*--map"):
        conv.convert([str(tmp_path / "in")], out_dir=tmp_path / "out", **run)
    assert not (tmp_path / "out").exists()  # refused before the folder is claimed
    (tmp_path / "in" / "pairs.jsonl").unlink()
    (tmp_path / "in" / "pairs.csv").write_text("query,positive_image,querry_instruction,note,language\n"
                                               "a red cup,coco/0.jpg,Find it:,mine,de\n")
    with pytest.raises(ValueError, match=r"'querry_instruction' \(did you mean 'query_instruction'\?\), "
                                         r"'note'"):
        conv.convert([str(tmp_path / "in")], out_dir=tmp_path / "out", **run)
    manifest = conv.convert([str(tmp_path / "in")], out_dir=tmp_path / "out",
                            ignore_columns=["querry_instruction", "note"], **run)
    assert manifest["num_samples"] == 1
    assert list(manifest["extra"]["unread_columns"].values()) == [["querry_instruction", "note"]]
    assert next(iter(read_samples(shard_urls(tmp_path / "out")))).language == "de"  # a pairs field now


def test_published_rows_refuse_misspelt_columns_and_list_the_extra_ones_they_leave_unread(
        tmp_path, image_root, capsys):
    """Published files carry columns of their own (left unread as the reference does, and listed); a near
    miss of a known column (`neg_texts`) is refused, since its negatives would be lost."""
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet",
                  [row | {"neg_texts": row["neg_text"]} for row in mmeb_rows()[:2]])
    with pytest.raises(ValueError, match=r"'neg_texts' \(did you mean 'neg_text'\?\).*--ignore-columns"):
        conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", progress=False)
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet",
                  [row | {"__index_level_0__": i} for i, row in enumerate(mmeb_rows()[:2])])
    assert conv.main(cli_args(tmp_path, image_root)) == 0
    assert "unread columns of" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    assert list(manifest["extra"]["unread_columns"].values()) == [["__index_level_0__"]]


def test_a_byte_order_mark_is_read_in_jsonl_and_csv(tmp_path, image_root):
    """Excel and Notepad start UTF-8 files with a BOM: the first JSONL row was lost as bad JSON, the first
    CSV column named '\\ufeffquery'."""
    from mme5.data.pairs import PairFormat

    (tmp_path / "in").mkdir()
    rows = [{"query": f"a cup {i}", "positive_image": f"coco/{i}.jpg"} for i in range(2)]
    jsonl = "".join(json.dumps(row) + "\n" for row in rows).encode()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl)
    (tmp_path / "in" / "b.csv").write_bytes(b"\xef\xbb\xbfquery,positive_image\na hat,coco/2.jpg\n")
    manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", task="retrieval",
                            layout=PairFormat(), progress=False)
    assert manifest["num_samples"] == 3 and manifest["extra"]["report"]["skipped"] == {}


def test_text_files_in_another_encoding_are_refused_naming_the_byte(tmp_path, image_root):
    from mme5.data.inputs import check_utf8

    (tmp_path / "in").mkdir()
    latin1 = "query,positive_image\nun café,coco/0.jpg\n".encode("latin-1")
    (tmp_path / "in" / "pairs.csv").write_bytes(latin1)
    with pytest.raises(ValueError, match=r"pairs.csv: not UTF-8: byte 27 \(line 2, 0xe9\)"):
        conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    text = tmp_path / "t.txt"  # chunks that cut a character in two, then a bad byte after a cut
    text.write_bytes("aé\né\n".encode())
    check_utf8(text, chunk_size=2)
    text.write_bytes("aé\né\n".encode() + b"\xff")
    with pytest.raises(ValueError, match=r"byte 7 \(line 3, 0xff\)"):
        check_utf8(text, chunk_size=3)
    text.write_bytes("aé".encode()[:2])  # a file ending inside a character
    with pytest.raises(ValueError, match=r"byte 1 \(line 1, 0xc3\)"):
        check_utf8(text, chunk_size=3)


def test_a_split_that_no_input_holds_is_an_error(tmp_path, image_root):
    """Files without a split in their name are read whatever --split says; a --split given that none holds
    (a typo) is refused, not silently ignored."""
    write_parquet(tmp_path / "in" / "OK-VQA" / "rows.parquet", mmeb_rows()[:2])
    run = dict(inputs=[str(tmp_path / "in")], image_root=image_root, out_dir=tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match=r"--split tset: no input holds that split \(the inputs hold "
                                                r"no named split\)"):
        conv.convert(split="tset", **run)
    assert conv.convert(**run)["num_samples"] == 2


@pytest.mark.parametrize("flag,value,message", [("--max-negatives", "-1", "must be at least 0, got -1"),
                                                ("--shard-size", "0", "must be at least 1, got 0"),
                                                ("--shard-size", "ten", "invalid int value: 'ten'")])
def test_negative_counts_are_refused_at_parse_time(tmp_path, image_root, capsys, flag, value, message):
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    with pytest.raises(SystemExit) as stop:
        conv.main(cli_args(tmp_path, image_root, flag, value))
    assert stop.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tiff_images_convert_and_16_bit_ones_keep_their_content(tmp_path, image_root):
    """A `.tif` image (here a 16-bit greyscale scan) is stored with its own bytes and extension, and
    decodes to its content, not to white."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(ramp).save(image_root / "coco" / "scan.tif")
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet",
                  [mmeb_rows()[0] | {"qry_image_path": "coco/scan.tif"}])
    manifest = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 1
    sample = next(iter(read_samples(shard_urls(tmp_path / "out"))))
    assert sample.query.image == (image_root / "coco" / "scan.tif").read_bytes()
    assert (np.asarray(sample.query.pil().convert("RGB"))[..., 0] == ramp >> 8).all()


def test_an_input_given_twice_is_read_once(tmp_path, image_root):
    """Once, where it first appears (the order of the inputs stays as given)."""
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    write_parquet(tmp_path / "other" / "OK-VQA" / "more.parquet", mmeb_rows()[:1])
    twice = [str(tmp_path / "in"), str(tmp_path / "other"), str(tmp_path / "in" / "OK-VQA" / "train.parquet"),
             str(tmp_path / "in" / "OK-VQA" / ".." / "OK-VQA" / "train.parquet")]
    manifest = conv.convert(twice, image_root, tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 3
    assert [Path(name).name for name in manifest["extra"]["inputs"]] == ["train.parquet", "more.parquet"]


def test_paths_that_are_not_utf8_are_refused_before_anything_is_written(tmp_path, image_root, capsys):
    """A file name in another encoding (an input found in a folder, or any path on the command line) would
    crash the manifest write after the work: refused up front, named with its bad bytes escaped."""
    import os

    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    latin1 = tmp_path / "in" / "OK-VQA" / os.fsdecode(b"caf\xe9.parquet")
    write_parquet(tmp_path / "in" / "OK-VQA" / "cafe.parquet", mmeb_rows()[:2])
    os.rename(tmp_path / "in" / "OK-VQA" / "cafe.parquet", os.fsencode(latin1))
    with pytest.raises(ValueError, match=r"caf\\udce9.parquet: the file name is not UTF-8"):
        conv.convert([str(tmp_path / "in")], image_root, tmp_path / "out", progress=False)
    os.unlink(os.fsencode(latin1))
    out = str(tmp_path / os.fsdecode(b"sortie-\xe9"))
    assert conv.main(["--input", str(tmp_path / "in"), "--images", str(image_root), "--out", out]) == 2
    assert "not UTF-8" in capsys.readouterr().err and not os.path.exists(out)


@pytest.mark.parametrize("out", ["in", "in/OK-VQA/train.parquet", ".", "images"])
def test_an_out_folder_that_is_or_holds_an_input_is_refused(tmp_path, image_root, out):
    """--out equal to (or above) an input or the image root: --overwrite would swap the inputs away."""
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    with pytest.raises(OutputFolderError, match="is or holds the input|is a file"):
        conv.convert([str(tmp_path / "in")], image_root, tmp_path / out, overwrite=True, progress=False)
    assert (tmp_path / "in" / "OK-VQA" / "train.parquet").is_file()
    assert (image_root / "coco" / "0.jpg").is_file()
    inside = conv.convert([str(tmp_path / "in")], image_root, tmp_path / "in" / "shards", progress=False)
    assert inside["num_samples"] == 2


def test_a_conversion_whose_images_were_not_found_is_done_again_once_they_are(tmp_path, image_root, capsys):
    """Another --images is another conversion (refused, naming it), not one already complete; a conversion
    that wrote no sample (the images not there yet) is converted again, not reported complete."""
    write_parquet(tmp_path / "in" / "OK-VQA" / "train.parquet", mmeb_rows()[:2])
    assert conv.main(cli_args(tmp_path, tmp_path / "wrong")) == 1  # no image found: no sample
    assert conv.main(cli_args(tmp_path, image_root)) == 2
    err = capsys.readouterr().err
    assert f'images: "{(tmp_path / "wrong").resolve()}" (recorded) → "{image_root.resolve()}" (now)' in err
    assert conv.main(cli_args(tmp_path, image_root, "--overwrite")) == 0
    assert read_manifest(tmp_path / "out")["num_samples"] == 2

    shutil.move(image_root, tmp_path / "elsewhere")  # the images not unpacked yet
    assert conv.main(cli_args(tmp_path, image_root, "--out", str(tmp_path / "later"))) == 1
    shutil.move(tmp_path / "elsewhere", image_root)
    capsys.readouterr()
    assert conv.main(cli_args(tmp_path, image_root, "--out", str(tmp_path / "later"))) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert read_manifest(tmp_path / "later")["num_samples"] == 2


def test_the_documented_conversions_run(tmp_path, image_root):
    """The docs' two commands on files of the published layouts, put where they name them."""
    hub_file = tmp_path / "mmE5-MMEB-hardneg" / "ImageNet_1K" / "train-00000-of-00001.parquet"
    write_parquet(hub_file, mmeb_rows())
    synthetic = tmp_path / "mmE5-synthetic" / "Retrieval"
    synthetic.mkdir(parents=True)
    (synthetic / "part.jsonl").write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows()))
    for images in ("mmE5-images", "synthetic-images"):
        shutil.copytree(image_root, tmp_path / images)
    run_doc_commands(doc_commands("docs/data.md", "Public rows → shards"), tmp_path)

    hardneg = read_manifest(tmp_path / "data/shards/mmE5-MMEB-hardneg/ImageNet_1K")
    assert hardneg["num_samples"] == 2 and hardneg["extra"]["report"]["skipped"] == {
        "missing_image": 1, "empty_positive": 1, "bad_list": 1}
    samples = list(read_samples(shard_urls(tmp_path / "data/shards/mmE5-synthetic/Retrieval"), strict=True))
    assert samples and all(s.task == Task.RETRIEVAL for s in samples)
