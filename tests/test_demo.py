import itertools
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mme5.data.schema import Modality, Task
from mme5.data.shards import read_manifest, read_samples, shard_urls
from mme5.demo import language
from mme5.demo.mmeb import META_TASKS, PARQUET, SUBSETS, build_subset
from mme5.demo.render import crop, half_box, render
from mme5.demo.scenes import ATTRIBUTES, SPLITS, VALUES, Scene, differing_attributes, scenes_in, split_of
from mme5.demo.tasks import generate_training
from mme5.demo.world import WorldConfig, build_world, main
from mme5.demo.xtd import IMAGE_FOLDER, IMAGE_NAMES, build_xtd, caption_file
from mme5.files import OWNER_RECORD

SMALL = WorldConfig(seed=0, train_samples=80, eval_queries=6, eval_candidates=5, xtd_images=12, image_size=32)
IMAGE_TOKEN = "<|image_1|>\n"  # the published placeholder and its newline (mme5.md §3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, SMALL, progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    """The world's files (not the command's owner record, which holds times)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != OWNER_RECORD}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world, tmp_path):
    # A fresh process: no render cache shared with the fixture, and another str-hash salt.
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(SMALL).items() if k != "languages"]
    subprocess.run([sys.executable, "-m", "mme5.demo", "--out", str(tmp_path / "again"), *flags],
                   check=True, capture_output=True)
    assert _files(tmp_path / "again") == _files(world)
    build_world(tmp_path / "other", WorldConfig(**{**vars(SMALL), "seed": 1}), progress=False)
    other = _files(tmp_path / "other")
    for name in ("train/shard-000000.tar", f"mmeb/Scene_t2i/{PARQUET}", "xtd/test_1kcaptions_en.txt"):
        assert other[name] != _files(world)[name], name


def test_training_shards_read_back_and_cover_tasks_modalities_languages(world):
    manifest = read_manifest(world / "train")
    samples = list(read_samples(shard_urls(world / "train"), strict=True))
    assert len(samples) == manifest["num_samples"] == SMALL.train_samples
    assert set(manifest["counts"]["task"]) == set(Task)
    assert set(manifest["counts"]["modality"]) == set(Modality)
    assert len(manifest["counts"]["language"]) >= 8
    negatives = {len(s.negatives) for s in samples}
    assert SMALL.max_negatives in negatives and min(negatives) < SMALL.max_negatives
    assert all(s.query.instruction for s in samples)  # instructions travel apart from the content


def test_hard_negatives_differ_from_the_positive_in_exactly_one_attribute():
    examples = list(generate_training(3, 130, ["en", "ru", "zh"], image_size=32))
    changed = set()
    for ex in examples:
        positive = ex.sample.positive
        for scene, side in zip(ex.negative_scenes, ex.sample.negatives, strict=True):
            (attribute,) = differing_attributes(ex.positive_scene, scene)
            changed.add(attribute)
            assert (side.text, side.image, side.video) != (positive.text, positive.image, positive.video), \
                (ex.sample.id, attribute)
    assert changed == set(ATTRIBUTES)


def test_train_and_eval_scenes_are_disjoint():
    train = {s for ex in generate_training(0, 200, ["en"], image_size=32)
             for s in (ex.query_scene, ex.positive_scene, *ex.negative_scenes)}
    assert {split_of(s) for s in train} == {"train"}
    for spec in SUBSETS:
        shown = {s for q in build_subset(spec, 0, 6, 5, 32).queries for s in q.scenes}
        assert {split_of(s) for s in shown} == {spec.split}, spec.name
        assert not shown & train
    assert {split_of(scene) for _, scene, _ in build_xtd(0, 20, 32)} == {"eval"}
    assert sum(len(scenes_in(split)) for split in SPLITS) == len(set().union(*map(scenes_in, SPLITS)))


def test_mmeb_layout_matches_mmeb_eval(world):
    root = world / "mmeb"
    registry = json.loads((root / "subsets.json").read_text())
    assert set(registry) == {p.parent.name for p in root.glob(f"*/{PARQUET}")} == {s.name for s in SUBSETS}
    for meta_task in META_TASKS:
        assert sum(entry["meta_task"] == meta_task for entry in registry.values()) >= 2, meta_task
    assert {entry["split"] for entry in registry.values()} == {"IND", "OOD"}
    expected = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                          ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    for name, entry in registry.items():
        table = pq.read_table(root / name / PARQUET)
        assert table.schema.remove_metadata() == expected, name
        assert table.num_rows == entry["num_queries"] == SMALL.eval_queries
        for row in table.to_pylist():
            assert entry["instruction"] in row["qry_text"]
            # the published format (mme5.md §3): placeholder + newline first on image sides, and every
            # instruction-bearing side ends with a newline
            assert row["qry_text"].startswith(IMAGE_TOKEN) == bool(row["qry_img_path"])
            assert row["qry_text"].endswith("\n") and not row["qry_text"].endswith("\n\n")
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) >= 2
            assert len(set(zip(row["tgt_text"], row["tgt_img_path"], strict=True))) == len(row["tgt_text"])
            for text, path in zip(row["tgt_text"], row["tgt_img_path"], strict=True):
                assert text.startswith(IMAGE_TOKEN) == bool(path)
                assert text.endswith("\n") == bool(path)  # image targets carry an instruction
            for path in [row["qry_img_path"], *row["tgt_img_path"]]:
                assert not path or (path.startswith(f"eval_images/{name}/") and (root / path).is_file())


def test_mmeb_gold_candidate_is_first(world):
    expected = {
        "Shape": lambda s: language.label("shape", s.shape, "en"),
        "Count": lambda s: language.label("count", s.count, "en"),
        "PositionVQA": lambda s: language.label("position", s.position, "en"),
        "Scene_i2t": lambda s: language.caption(s, "en"),
    }
    for spec in (s for s in SUBSETS if s.name in expected):
        built = build_subset(spec, SMALL.seed, SMALL.eval_queries, SMALL.eval_candidates, SMALL.image_size)
        rows = pq.read_table(world / "mmeb" / spec.name / PARQUET).to_pylist()
        for query, row in zip(built.queries, rows, strict=True):  # scenes[0]: the query's scene
            assert row["tgt_text"][0] == expected[spec.name](query.scenes[0]), spec.name


def test_xtd_layout(world):
    root = world / "xtd"
    names = (root / IMAGE_NAMES).read_text().splitlines()
    assert len(names) == len(set(names)) == SMALL.xtd_images
    assert sorted(p.name for p in (root / IMAGE_FOLDER).iterdir()) == sorted(names)
    endings = {}
    for code in SMALL.languages:
        text = (root / caption_file(code)).read_text(encoding="utf-8")
        lines = text.splitlines()
        assert len(lines) == len(set(lines)) == len(names), code
        endings[code] = text.endswith("\n")
    assert endings["en"] and not endings["zh"]
    corpus = set((world / "corpus.txt").read_text(encoding="utf-8").splitlines())
    assert set((root / caption_file("ko")).read_text(encoding="utf-8").splitlines()) <= corpus


@pytest.mark.parametrize("code", sorted(language.LANGUAGES))
def test_every_language_tells_all_scenes_and_values_apart(code):
    scenes = [s for split in SPLITS for s in scenes_in(split)]
    assert len({language.caption(s, code) for s in scenes}) == len(scenes)
    for attribute, values in VALUES.items():
        labels = [language.label(attribute, v, code) for v in values]
        assert len(set(labels)) == len(labels) and all(labels), (code, attribute)
        if attribute in language.EDITABLE:
            assert "{" not in language.edit(attribute, values[0], code)


def test_agreement_in_inflected_languages():
    two_red_stars = Scene("star", "red", "small", 2, "left", "white")
    assert language.phrase(two_red_stars, "es") == "dos estrellas rojas pequeñas"
    assert language.phrase(two_red_stars, "ru") == "две маленьких красных звезды"
    one_large_circle = Scene("circle", "red", "large", 1, "left", "white")
    assert language.phrase(one_large_circle, "de") == "ein großer roter Kreis"
    assert language.label("colour", "red", "de") == "rot"


def test_grounding_crop_is_the_named_half_of_the_composite():
    scene = Scene("star", "red", "large", 2, "top", "grey")
    distractor = Scene("circle", "blue", "small", 3, "left", "grey")
    box = tuple(round(v) for v in half_box("top", 32))
    assert render(scene, 7, 32, distractor).crop(box).tobytes() == render(scene, 7, 32).crop(box).tobytes()
    assert crop(scene, 7, 32).size == (32, 32)


def test_cli_writes_a_world_and_rejects_unknown_languages(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--train-samples", "13", "--eval-queries", "2", "--eval-candidates", "3",
            "--xtd-images", "3", "--image-size", "16", "--languages", "en,pl"]
    main(args)
    assert "train: 13 samples" in capsys.readouterr().out
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["languages"] == ["en", "pl"] and world["sizes"]["image_size"] == 16
    with pytest.raises(SystemExit):
        main(args[:-1] + ["en,xx"])


def test_cli_rerun_says_the_world_is_there_other_settings_are_refused_unless_overwrite(tmp_path, capsys,
                                                                                       monkeypatch):
    """`make demo` runs the command again: the same settings leave the world as it is; another seed (a
    `make demo SEED=1` on an old folder) is refused, not mixed in; --overwrite swaps a new world in."""
    out = tmp_path / "world"
    args = ["--out", str(out), "--train-samples", "13", "--eval-queries", "2", "--eval-candidates", "3",
            "--xtd-images", "3", "--image-size", "16", "--languages", "en,pl"]
    assert main(args) == 0
    first, stamp = _files(out), (out / "world.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "already holds the demo world" in capsys.readouterr().out
    assert (out / "world.json").stat().st_mtime_ns == stamp and _files(out) == first
    assert main([*args, "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert "seed: 0 (recorded) → 1 (now)" in error and "--overwrite" in error and _files(out) == first
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "world.json").read_text())["seed"] == 1 and _files(out) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # swapped in, nothing beside it

    import mme5.demo.world as world_module

    def stopped(folder, config):
        (folder / "world.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "corpus.txt").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(world_module, "build_world", stopped)
    with pytest.raises(KeyboardInterrupt):
        main([*args[:1], str(tmp_path / "cut"), *args[2:]])
    monkeypatch.undo()
    assert main([*args[:1], str(tmp_path / "cut"), *args[2:]]) == 0  # a stopped build is built again
    assert _files(tmp_path / "cut") == first


def test_unseen_pairs_cover_every_shape_and_colour():
    pairs = {(s.shape, s.colour) for s in scenes_in("new_pairs")}
    seen = {(s.shape, s.colour) for s in scenes_in("train")}
    assert not pairs & seen
    assert set(itertools.product(VALUES["shape"], VALUES["colour"])) == pairs | seen
