import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import image_bytes

from mme5.eval.encode import encode
from mme5.eval.images import MissingImageError
from mme5.eval.mmeb import MMEB
from mme5.eval.registry import META_TASKS, mean_over_sets
from mme5.eval.retrieval import rank
from mme5.eval.run import evaluate

SCHEMA = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                    ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
REDS = {f"img{i}.png": 50 * (i % 3) for i in range(6)}  # 6 images, 3 colours: image candidates tie


def vector(text, red):
    """Fake embedding with small integers (exact ties between different items)."""
    words = len((text or "").split())
    return [words % 3, (text or " ")[-1] in "aeiou", -1 if red is None else red / 50, 1.0]


def fake_embed(items):
    """Embeds what the model is fed: MMEB items are published strings (`Item.prompt`)."""
    return torch.tensor([vector(it.prompt, None if it.image is None else it.image.getpixel((0, 0))[0])
                         for it in items], dtype=torch.float32)


IDENTIFY = "<|image_1|>\nIdentify the object shown in the image"
ROWS = {
    "VOC2007": [  # classification: image query, text labels; lists of different lengths
        {"qry_text": IDENTIFY, "qry_img_path": "VOC2007/img0.png",
         "tgt_text": ["cat", "a dog", "bird one two", "a cow"], "tgt_img_path": ["", "", "", ""]},
        {"qry_text": IDENTIFY, "qry_img_path": "VOC2007/img1.png",
         "tgt_text": ["a dog", "cat"], "tgt_img_path": ["", ""]},
        {"qry_text": IDENTIFY, "qry_img_path": "VOC2007/img2.png",
         "tgt_text": ["bird one two", "a cow", "cat", "horse", "a sheep"], "tgt_img_path": [""] * 5},
    ],
    "MSCOCO_t2i": [  # text query, image candidates; the same image may appear in several lists
        {"qry_text": f"Find me an everyday image that matches the given caption: caption {i} a",
         "qry_img_path": "",
         "tgt_text": ["<|image_1|>\nRepresent the given image."] * (3 + i % 3),
         "tgt_img_path": [f"MSCOCO_t2i/img{(i + j) % 6}.png" for j in range(3 + i % 3)]}
        for i in range(5)
    ],
}


def write_subsets(root, rows=ROWS, zip_images=True, prefixed_paths=False):
    """MMEB-eval as published: one parquet per subset; images in a zip under eval_images/ (or a folder)."""
    root.mkdir(parents=True, exist_ok=True)
    archive = zipfile.ZipFile(root / "images.zip", "w") if zip_images else None
    for subset, subset_rows in rows.items():
        if prefixed_paths:
            subset_rows = [r | {"qry_img_path": r["qry_img_path"] and "eval_images/" + r["qry_img_path"],
                                "tgt_img_path": [p and "eval_images/" + p for p in r["tgt_img_path"]]}
                           for r in subset_rows]
        (root / subset).mkdir()
        table = pa.Table.from_pylist(subset_rows, schema=SCHEMA)
        pq.write_table(table, root / subset / "test-00000-of-00001.parquet")
        for name, red in REDS.items():
            member = f"eval_images/{subset}/{name}"
            if archive:
                archive.writestr(member, image_bytes((red, 0, 0)))
            else:
                (root / member).parent.mkdir(parents=True, exist_ok=True)
                (root / member).write_bytes(image_bytes((red, 0, 0)))
    if archive:
        archive.close()
    return root


def brute_force_ranks(rows, ties_against_gold=True):
    """1 + the number of OTHER candidates scoring at least the gold (index 0), straight from the rows."""
    def vec(text, path):
        return torch.tensor(vector(text, REDS[path.rsplit("/", 1)[-1]] if path else None))

    ranks = []
    for row in rows:
        query = vec(row["qry_text"], row["qry_img_path"])
        scores = [float(query @ vec(t, p)) for t, p in zip(row["tgt_text"], row["tgt_img_path"], strict=True)]
        ranks.append(1 + sum(s >= scores[0] if ties_against_gold else s > scores[0] for s in scores[1:]))
    return ranks


@pytest.mark.parametrize("zip_images, prefixed_paths", [(True, False), (False, True)])
def test_scores_through_the_reader_match_brute_force(tmp_path, zip_images, prefixed_paths):
    root = write_subsets(tmp_path / "mmeb", zip_images=zip_images, prefixed_paths=prefixed_paths)
    benchmark = MMEB(root, subsets=["VOC2007", "MSCOCO_t2i"])
    for subset in benchmark.sets():
        ranking = subset.rankings[subset.name]
        assert ranking.candidates.shape[1] == max(len(r["tgt_text"]) for r in ROWS[subset.name])
        ranked = rank(ranking, encode(subset.items, fake_embed, batch_size=2))
        expected = brute_force_ranks(ROWS[subset.name])
        assert ranked.ranks.tolist() == expected
        assert any(r > 1 for r in expected) and any(r == 1 for r in expected)  # the fixture has both
    summary, _ = evaluate(benchmark, fake_embed)
    for subset, rows in ROWS.items():
        hits = [r == 1 for r in brute_force_ranks(rows)]
        assert summary.scores["datasets"][subset]["precision@1"] == pytest.approx(100 * sum(hits) / len(hits))


def test_ties_count_against_the_gold_and_items_are_encoded_once(tmp_path):
    root = write_subsets(tmp_path / "mmeb")
    subset = next(MMEB(root, subsets=["MSCOCO_t2i"]).sets())
    # 5 distinct queries + 6 distinct images, though the lists name 5 × 3..5 candidates
    assert len(subset.items) == 11
    ranked = rank(subset.rankings["MSCOCO_t2i"], encode(subset.items, fake_embed))
    # img0 and img3 have the same colour: a query whose gold is img0 ties with img3 when both are listed
    assert ranked.ranks.tolist() == brute_force_ranks(ROWS["MSCOCO_t2i"])
    assert ranked.ranks.tolist() != brute_force_ranks(ROWS["MSCOCO_t2i"], ties_against_gold=False)
    # the reference's argmax (gold first): the tie is a hit, and the scores say which rule made them
    summary, results = evaluate(MMEB(root, subsets=["MSCOCO_t2i"]), fake_embed, ties="reference")
    argmax = brute_force_ranks(ROWS["MSCOCO_t2i"], ties_against_gold=False)
    assert results["MSCOCO_t2i"].ranks.tolist() == argmax
    assert summary.scores["ties"] == "reference"


def test_summary_has_every_aggregate_and_a_partial_run_no_overall(tmp_path):
    """2 of MMEB's 36 sets: the mean over them is labelled as such; an Overall would claim all 36."""
    root = write_subsets(tmp_path / "mmeb")
    summary, results = evaluate(MMEB(root, subsets=["VOC2007", "MSCOCO_t2i"]), fake_embed)
    scores = summary.scores
    assert {*META_TASKS, "IND", "OOD", "mean_over_sets"} <= set(scores) and "Overall" not in scores
    per_set = [scores["datasets"][s]["precision@1"] for s in ("VOC2007", "MSCOCO_t2i")]
    assert mean_over_sets(scores) == ("mean over 2 of 36 sets", pytest.approx(sum(per_set) / 2))
    assert scores["Classification"] == pytest.approx(per_set[0]) and scores["VQA"] is None
    assert summary.scalars["mean_over_sets"] == scores["mean_over_sets"] and "VQA" not in summary.scalars
    assert "Overall" not in summary.scalars
    assert results["VOC2007"].top.shape == (3, 5)


def test_missing_image_error_names_file_subset_row_and_field(tmp_path):
    rows = {"VOC2007": [dict(ROWS["VOC2007"][0]), dict(ROWS["VOC2007"][1])]}
    rows["VOC2007"][1]["tgt_img_path"] = ["", "VOC2007/gone.png"]
    root = write_subsets(tmp_path / "mmeb", rows)
    with pytest.raises(MissingImageError) as error:
        list(MMEB(root, subsets=["VOC2007"]).sets())
    message = str(error.value)
    assert "VOC2007/gone.png" in message and "row 1" in message and "tgt_img_path[1]" in message
    assert "test-00000-of-00001.parquet" in message and "images.zip!eval_images/VOC2007/gone.png" in message


def test_registry_selection_and_errors(tmp_path):
    root = write_subsets(tmp_path / "mmeb")
    with pytest.raises(FileNotFoundError, match="no folder for data set.*ImageNet-1K"):
        MMEB(root)  # the 36 MMEB sets by default: most are absent here
    with pytest.raises(ValueError, match="unknown MMEB data set.*CIFAR-100"):
        MMEB(root, subsets=["CIFAR-100"])
    (root / "subsets.json").write_text(json.dumps({"VOC2007": {"meta_task": "VQA", "split": "OOD"}}))
    benchmark = MMEB(root)  # a registry in the folder replaces the 36
    assert [s.name for s in benchmark.registry] == ["VOC2007"] and benchmark.registry[0].meta_task == "VQA"


def test_max_queries_takes_the_first_rows(tmp_path):
    root = write_subsets(tmp_path / "mmeb")
    subset = next(MMEB(root, subsets=["MSCOCO_t2i"], max_queries=2).sets())
    ranked = rank(subset.rankings["MSCOCO_t2i"], encode(subset.items, fake_embed))
    assert ranked.ranks.tolist() == brute_force_ranks(ROWS["MSCOCO_t2i"][:2])


def test_malformed_row_is_reported(tmp_path):
    rows = {"VOC2007": [dict(ROWS["VOC2007"][0], tgt_img_path=["", ""])]}
    root = write_subsets(tmp_path / "mmeb", rows)
    with pytest.raises(ValueError, match="row 0: tgt_text has 4 entries and tgt_img_path 2"):
        list(MMEB(root, subsets=["VOC2007"]).sets())
