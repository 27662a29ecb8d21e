"""VLM2Vec-V2's video and visual-document training sets through the converter (`mme5.data.layouts`).

Fixtures are in the published layouts (LLaVA-Hound JSONL rows and frames folders, vidore/colpali_train_set
parquet files, a VisRAG `datasets` folder); the expected strings are written out by hand from the reference's
rules (TIGER-AI-Lab/VLM2Vec 6e1e1d4, src/data/dataset/{llavahound_dataset_caption,llavahound_dataset_qa,
vidore_dataset,visrag_dataset}.py), the published placeholder standing where it writes the model's token.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from doc_blocks import doc_commands, run_doc_commands
from helpers import image_bytes, video_frames

from mme5.data import convert as conv
from mme5.data.layouts import LAYOUTS
from mme5.data.schema import Modality, Task
from mme5.data.shards import read_manifest, read_samples, shard_urls
from mme5.files import OutputFolderError

# ----------------------------------------------------------------------------- LLaVA-Hound video sets


def hound_row(video, question, answer, **extra):
    return {"id": f"{video}-0", "video": video, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


@pytest.fixture
def hound(tmp_path):
    """`video_caption_300k.jsonl`-style rows and the frames base dir (`train_300k/<video>/`), frame names
    that only a natural sort orders (c01_2 before c01_10)."""
    frames = tmp_path / "train_300k"
    videos = {"v_a": ["c01_10.jpeg", "c01_2.jpeg", "c01_1.jpeg"], "v_b": ["1.jpg", "2.jpg"]}
    for video, names in videos.items():
        (frames / video).mkdir(parents=True)
        for name, data in zip(names, video_frames(len(video), len(names)), strict=True):
            (frames / video / name).write_bytes(data)
    rows = [hound_row("v_a", "<video>\nDescribe the video in detail.", "A red square slides left."),
            hound_row("v_b", "What moves?\n<video>", "The dot."),
            hound_row("v_gone", "<video>\nDescribe it.", "Nothing."),  # frames never extracted
            {"id": "x", "video": "v_a", "conversations": [{"from": "human", "value": "<video>\nHi"}]},
            hound_row("v_b", "Describe the clip.", "Two frames.")]  # no <video> in the first turn
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "video_caption_300k.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return sft / "video_caption_300k.jsonl", frames


def frames_of(folder, names):
    return [(folder / name).read_bytes() for name in names]


def convert_layout(inputs, root, out, layout, **options):
    conv.convert([str(path) for path in inputs], root, out, layout=LAYOUTS[layout], seed=None,
                 progress=False, **options)
    return sorted(read_samples(shard_urls(out), strict=True), key=lambda s: s.id)


def test_caption_retrieval_is_the_video_with_the_first_turn_to_the_second(tmp_path, hound):
    jsonl, frames = hound
    manifest_rows = convert_layout([jsonl], frames, tmp_path / "out", "vlm2vec-video-caption")
    first, second, third = manifest_rows
    assert first.modality == Modality.V2T and first.task == Task.RETRIEVAL
    assert first.source == "video_caption_300k" and first.id == "video_caption_300k-000-00000000"
    assert first.query.prompt == "<|image_1|>\nDescribe the video in detail."
    assert first.query.video == frames_of(frames / "v_a", ["c01_1.jpeg", "c01_2.jpeg", "c01_10.jpeg"])
    assert first.positive.prompt == "A red square slides left." and first.positive.video is None
    assert first.negatives == []
    assert second.query.prompt == "What moves?\n<|image_1|>"  # the token stays where the turn puts it
    assert second.query.video == frames_of(frames / "v_b", ["1.jpg", "2.jpg"])
    assert third.query.prompt == "Describe the clip." and third.query.video is not None


def test_video_rows_without_frames_or_turns_are_skipped_naming_the_field(tmp_path, hound):
    jsonl, frames = hound
    conv.convert([str(jsonl)], frames, tmp_path / "out", layout=LAYOUTS["vlm2vec-video-caption"],
                 seed=None, progress=False)
    report = read_manifest(tmp_path / "out")["extra"]["report"]
    assert report["rows"] == 5 and report["written"] == 3
    assert report["skipped"] == {"missing_video": 1, "bad_turns": 1}
    assert report["quirks"] == {"missing_image_token": 1}  # row 4: no <video>, its frames kept
    errors = "\n".join(report["errors"])
    assert f"{jsonl}: row 2: field 'video': frames folder {frames / 'v_gone'} is missing" in errors
    assert "row 3: field 'conversations': expected a list of at least two turns, found 1" in errors


def test_video_retrieval_is_the_caption_under_the_query_prompt_to_the_video(tmp_path, hound):
    jsonl, frames = hound
    first, *_ = convert_layout([jsonl], frames, tmp_path / "out", "vlm2vec-video-retrieval")
    assert first.modality == Modality.T2V and first.source == "video_caption_300k-video"
    assert first.query.prompt == ("Find a video that contains the following visual content: A red square "
                                  "slides left.")
    assert first.query.instruction == "Find a video that contains the following visual content:"
    assert first.query.text == "A red square slides left." and first.query.video is None
    assert first.positive.prompt == "Understand the content of the provided video: <|image_1|>"
    assert first.positive.video == frames_of(frames / "v_a", ["c01_1.jpeg", "c01_2.jpeg", "c01_10.jpeg"])
    assert first.positive.text is None


def test_video_qa_is_the_qa_prompt_and_question_with_the_video_to_the_answer(tmp_path, hound):
    jsonl, frames = hound
    qa = tmp_path / "video_240k_caption_15k.jsonl"
    qa.write_text(json.dumps(hound_row("v_b", "<video>\nWhat colour is the dot?", "Blue.")) + "\n")
    [sample] = convert_layout([qa], frames, tmp_path / "out", "vlm2vec-video-qa")
    assert sample.modality == Modality.VT2T and sample.task == Task.VQA and sample.source == "video_qa_240k"
    assert sample.query.prompt == ("Answer a question based on the content of a video. <|image_1|>\n"
                                   "What colour is the dot?")
    assert sample.query.instruction == "Answer a question based on the content of a video."
    assert sample.query.text == "What colour is the dot?"
    assert sample.query.video == frames_of(frames / "v_b", ["1.jpg", "2.jpg"])
    assert sample.positive.prompt == "Blue."


def test_a_v2_conversion_resumes_as_the_converter_does_and_another_layout_is_refused(tmp_path, hound):
    jsonl, frames = hound
    args = dict(inputs=[str(jsonl)], image_root=frames, out_dir=tmp_path / "out", progress=False)
    done = conv.convert(**args, layout=LAYOUTS["vlm2vec-video-qa"])
    assert done["extra"]["options"]["format"] == {"layout": "vlm2vec-video-qa", "parser": "llavahound_qa"}
    assert conv.convert(**args, layout=LAYOUTS["vlm2vec-video-qa"]) == done  # complete: left as it is
    with pytest.raises(OutputFolderError, match="vlm2vec-video-caption"):
        conv.convert(**args, layout=LAYOUTS["vlm2vec-video-caption"])


# ----------------------------------------------------------------------------- visual documents


def colpali_row(query, answer, color):
    """A row of vidore/colpali_train_set's parquet files: the page as {bytes, path} and the columns the
    reference drops."""
    return {"image": {"bytes": image_bytes(color, size=24), "path": None}, "image_filename": "p.png",
            "query": query, "answer": answer, "source": "docvqa", "options": None, "page": "1",
            "model": "human", "prompt": "Answer in one word.", "answer_type": "extractive"}


def write_colpali(folder) -> list[dict]:
    """vidore/colpali_train_set's parquet files in `folder`: a good row, one without answer, one without
    query (the test split is not read); returns the rows."""
    data = folder / "data"
    data.mkdir(parents=True)
    rows = [colpali_row("What is the total revenue?", "$5M", (10, 20, 30)),
            colpali_row("Who signed?", None, (40, 50, 60)), colpali_row(None, "x", (0, 0, 0))]
    pq.write_table(pa.Table.from_pylist(rows), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), data / "test-00000-of-00001.parquet")
    return rows


def test_colpali_rows_are_the_page_and_query_to_the_answer(tmp_path, capsys):
    rows = write_colpali(tmp_path / "colpali_train_set")
    out = tmp_path / "out"
    assert conv.main(["--input", str(tmp_path / "colpali_train_set"), "--out", str(out), "--format",
                      "vlm2vec-colpali", "--no-shuffle"]) == 0
    [sample] = read_samples(shard_urls(out), strict=True)
    assert sample.modality == Modality.IT2T and sample.task == Task.VQA
    assert sample.source == "colpali_train_set"
    assert sample.query.prompt == "<|image_1|> What is the total revenue?"
    assert sample.query.image == rows[0]["image"]["bytes"]
    assert sample.query.text == "What is the total revenue?"
    assert sample.positive.prompt == "$5M"
    manifest = read_manifest(out)
    report = manifest["extra"]["report"]
    assert report["rows"] == 3 and report["skipped"] == {"empty_positive": 1, "bad_type": 1}
    errors = "\n".join(report["errors"])
    assert "train-00000-of-00001.parquet: row 1: field 'answer': empty text" in errors
    assert "row 2: field 'query': expected a string, found NoneType" in errors
    # The columns the reference drops are left unread and listed, `answer_type` not taken for a misspelling.
    [unread] = manifest["extra"]["unread_columns"].values()
    assert unread == ["image_filename", "source", "options", "page", "model", "prompt", "answer_type"]
    assert "unread columns of" in capsys.readouterr().out


def save_visrag(folder) -> list[bytes]:
    """openbmb/VisRAG-Ret-Train-In-domain-data saved with `save_to_disk` in `folder`: a query of a source
    with a prompt, one of a source without; returns the pages."""
    datasets = pytest.importorskip("datasets")
    pages = [image_bytes((200, 0, 0), size=24), image_bytes((0, 200, 0), size=24)]
    data = datasets.Dataset.from_dict({
        "query": ["What is the due date?", "Where?"],
        "image": [{"bytes": page, "path": None} for page in pages],
        "source": ["MP-DocVQA", "Elsewhere"],
    }).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": data}).save_to_disk(str(folder))
    return pages


def test_visrag_rows_are_the_query_under_its_source_prompt_to_the_described_page(tmp_path):
    pages = save_visrag(tmp_path / "VisRAG-Ret-Train-In-domain-data")
    out = tmp_path / "out"
    known, unknown = convert_layout([tmp_path / "VisRAG-Ret-Train-In-domain-data"], None, out,
                                    "vlm2vec-visrag")
    assert known.modality == Modality.T2I and known.task == Task.RETRIEVAL
    assert known.source == "visrag-indomain"
    assert known.query.prompt == (
        "This query is related to retrieving a relevant page from a multi-page document, such as reports, "
        "invoices, or research papers. The retrieved document should contain text, tables, or structured "
        "information necessary to answer the query:  What is the due date? ")  # the prompt's own space and
    # the join's after it, the join's again at the end (the reference's f"{prompt} {query} {token}", no token)
    assert known.query.text == "What is the due date?" and known.query.image is None
    assert known.positive.prompt == "A page from a multi-page document with text or tables.  <|image_1|>"
    assert known.positive.instruction == "A page from a multi-page document with text or tables."
    assert known.positive.image == pages[0]
    # A source without prompts: the query as the reference writes it; the bare page gets the converter's
    # image instruction (the reference writes " <image token>"), counted.
    assert unknown.query.prompt == "Where? "
    assert unknown.positive.prompt == "<|image_1|>\nRepresent the given image.\n"
    report = read_manifest(out)["extra"]["report"]
    assert report["quirks"] == {"image_instruction_added": 1}


def test_pair_options_with_another_format_are_refused(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps(hound_row("v", "<video>", "a")) + "\n")
    assert conv.main(["--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--format",
                      "vlm2vec-video-qa", "--map", "query=question"]) == 2
    assert "--map: options of --format pairs, not of --format vlm2vec-video-qa" in capsys.readouterr().err


def test_a_file_without_the_layouts_columns_is_refused_before_the_output_is_claimed(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "1", "video": "v", "turns": []}) + "\n")
    with pytest.raises(ValueError, match=r"in.jsonl: missing column\(s\) \['conversations'\] of the "
                                         r"vlm2vec-video-qa format"):
        conv.convert([str(tmp_path / "in.jsonl")], tmp_path, tmp_path / "out",
                     layout=LAYOUTS["vlm2vec-video-qa"], progress=False)
    assert not (tmp_path / "out").exists()


def test_the_documented_conversions_run(tmp_path, hound):
    """The docs' five commands on the fixtures put where they name them: the LLaVA-Hound rows and frames
    under $VT, the two hub ids as local folders of the same names (an existing folder is read as one)."""
    rows, frames = hound
    sft = tmp_path / "vlm2vec_train/train_video_and_instruction/video_instruction/train/sft"
    sft.mkdir(parents=True)
    for name in ("video_caption_300k.jsonl", "video_240k_caption_15k.jsonl"):
        (sft / name).write_bytes(rows.read_bytes())
    frames.rename(tmp_path / "vlm2vec_train/train_video_and_instruction/train_300k")
    write_colpali(tmp_path / "vidore/colpali_train_set")
    save_visrag(tmp_path / "openbmb/VisRAG-Ret-Train-In-domain-data")
    commands = doc_commands("docs/data.md", "VLM2Vec-V2's video and visual-document training sets")
    run_doc_commands(commands, tmp_path)

    written = {out: read_manifest(tmp_path / "shards" / out)["num_samples"] for out in (
        "video_caption_300k", "video_caption_300k-video", "video_qa_240k", "colpali_train_set",
        "visrag-indomain")}
    assert written == {"video_caption_300k": 3, "video_caption_300k-video": 3, "video_qa_240k": 3,
                       "colpali_train_set": 1, "visrag-indomain": 2}
