"""MMEB-V2 image and video readers: fixtures in the published layouts (annotation parquet as the hub saves
it, frames folders as the MMEB-V2 tarballs unpack) read into RetrievalSets whose candidates and gold are
written out by hand from VLM2Vec's loaders (src/data/eval_dataset/*.py at 6e1e1d4)."""

from __future__ import annotations

import hashlib
import io
import json

import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_fetch import fake_hub, tar_bytes

from mme5.data import fetch, fetch_mmeb_v2
from mme5.data.fetch_mmeb_v2 import ARCHIVES, unpack_parts
from mme5.eval.encode import _loaded, item_key
from mme5.eval.images import MissingImageError
from mme5.eval.mmeb_v2.benchmark import MMEBV2
from mme5.eval.mmeb_v2.readers import FRAMES, MVBENCH_CONFIGS, VIDEO_READERS, read_image, read_video
from mme5.eval.mmeb_v2.registry import MMEB_V2, MOMENTSEEKER_QUERY_INSTRUCTIONS, sets_of
from mme5.eval.mmeb_v2.visdoc import read_visdoc
from mme5.eval.retrieval import ItemSpec

SPECS = {s.name: s for s in MMEB_V2}


def annotations(root, name, rows: dict, config="data", split="test"):
    """A hub annotation repo's split where fetch saves it: annotations/<repo>/<config>/<split>-*.parquet."""
    folder = root / "annotations" / SPECS[name].annotations.repo / config
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / f"{split}-00000-of-00001.parquet")


def frames(folder, names=("frame_10.jpg", "frame_2.jpg", "frame_1.jpg")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"jpeg " + name.encode())
    return folder


def frame_files(item: ItemSpec) -> list[str]:
    return [ref.path.rsplit("/", 2)[-2] + "/" + ref.path.rsplit("/", 1)[-1] for ref in item.video]


def described(data, ranking):
    """Per query: (query item, candidate items, gold column)."""
    return [(data.items[q], [data.items[c] for c in cands if c >= 0], int(g))
            for q, cands, g in zip(ranking.queries, ranking.candidates.tolist(), ranking.gold, strict=True)]


def test_a_global_classification_set_ranks_against_every_label_of_the_set(tmp_path):
    annotations(tmp_path, "UCF101", {"video_id": ["v1", "v2", "v3"],
                                     "pos_text": ["Diving", "Biking", "Haircut"]})
    cls = tmp_path / "video-tasks" / "frames" / "video_cls" / "UCF101"
    for video in ("v1", "v2"):
        frames(cls / video)
    data = read_video(tmp_path, SPECS["UCF101"], max_queries=2)  # v3 not kept: its label still a candidate
    rows = described(data, data.rankings["UCF101"])
    labels = [ItemSpec("", label) for label in ("Diving", "Biking", "Haircut")]
    instruction = "What activities or sports are being performed by the person in the video?"
    in_order = [[f"{v}/frame_1.jpg", f"{v}/frame_2.jpg", f"{v}/frame_10.jpg"] for v in ("v1", "v2")]
    assert [(q.instruction, q.text, frame_files(q)) for q, _, _ in rows] == [
        (instruction, None, in_order[0]), (instruction, None, in_order[1])]
    assert [(cands, gold) for _, cands, gold in rows] == [(labels, 0), (labels, 1)]
    assert data.rankings["UCF101"].relevance is None


def test_smthsmthv2_is_local_over_its_own_list_and_cut_at_1000_rows(tmp_path):
    n = 1001
    annotations(tmp_path, "SmthSmthV2", {"video_id": list(range(n)), "pos_text": ["Closing something"] * n,
                                         "neg_text": [["Opening something", "Closing something"]] * n})
    for video in range(n):
        frames(tmp_path / "video-tasks" / "frames" / "video_cls" / "SSv2" / str(video), ["0.jpg"])
    data = read_video(tmp_path, SPECS["SmthSmthV2"])
    ranking = data.rankings["SmthSmthV2"]
    assert len(ranking.queries) == 1000
    _, cands, gold = described(data, ranking)[0]
    assert [c.text for c in cands] == ["Opening something", "Closing something"] and gold == 1


def test_a_retrieval_set_ranks_captions_against_the_distinct_videos(tmp_path):
    annotations(tmp_path, "MSR-VTT", {"video_id": ["va", "vb", "va"], "caption": ["a dog", "a cat", "a pup"]},
                config="test_1k")
    ret = tmp_path / "video-tasks" / "frames" / "video_ret" / "MSR-VTT"
    frames(ret / "va")
    frames(ret / "vb", ["00.jpeg", "01.jpeg"])
    data = read_video(tmp_path, SPECS["MSR-VTT"])
    rows = described(data, data.rankings["MSR-VTT"])
    spec = SPECS["MSR-VTT"]
    assert [(q.instruction, q.text, q.video) for q, _, _ in rows] == [
        (spec.query_instruction, text, None) for text in ("a dog", "a cat", "a pup")]
    cands = rows[0][1]
    assert [(c.instruction, c.text, frame_files(c)) for c in cands] == [
        (spec.target_instruction, None, ["va/frame_1.jpg", "va/frame_2.jpg", "va/frame_10.jpg"]),
        (spec.target_instruction, None, ["vb/00.jpeg", "vb/01.jpeg"])]
    assert [gold for _, _, gold in rows] == [0, 1, 0] and all(r[1] == cands for r in rows)


def test_mvbench_reads_every_config_of_its_train_split_in_the_reference_order(tmp_path):
    columns = {"question": [], "video": [], "candidates": [], "answer": []}
    for config in MVBENCH_CONFIGS:
        annotations(tmp_path, "MVBench", columns, config=config, split="train")  # empty but present
    annotations(tmp_path, "MVBench", {"question": ["Which way?"], "video": ["c1.mp4"],
                                      "candidates": [["left", "right"]], "answer": ["right"]},
                config="moving_direction", split="train")
    annotations(tmp_path, "MVBench", {"question": ["How many?"], "video": ["e7"],
                                      "candidates": [["one", "two", "three"]], "answer": ["one"]},
                config="episodic_reasoning", split="train")
    qa = tmp_path / "video-tasks" / "frames" / "video_qa" / "MVBench"
    frames(qa / "moving_direction" / "c1.mp4", ["0.jpg"])
    frames(qa / "episodic_reasoning" / "e7", ["0.jpg"])
    data = read_video(tmp_path, SPECS["MVBench"])
    rows = described(data, data.rankings["MVBench"])
    assert [(q.text, [c.text for c in cands], gold) for q, cands, gold in rows] == [
        ("How many?\nOptions:\n(A) one\n(B) two\n(C) three", ["(A) one", "(B) two", "(C) three"], 0),
        ("Which way?\nOptions:\n(A) left\n(B) right", ["(A) left", "(B) right"], 1)]
    assert all(c.instruction == "" for _, cands, _ in rows for c in cands)


def test_video_mme_and_egoschema_options_are_cleaned_as_their_loaders_clean_them(tmp_path):
    annotations(tmp_path, "Video-MME", {"question": ["What?"], "videoID": ["m1"], "options": [
        ["A. a red car.", "B. a blue car", "C. none", "D. all"]], "answer": ["B"]})
    frames(tmp_path / "video-tasks" / "frames" / "video_qa" / "Video-MME" / "m1", ["0.jpg"])
    data = read_video(tmp_path, SPECS["Video-MME"])
    (query, cands, gold), = described(data, data.rankings["Video-MME"])
    assert query.text == "What?\nA. a red car.\nB. a blue car\nC. none\nD. all"
    assert [c.text for c in cands] == ["a red car", "a blue car", "none", "all"] and gold == 1


def test_every_video_set_has_a_reader_and_a_frames_folder():
    assert set(VIDEO_READERS) == set(FRAMES) == {s.name for s in sets_of("video")}


@pytest.mark.parametrize(("name", "row", "folder", "text", "options", "gold"), [
    ("NExTQA", {"video": 42, "question": "why?", "answer": 1, **{f"a{i}": f"o{i}" for i in range(5)}}, "42",
     "why?\nOptions:\n(A) o0\n(B) o1\n(C) o2\n(D) o3\n(E) o4", ["o0", "o1", "o2", "o3", "o4"], 1),
    ("EgoSchema", {"video_idx": "e1", "question": "what?", "answer": "0", "option": ["A. x.", "B. y"]}, "e1",
     "what?A. x. B. y", ["x", "y"], 0),
    ("ActivityNetQA", {"video_name": "abc", "question": "is it sunny", "answer": "no"}, "v_abc",
     "is it sunny? (A) yes; (B) no.", ["yes", "no"], 1),
])
def test_qa_texts_options_and_frames_follow_each_loader(tmp_path, name, row, folder, text, options, gold):
    config = SPECS[name].annotations.config or "data"
    annotations(tmp_path, name, {key: [value] for key, value in row.items()}, config=config)
    frames(tmp_path / "video-tasks" / "frames" / FRAMES[name] / folder, ["0.jpg"])
    data = read_video(tmp_path, SPECS[name])
    (query, cands, found), = described(data, data.rankings[name])
    assert (query.text, [c.text for c in cands], found) == (text, options, gold)
    assert frame_files(query) == [f"{folder}/0.jpg"]


@pytest.mark.parametrize(("name", "row"), [
    ("NExTQA", {"video": 42, "question": "why?", "answer": "B", **{f"a{i}": f"o{i}" for i in range(5)}}),
    ("EgoSchema", {"video_idx": "e1", "question": "what?", "answer": "two", "option": ["A. x.", "B. y"]}),
])
def test_an_answer_that_is_no_option_index_names_set_row_and_field(tmp_path, name, row):
    annotations(tmp_path, name, {key: [value] for key, value in row.items()}, SPECS[name].annotations.config)
    with pytest.raises(ValueError, match=rf"^{name}, .*parquet row 0, field answer: .* is not an option's "
                                         r"index"):
        read_video(tmp_path, SPECS[name])


def test_moment_retrieval_ranks_the_videos_clip_folders(tmp_path):
    annotations(tmp_path, "QVHighlight", {"query": ["a man sings"], "video_path": ["videos/vidA.mp4"]})
    video = tmp_path / "video-tasks" / "frames" / "video_mret" / "QVHighlight" / "vidA"
    frames(video / "query", [f"{i}.jpg" for i in range(3)])
    for clip in ("negative_10", "positive", "negative_2"):
        frames(video / clip, ["0.jpg"])
    data = read_video(tmp_path, SPECS["QVHighlight"])
    (query, cands, gold), = described(data, data.rankings["QVHighlight"])
    assert (query.text, frame_files(query)) == ("a man sings", ["query/0.jpg", "query/1.jpg", "query/2.jpg"])
    assert [frame_files(c)[0].split("/")[0] for c in cands] == ["negative_2", "negative_10", "positive"]
    assert gold == 2


def test_momentseeker_instruction_follows_the_query_kind_and_every_positive_is_relevant(tmp_path):
    def clips(*paths):
        return [{"output_path": p} for p in paths]
    annotations(tmp_path, "MomentSeeker", {
        "query": ["find it", "this one", "that"], "input_frames": ["", "q/img.jpg", "mov/7.mp4"],
        "positive_frames": [clips("m/p1.mp4", "m/p2.mp4"), clips("m/p1.mp4"), clips("m/p2.mp4")],
        "negative_frames": [clips("m/n1.mp4"), clips("m/n1.mp4"), clips("m/n1.mp4")]})
    root = tmp_path / "video-tasks" / "frames" / "video_mret" / "MomentSeeker"
    for clip in ("m_p1", "m_p2", "m_n1", "mov_7"):
        frames(root / "video_frames" / clip, ["0.jpg"])
    (root / "query_q").mkdir()
    (root / "query_q" / "img.jpg").write_bytes(b"jpeg")
    data = read_video(tmp_path, SPECS["MomentSeeker"])
    ranking = data.rankings["MomentSeeker"]
    rows = described(data, ranking)
    kinds = ("text", "image", "video")
    assert [q.instruction for q, _, _ in rows] == [MOMENTSEEKER_QUERY_INSTRUCTIONS[k] for k in kinds]
    assert rows[1][0].image.path.endswith("query_q/img.jpg") and frame_files(rows[2][0]) == ["mov_7/0.jpg"]
    assert [[frame_files(c)[0].split("/")[0] for c in cands] for _, cands, _ in rows] == [
        ["m_p1", "m_p2", "m_n1"], ["m_p1", "m_n1"], ["m_p2", "m_n1"]]
    assert ranking.relevance.tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0]]


def test_an_image_set_reads_the_instruct_rows(tmp_path):
    annotations(tmp_path, "MSCOCO_t2i", {
        "qry_inst": ["<|image_1|> Find me an everyday image that matches the given caption:"],
        "qry_text": ["a dog"], "qry_img_path": [""], "tgt_inst": ["<|image_1|> Represent the given image."],
        "tgt_text": [["", ""]], "tgt_img_path": [["MSCOCO_t2i/a.jpg", "MSCOCO_t2i/b.jpg"]]},
        config="MSCOCO_t2i")
    annotations(tmp_path, "ImageNet-1K", {
        "qry_inst": ["<|image_1|> Represent the given image for classification"], "qry_text": [""],
        "qry_img_path": ["ImageNet-1K/q.jpg"], "tgt_inst": [""], "tgt_text": [["dog", "cat"]],
        "tgt_img_path": [["", ""]]}, config="ImageNet-1K")
    for path in ("MSCOCO_t2i/a.jpg", "MSCOCO_t2i/b.jpg", "ImageNet-1K/q.jpg"):
        (tmp_path / "image-tasks" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "image-tasks" / path).write_bytes(b"jpeg")
    data = read_image(tmp_path, SPECS["MSCOCO_t2i"])
    (query, cands, gold), = described(data, data.rankings["MSCOCO_t2i"])
    assert (query.instruction, query.text, query.image) == (
        "Find me an everyday image that matches the given caption:", "a dog", None)
    assert [(c.instruction, c.text, c.image.path.rsplit("/", 1)[-1]) for c in cands] == [
        ("Represent the given image.", None, "a.jpg"), ("Represent the given image.", None, "b.jpg")]
    assert gold == 0
    data = read_image(tmp_path, SPECS["ImageNet-1K"])
    (query, cands, gold), = described(data, data.rankings["ImageNet-1K"])
    assert query.image.path.endswith("image-tasks/ImageNet-1K/q.jpg")
    assert cands == [ItemSpec("", "dog"), ItemSpec("", "cat")] and gold == 0


@pytest.mark.parametrize("empty", [False, True])
def test_a_missing_or_empty_frames_folder_names_set_row_and_field(tmp_path, empty):
    annotations(tmp_path, "HMDB51", {"video_id": ["v1"], "pos_text": ["wave"]})
    folder = tmp_path / "video-tasks" / "frames" / "video_cls" / "HMDB51" / "v1"
    if empty:
        frames(folder, ["notes.txt"])
    problem = "holds no frame" if empty else "not found"
    with pytest.raises(MissingImageError, match=r"^HMDB51, .*/test-00000-of-00001\.parquet row 0, field "
                       r"video_id: frames folder .*/HMDB51/v1' " + problem):
        read_video(tmp_path, SPECS["HMDB51"])


def test_a_video_items_cache_key_covers_its_frames_and_the_model_gets_their_paths(tmp_path):
    folder = frames(tmp_path / "v", ["0.jpg", "1.jpg"])
    annotations(tmp_path, "MSVD", {"video_id": ["v"], "caption": [["a", "b"]]})
    (tmp_path / "video-tasks" / "frames" / "video_ret").mkdir(parents=True)
    (tmp_path / "video-tasks" / "frames" / "video_ret" / "MSVD").symlink_to(tmp_path)
    item = read_video(tmp_path, SPECS["MSVD"]).items[1]
    plain = ItemSpec("instr", "text")  # an item without video keeps the key it had before videos
    assert item_key(plain) == hashlib.sha1(json.dumps(["instr", "text", None, None]).encode()).hexdigest()
    before = item_key(item)
    (folder / "1.jpg").write_bytes(b"a rewritten frame")
    assert item_key(read_video(tmp_path, SPECS["MSVD"]).items[1]) != before
    (batch,) = _loaded([[item]], workers=1)
    assert batch[0].video == (str(folder.resolve() / "0.jpg"), str(folder.resolve() / "1.jpg"))
    assert batch[0].image is None


def parquet_bytes(rows: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(rows), buffer)
    return buffer.getvalue()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buffer, format="JPEG")  # the corpus may hold any format
    return buffer.getvalue()


def jpeg(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


# What the fake hub serves: an image, a classification video, a QA video (its archive in two parts) and a
# raw video the fetch leaves; one page set. The frames are real JPEGs, so an evaluation can read them.
IMAGE, CLS_FRAME, QA_FRAME = jpeg("red"), jpeg("green"), jpeg("blue")


def serve_v2_hub(monkeypatch) -> list[dict]:
    """The hub repos MMEB-V2's fetch reads, in their published layouts, served in place of
    `snapshot_download`: the media repo, UCF101's annotations and ViDoRe docvqa's queries, page and qrels;
    every other repo holds empty corpus files. Returns the list the downloads are recorded in."""
    qa = tar_bytes({"video_qa/NExTQA/n1/0.jpg": QA_FRAME})
    docvqa = "vidore/docvqa_test_subsampled_beir"
    hub = {"TIGER-Lab/MMEB-V2": {
        "image-tasks/mmeb_v1.tar.gz": tar_bytes({"MMEB/ImageNet-1K/q.jpg": IMAGE}),
        "video-tasks/frames/video_cls.tar.gz": tar_bytes({"UCF101/v1/0.jpg": CLS_FRAME}),
        "video-tasks/frames/video_qa.tar.gz-00": qa[:100], "video-tasks/frames/video_qa.tar.gz-01": qa[100:],
        "video-tasks/videos/video_cls/UCF101/v1.mp4": b"raw video, not fetched", "README.md": b"# card\n"},
        "VLM2Vec/UCF101": {"data/test-00000-of-00001.parquet": parquet_bytes(
            {"video_id": ["v1"], "pos_text": ["Diving"]}), "README.md": b"# card\n"},
        docvqa: {f"{config}/test-00000-of-00001.parquet": parquet_bytes(rows) for config, rows in {
            "queries": {"query-id": ["q"], "query": ["what?"]},
            "corpus": {"corpus-id": ["d"], "image": [{"bytes": png_bytes(), "path": "d.jpg"}]},
            "qrels": {"query-id": ["q"], "corpus-id": ["d"], "score": [1]}}.items()}}
    no_pages = parquet_bytes({"corpus-id": pa.array([], pa.string()), "image": pa.array([], pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())]))})
    other = {f"corpus/{split}-00000-of-00001.parquet": no_pages for split in ("test", "train")}  # every repo
    calls = []
    fakes = {repo: fake_hub(calls, files) for repo, files in hub.items()}
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: fakes.get(repo_id, fake_hub(calls, other))(repo_id, **kw))
    return calls


@pytest.mark.filterwarnings("error::UserWarning")  # a rerun takes no archive for a replaced one
def test_fetch_unpacks_the_media_as_download_data_sh_and_saves_the_annotations(tmp_path, monkeypatch, capsys):
    calls = serve_v2_hub(monkeypatch)
    out = tmp_path / "v2"
    assert fetch.main(["--dataset", "mmeb-v2", "--out", str(out)]) == 0
    assert "--benchmark mmeb-v2 --mmeb-v2" in capsys.readouterr().out
    assert (out / "image-tasks" / "ImageNet-1K" / "q.jpg").read_bytes() == IMAGE
    frames_folder = out / "video-tasks" / "frames"
    assert (frames_folder / "video_qa" / "NExTQA" / "n1" / "0.jpg").read_bytes() == QA_FRAME
    assert not (out / "video-tasks" / "videos").exists()
    assert {c["repo_id"]: c["allow_patterns"] for c in calls}["TIGER-Lab/MMEB-V2"] == [
        "image-tasks/*", "video-tasks/frames/*"]
    ucf = read_video(out, SPECS["UCF101"])  # the readers read what fetch wrote
    assert ucf.items[0].video[0].path.endswith("video-tasks/frames/video_cls/UCF101/v1/0.jpg")
    with Image.open(out / "visdoc-tasks" / "ViDoRe_docvqa" / "d.png") as page:
        assert page.format == "PNG"  # saved under the loader's name, encoded by its extension
    assert len(read_visdoc(out / "visdoc-tasks" / "ViDoRe_docvqa", SPECS["ViDoRe_docvqa"]).items) == 2

    frame = out / "video-tasks" / "frames" / "video_cls" / "UCF101" / "v1" / "0.jpg"
    frame.write_bytes(b"kept")  # a rerun downloads nothing present and unpacks nothing again
    assert fetch.main(["--dataset", "mmeb-v2", "--out", str(out), "--modalities", "video"]) == 0
    assert frame.read_bytes() == b"kept"


def test_an_archive_member_escaping_its_folder_is_refused(tmp_path):
    (tmp_path / "video-tasks" / "frames").mkdir(parents=True)
    (tmp_path / "video-tasks" / "frames" / "video_ret.tar.gz").write_bytes(tar_bytes({"../../out.jpg": b"x"}))
    with pytest.raises(ValueError, match="would be written outside"):
        unpack_parts(tmp_path, ARCHIVES[2])
    assert not (tmp_path / "video-tasks" / "out.jpg").exists()


def test_a_split_archive_with_a_part_cut_short_is_refused_naming_its_parts(tmp_path, capsys):
    frames = tmp_path / "video-tasks" / "frames"
    frames.mkdir(parents=True)
    whole = tar_bytes({f"video_qa/NExTQA/n1/{i}.jpg": bytes(range(256)) * 20 for i in range(4)})
    (frames / "video_qa.tar.gz-00").write_bytes(whole[:200])
    (frames / "video_qa.tar.gz-01").write_bytes(whole[200:-100])
    with pytest.raises(ValueError, match=r"video_qa\.tar\.gz-00 \+ \S+video_qa\.tar\.gz-01: a damaged or cut "
                                         r"archive .*; delete its file\(s\) and rerun"):
        unpack_parts(tmp_path, ARCHIVES[4])
    assert not (frames / "video_qa.tar.gz-00.unpacked").exists()


@pytest.mark.parametrize(("row", "message"), [
    ({"corpus-id": "d66", "image": {"bytes": b"<html>rate limited</html>", "path": "d66.jpg"}},
     r"row 66 \(corpus-id 'd66'\), field image: not an image PIL reads and saves as \.png"),
    ({"corpus-id": "../../d66", "image": {"bytes": png_bytes(), "path": "d66.jpg"}},
     r"row 66 \(corpus-id '\.\./\.\./d66'\), field corpus-id: names no file in"),
])
def test_a_corpus_page_that_cannot_be_written_names_file_row_and_field(tmp_path, row, message):
    """Rows are counted through the file, not per read batch (64 rows); no partial page is left behind."""
    rows = [{"corpus-id": f"d{i}", "image": {"bytes": png_bytes(), "path": f"d{i}.jpg"}} for i in range(66)]
    folder = tmp_path / "ViDoRe_docvqa"
    (folder / "corpus").mkdir(parents=True)
    (folder / "corpus" / "test-00000-of-00001.parquet").write_bytes(parquet_bytes(
        {"corpus-id": [r["corpus-id"] for r in [*rows, row]], "image": [r["image"] for r in [*rows, row]]}))
    with pytest.raises(ValueError, match=r"corpus/test-00000-of-00001\.parquet " + message):
        fetch_mmeb_v2.write_pages(folder, SPECS["ViDoRe_docvqa"])
    assert sorted(p.name for p in folder.iterdir()) == ["corpus", *sorted(f"d{i}.png" for i in range(66))]


def test_an_answer_that_is_none_of_the_options_names_set_row_and_field(tmp_path):
    annotations(tmp_path, "Video-MME", {"question": ["What?"], "videoID": ["m1"], "options": [
        ["A. x", "B. y", "C. z", "D. w"]], "answer": [""]})
    with pytest.raises(ValueError, match=r"^Video-MME, .*row 0, field answer: not one of the 4 options"):
        read_video(tmp_path, SPECS["Video-MME"])


def test_a_root_whose_fetch_stopped_mid_unpack_is_refused_until_the_fetch_is_rerun(tmp_path, monkeypatch):
    frames = {f"UCF101/v1/{i}.jpg": b"frame" for i in range(8)}
    files = {"video-tasks/frames/video_cls.tar.gz": tar_bytes(frames), "README.md": b"# card\n"}
    other = {"data/test-00000-of-00001.parquet": parquet_bytes({"video_id": ["v1"], "pos_text": ["Diving"]})}
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: fake_hub(
        calls, files if repo_id == "TIGER-Lab/MMEB-V2" else other)(repo_id, **kw))
    member_filter = fetch_mmeb_v2._member_filter

    def killed_after_three_frames(*args):
        keep, seen = member_filter(*args), []

        def stop_at_the_fourth(member, path):
            seen.append(member)
            if len(seen) > 3:
                raise KeyboardInterrupt  # as a kill: the fetch never reaches its end
            return keep(member, path)
        return stop_at_the_fourth
    monkeypatch.setattr(fetch_mmeb_v2, "_member_filter", killed_after_three_frames)
    out = tmp_path / "v2"
    with pytest.raises(KeyboardInterrupt):
        fetch.main(["--dataset", "mmeb-v2", "--out", str(out), "--modalities", "video"])
    assert len(list((out / "video-tasks/frames/video_cls/UCF101/v1").iterdir())) == 3  # a video cut short
    with pytest.raises(ValueError, match=r"v2: the fetch writing it has not completed .* rerun `python -m "
                                         r"mme5\.data\.fetch --dataset mmeb-v2 --out \S+v2` with the "
                                         r"--modalities it was given"):
        MMEBV2(out, subsets=["UCF101"])
    monkeypatch.setattr(fetch_mmeb_v2, "_member_filter", member_filter)
    assert fetch.main(["--dataset", "mmeb-v2", "--out", str(out), "--modalities", "video"]) == 0
    assert len(read_video(out, SPECS["UCF101"]).items[0].video) == 8  # unpacked again, whole
    MMEBV2(out, subsets=["UCF101"])
