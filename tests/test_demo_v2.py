"""The demo world's clips and pages: training samples, and the MMEB-V2-layout evaluation set read by the real
readers and scored by the real command (`python -m mme5.eval --data <world>`)."""

import io
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import mme5.eval.__main__ as command
from mme5.data.schema import Modality, Task
from mme5.demo import language
from mme5.demo.mmeb_v2 import CLIPS_PER_VIDEO, registry
from mme5.demo.render import Painter, clip, render
from mme5.demo.scenes import Scene, differing_attributes, split_of
from mme5.demo.tasks import generate_training
from mme5.demo.world import WorldConfig, build_world
from mme5.eval.mmeb_v2.benchmark import MMEBV2
from mme5.eval.mmeb_v2.registry import REGISTRY_FILE, load_v2_registry
from mme5.eval.mmeb_v2.visdoc import read_qrels

SMALL = WorldConfig(seed=0, train_samples=0, eval_queries=2, eval_candidates=4, xtd_images=3, v2_queries=5,
                    image_size=32, page_size=48, languages=("en", "es"))
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, SMALL, progress=False)
    return out


def centroid(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """(x, y) mean of the pixels that are not the background."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - background).sum(axis=2) > 60)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("position", list(DIRECTIONS))
def test_a_clip_moves_its_group_into_the_half_its_position_names(position):
    scene = Scene("square", "red", "large", 2, position, "white")
    frames = clip(scene, seed=3, size=64, frames=4)
    centres = [centroid(frame, (255, 255, 255)) for frame in frames]
    steps = [np.dot(b - a, DIRECTIONS[position]) for a, b in zip(centres, centres[1:], strict=False)]
    assert all(step > 4 for step in steps), steps  # a steady move in the named direction, by pixels
    assert frames[-1].tobytes() == render(scene, 3, 64).tobytes()  # it ends as the scene's still picture


def test_training_holds_clips_and_pages_in_every_video_modality():
    examples = list(generate_training(0, 220, ["en", "ru"], image_size=32, frames=3, page_size=40))
    videos = [ex for ex in examples if ex.sample.modality.value.count("V")]
    assert {ex.sample.modality for ex in videos} == {Modality.V2T, Modality.VT2T, Modality.T2V, Modality.T2VT}
    for ex in videos:
        for side in (ex.sample.query, ex.sample.positive, *ex.sample.negatives):
            if side.video is not None:
                assert [Image.open(io.BytesIO(f)).size for f in side.video] == [(32, 32)] * 3
        for scene, negative in zip(ex.negative_scenes, ex.sample.negatives, strict=True):
            assert len(differing_attributes(ex.positive_scene, scene)) == 1
            assert negative != ex.sample.positive
    motion = [ex for ex in videos if ex.sample.task == Task.CLASSIFICATION]
    assert motion
    for ex in motion:
        assert ex.sample.positive.text == language.direction(ex.positive_scene.position, ex.sample.language)
    pages = [ex for ex in examples if ex.sample.positive.instruction.startswith("Understand the content of "
                                                                              "the provided document")]
    assert pages and all(Image.open(io.BytesIO(ex.sample.positive.image)).size == (40, 40) for ex in pages)
    assert {split_of(s) for ex in examples for s in (ex.query_scene, ex.positive_scene)} == {"train"}


def test_every_language_tells_the_directions_apart():
    for code in language.LANGUAGES:
        scenes = [Scene("star", "blue", "small", 1, p, "grey") for p in DIRECTIONS]
        assert len({language.direction(s.position, code) for s in scenes}) == 4, code
        assert len({language.motion_caption(s, code) for s in scenes}) == 4, code


def test_pages_differ_by_scene_and_repeat_by_seed():
    a, b = Scene("star", "blue", "small", 1, "left", "grey"), Scene("star", "red", "small", 1, "left", "grey")
    painter = Painter(32, "salt", per_scene=True)
    assert painter.page(a, 64) == Painter(32, "salt", per_scene=True).page(a, 64) != painter.page(b, 64)


def test_the_v2_sets_are_read_by_the_published_readers(world):
    root = world / "mmeb-v2"
    assert load_v2_registry(root / REGISTRY_FILE) == registry()
    benchmark = MMEBV2(root)
    assert [s.name for s in benchmark.benchmark] == [s.name for s in registry()]
    sets = {data.name: data for data in benchmark.sets()}
    q = SMALL.v2_queries
    motion = sets["Motion"].rankings["Motion"]  # global over the label set
    labels = [sets["Motion"].items[j].text for j in motion.candidates[0].tolist()]
    assert sorted(labels) == sorted(language.MOTION["en"]["direction"].values())
    retrieval = sets["MotionRetrieval"].rankings["MotionRetrieval"]  # caption -> every clip
    assert retrieval.candidates.shape == (q, q) and retrieval.gold.tolist() == list(range(q))
    moment = sets["MotionMoment"].rankings["MotionMoment"]  # local: the video's clips, one positive
    assert moment.candidates.shape == (q, CLIPS_PER_VIDEO)
    query = sets["MotionMoment"].items[moment.queries[0]]
    assert len(query.video) == CLIPS_PER_VIDEO * SMALL.video_frames  # the whole video
    pages = sets["ScenePages"].rankings["ScenePages"]
    assert sorted(set(pages.relevance.flatten().tolist())) == [0.0, 1.0, 2.0]  # graded
    assert (pages.relevance.max(dim=1).values == 2).all()
    for name in ("Shape", "AttributeVQA", "Scene_t2i", "Grounding"):
        assert sets[name].rankings[name].candidates.shape[0] == q, name


def test_every_page_query_has_its_scenes_page_at_grade_2_and_a_near_one_at_grade_1(world):
    folder = world / "mmeb-v2" / "visdoc-tasks" / "ScenePages"
    qrels = read_qrels(folder, "test", {f"q{i:05d}" for i in range(SMALL.v2_queries)})
    assert len(qrels) == SMALL.v2_queries
    assert all(sorted(grades.values()) == [1, 2] for grades in qrels.values())


def brute_ndcg_linear(ranked: list[int], grades: dict[int, float], k: int = 5) -> float:
    """Linear NDCG@k from its definition: gain = grade, IDCG over every labelled document."""
    dcg = sum(grades.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(grades.values(), reverse=True)[:k]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def test_the_command_scores_the_demo_world_v2_sets(world, tiny, tmp_path):
    command.main(["--model", str(tiny("qwen2_vl")), "--data", str(world), "--benchmark", "mmeb-v2",
                  "--device", "cpu", "--out", str(tmp_path), "--top-k", "100"])
    v2 = json.loads((tmp_path / "scores.json").read_text())["mmeb-v2"]
    sets = v2["datasets"]
    assert v2["sets"]["in_benchmark"] == len(registry()) == len(sets)
    for name, entry in sets.items():
        lines = [json.loads(line) for line in (tmp_path / "predictions" / "mmeb-v2" / f"{name}.jsonl").open()]
        if entry["modality"] != "visdoc":
            assert entry["score"] == pytest.approx(100 * np.mean([line["gold_rank"] == 1 for line in lines]))
    data = next(d for d in MMEBV2(world / "mmeb-v2", ["ScenePages"]).sets())
    relevance = data.rankings["ScenePages"].relevance
    lines = [json.loads(line) for line in (tmp_path / "predictions" / "mmeb-v2" / "ScenePages.jsonl").open()]
    brute = [brute_ndcg_linear(line["top"], {j: g for j, g in enumerate(row.tolist()) if g > 0})
             for line, row in zip(lines, relevance, strict=True)]
    assert sets["ScenePages"]["score"] == pytest.approx(100 * np.mean(brute))
    for modality in ("image", "video", "visdoc"):
        mine = [e["score"] for e in sets.values() if e["modality"] == modality]
        assert v2[modality] == pytest.approx(np.mean(mine))
    assert v2["Overall"] == pytest.approx(np.mean([e["score"] for e in sets.values()]))
    header = (tmp_path / "results.md").read_text().split("## MMEB-V2")[1]
    assert "| Image |" in header.replace("Image GD | Image |", "| Image |") and "| VisDoc | All |" in header
    # the submission file is for the 78 published sets, not a root's own
    assert not v2["sets"]["published"] and not (tmp_path / "leaderboard.json").exists()


def test_a_registry_reading_as_no_published_set_names_file_set_and_field(tmp_path):
    entry = {"modality": "video", "meta_task": "Video CLS", "eval_type": "global", "query_instruction": "q",
             "target_instruction": "", "annotations": {"repo": "me/x"}, "reads_as": "ViDoRe_docvqa"}
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"Mine": entry}))
    with pytest.raises(ValueError, match=r"sets\.json: data set 'Mine', field reads_as: 'ViDoRe_docvqa' is "
                                         r"not one of the 78 published video sets"):
        MMEBV2(tmp_path)


def test_a_registry_file_with_a_byte_order_mark_reads_and_one_not_utf8_or_not_an_object_is_named(world,
                                                                                             tmp_path):
    path = tmp_path / REGISTRY_FILE
    text = (world / "mmeb-v2" / REGISTRY_FILE).read_text(encoding="utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Notepad saves it
    assert load_v2_registry(path) == registry()
    path.write_bytes(text.replace('"Motion"', '"Moti\u00f3n"').encode("latin-1"))
    with pytest.raises(ValueError, match=r"sets\.json: cannot read the MMEB-V2 registry: not UTF-8 "
                                         r"\(byte \d+, 0xf3\); save it as UTF-8"):
        load_v2_registry(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"sets\.json: the MMEB-V2 registry must be a JSON object"):
        load_v2_registry(path)


def test_a_model_that_reads_no_video_scores_the_image_and_page_sets_or_refuses_video_asked_for(
        world, tiny, tmp_path, capsys):
    model = str(tiny("mllama"))
    command.main(["--model", model, "--data", str(world), "--benchmark", "mmeb-v2", "--device", "cpu",
                  "--out", str(tmp_path / "all")])
    v2 = json.loads((tmp_path / "all" / "scores.json").read_text())["mmeb-v2"]
    assert {e["modality"] for e in v2["datasets"].values()} == {"image", "visdoc"} and v2["video"] is None
    assert "reads no video: MMEB-V2's 3 video set(s) are left out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        command.main(["--model", model, "--data", str(world), "--benchmark", "mmeb-v2", "--device", "cpu",
                      "--modalities", "video", "--out", str(tmp_path / "video")])
    assert stop.value.code == 2
    assert "families that do: llava_onevision, qwen2_5_vl, qwen2_vl" in capsys.readouterr().err


@pytest.mark.parametrize(("subset", "spoiled", "data", "named"), [
    ("Motion", "video-tasks/frames/video_cls/Motion/clip00001/frame_0002.png", b"not a png",
     r"Motion, .*/Motion/data/test-00000-of-00001\.parquet row 1, field video_id: "
     r"\S*/Motion/clip00001/frame_0002\.png: not a readable image"),
    ("Motion", "video-tasks/frames/video_cls/Motion/clip00002", None,
     r"Motion, .*parquet row 2, field video_id: frames folder '\S*/Motion/clip00002' not found"),
    ("ScenePages", "visdoc-tasks/ScenePages/page00003.png", b"\x89PNG cut",
     r"ScenePages, corpus-id 'page00003': \S*/ScenePages/page00003\.png: not a readable image"),
])
def test_bad_media_met_during_the_run_stop_it_naming_set_file_row_and_field(world, tiny, tmp_path, capsys,
                                                                            subset, spoiled, data, named):
    """Found only after the model loaded (frames and pages are read set by set, decoded batch by batch): a
    clear error and exit 2, not a traceback."""
    root = shutil.copytree(world / "mmeb-v2", tmp_path / "v2")
    if data is None:
        shutil.rmtree(root / spoiled)
    else:
        (root / spoiled).write_bytes(data)
    with pytest.raises(SystemExit) as stop:
        command.main(["--model", str(tiny("qwen2_vl")), "--benchmark", "mmeb-v2", "--mmeb-v2", str(root),
                      "--subsets", subset, "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert stop.value.code == 2
    assert re.search(rf"^error: {named}", capsys.readouterr().err, re.MULTILINE)


def test_the_data_identity_covers_the_annotation_rows_of_image_and_video_sets(world, tmp_path):
    """A rerun into the same --out on rewritten rows is refused (the identity differs), as for visdoc sets."""
    root = shutil.copytree(world / "mmeb-v2", tmp_path / "v2")

    def fingerprints():
        return {name: MMEBV2(root, subsets=[name]).identity()["fingerprint"] for name in ("Motion", "Shape")}
    before = fingerprints()
    rows = next((root / "annotations" / "mme5-demo" / "Motion").rglob("*.parquet"))
    os.utime(rows, ns=(rows.stat().st_atime_ns, rows.stat().st_mtime_ns + 10**9))  # rewritten since
    after = fingerprints()
    assert after["Motion"] != before["Motion"] and after["Shape"] == before["Shape"]


@pytest.mark.parametrize(("removed", "named"), [("annotations/mme5-demo/MotionRetrieval", "MotionRetrieval"),
                                                ("video-tasks/frames/video_cls", "Motion"),
                                                ("image-tasks", "Shape', 'AttributeVQA")])
def test_a_set_whose_rows_or_media_were_not_fetched_is_named_before_the_model_loads(world, tmp_path, removed,
                                                                                   named):
    root = shutil.copytree(world / "mmeb-v2", tmp_path / "v2")
    shutil.rmtree(root / removed)
    with pytest.raises(FileNotFoundError, match=rf"data set\(s\) \['{named}'.*\] \(e\.g\. \S*/{removed}\b"
                                                r".*\); fetch them with `python -m mme5\.data\.fetch"):
        MMEBV2(root)
