from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import image_bytes

from mme5.eval.__main__ import main as evaluate_command
from mme5.eval.encode import encode
from mme5.eval.images import MissingImageError
from mme5.eval.retrieval import rank
from mme5.eval.run import evaluate
from mme5.eval.xtd import PAPER_LANGUAGES, TEXT_INSTRUCTION, XTD, paper_mean_label, read_lines, read_xtd10

REAL_XTD10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "xtd10"
NAMES = [f"COCO_train2014_{i:012d}.jpg" for i in range(6)]
CAPTIONS = {  # line i describes image i; "es" repeats a caption (two images share it)
    "en": ["a red cat", "two dogs", "a big tree", "one small bird", "a car", "blue sky here"],
    "es": ["un gato rojo", "dos perros", "un gato rojo", "un pajaro", "un coche", "cielo azul aqui"],
    "de": ["eine rote katze", "zwei hunde", "ein baum", "ein vogel", "ein auto", "blauer himmel"],
    "jp": ["赤い猫", "二匹の犬", "大きな木", "小鳥", "車", "青い空"],
}


def vector(text, red):
    words = len((text or "").split())
    return [words % 3, len(text or "") % 4, -1 if red is None else red / 60, 1.0]


def fake_embed(items):
    """Fake embedding of instruction + text and the image's colour."""
    return torch.tensor([vector(it.instruction + (it.text or ""), it.image and it.image.getpixel((0, 0))[0])
                         for it in items], dtype=torch.float32)


def constant_embed(items):
    """A model that ignores its input."""
    return torch.ones(len(items), 4)


def red(i):
    return 60 * (i % 4)  # images 0 and 4 share a colour: a tie


def write_xtd10(root):
    """The original layout: XTD10/ files (CRLF and no final newline for es), MIC/ (de), STAIR/ (jp)."""
    for folder in ("XTD10", "MIC", "STAIR", "images"):
        (root / folder).mkdir(parents=True)
    (root / "XTD10" / "test_image_names.txt").write_text("".join(n + "\n" for n in NAMES))
    (root / "XTD10" / "test_1kcaptions_en.txt").write_text("\n".join(CAPTIONS["en"]) + "\n")
    (root / "XTD10" / "test_1kcaptions_es.txt").write_bytes("\r\n".join(CAPTIONS["es"]).encode())
    (root / "MIC" / "test_1kcaptions_de.txt").write_text("\n".join(CAPTIONS["de"]))
    (root / "STAIR" / "test_1kcaptions_jp.txt").write_text("\n".join(CAPTIONS["jp"]) + "\n", encoding="utf-8")
    for i, name in enumerate(NAMES):
        (root / "images" / name).write_bytes(image_bytes((red(i), 0, 0)))
    return root


def brute_force(language, direction, count=6, instruction=TEXT_INSTRUCTION):
    """Ranks over all images (t2i) or all distinct captions (i2t), ties counted against the gold."""
    texts = CAPTIONS[language][:count]
    text_vecs = {t: torch.tensor(vector(instruction + t, None)) for t in texts}
    image_vecs = [torch.tensor(vector("Represent the given image.", red(i))) for i in range(count)]
    ranks = []
    if direction == "t2i":
        for i, text in enumerate(texts):
            scores = [float(text_vecs[text] @ v) for v in image_vecs]
            ranks.append(1 + sum(s >= scores[i] for j, s in enumerate(scores) if j != i))
    else:
        distinct = list(dict.fromkeys(texts))
        for i, text in enumerate(texts):
            scores = {t: float(image_vecs[i] @ text_vecs[t]) for t in distinct}
            ranks.append(1 + sum(s >= scores[text] for t, s in scores.items() if t != text))
    return ranks


def test_reads_the_original_layout_with_its_quirks(tmp_path):
    names, captions = read_xtd10(write_xtd10(tmp_path))
    assert names == NAMES and captions == {k: CAPTIONS[k] for k in sorted(CAPTIONS)}


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_rankings_match_brute_force(tmp_path, direction):
    benchmark = XTD(write_xtd10(tmp_path))
    xtd = next(benchmark.sets())
    assert len(xtd.items) == len(NAMES) + sum(len(set(c)) for c in CAPTIONS.values())  # images once for all
    embeddings = encode(xtd.items, fake_embed)
    for language in CAPTIONS:
        assert rank(xtd.rankings[f"{language}_{direction}"], embeddings).ranks.tolist() == \
            brute_force(language, direction)
    assert xtd.rankings["es_i2t"].candidates.shape == (6, 5)  # the repeated caption is one candidate


def test_reference_ties_are_mme5s_argsort_and_the_default_is_pessimistic(tmp_path):
    """A model giving every item one embedding ties all images. `--ties reference` ranks the gold as the
    reference's `np.argsort(scores)[-k:]` does (not MMEB's argmax, which would give ranks 1..6); the
    default still counts every tie against the gold."""
    root = write_xtd10(tmp_path)
    order = np.argsort(np.ones(len(NAMES), dtype=np.float32)).tolist()
    argsort = [len(NAMES) - order.index(gold) for gold in range(len(NAMES))]
    _, results = evaluate(XTD(root, languages=["en"]), constant_embed, ties="reference")
    assert results["en_t2i"].ranks.tolist() == argsort != list(range(1, len(NAMES) + 1))
    _, results = evaluate(XTD(root, languages=["en"]), constant_embed)
    assert results["en_t2i"].ranks.tolist() == [len(NAMES)] * len(NAMES)


def test_summary_means_and_scalars(tmp_path):
    summary, _ = evaluate(XTD(write_xtd10(tmp_path), languages=["en", "es", "jp"]), fake_embed)
    scores, scalars = summary.scores, summary.scalars
    assert scores["paper_languages"] == ["es"] and set(scores["languages"]) == {"en", "es", "jp"}
    hits = [r <= 5 for r in brute_force("es", "t2i")]
    assert scalars["es_r5"] == pytest.approx(100 * sum(hits) / len(hits)) == scores["mean"]["t2i"]["recall@5"]
    all_r10 = [scores["languages"][code]["t2i"]["recall@10"] for code in ("en", "es", "jp")]
    assert scalars["mean_all_r10"] == pytest.approx(sum(all_r10) / 3)
    assert {"mean_r1", "mean_i2t_r10", "jp_i2t_r1", "en_r10"} <= set(scalars)
    assert scores["languages"]["es"]["t2i"]["precision@1"] == scores["languages"]["es"]["t2i"]["recall@1"]


def test_max_queries_uses_the_first_images_and_captions(tmp_path):
    xtd = next(XTD(write_xtd10(tmp_path), languages=["en"], max_queries=4).sets())
    ranked = rank(xtd.rankings["en_t2i"], encode(xtd.items, fake_embed))
    assert xtd.rankings["en_t2i"].candidates.shape == (4, 4)
    assert ranked.ranks.tolist() == brute_force("en", "t2i", count=4)


def test_caption_count_mismatch_names_the_file(tmp_path):
    root = write_xtd10(tmp_path)
    (root / "MIC" / "test_1kcaptions_de.txt").write_text("\n".join(CAPTIONS["de"][:5]))
    with pytest.raises(ValueError, match=r"MIC/test_1kcaptions_de.txt: 5 captions, but .* lists 6 images"):
        read_xtd10(root)
    read_xtd10(root, languages=["en"])  # other languages still read


def test_a_caption_file_in_another_encoding_is_refused_naming_it(tmp_path, capsys):
    """STAIR captions saved as Shift-JIS (a common copy): an error naming the file, line and byte, not a
    bare UnicodeDecodeError nor mojibake captions."""
    root = write_xtd10(tmp_path)
    (root / "STAIR" / "test_1kcaptions_jp.txt").write_bytes("\n".join(CAPTIONS["jp"]).encode("shift_jis"))
    with pytest.raises(ValueError, match=r"STAIR/test_1kcaptions_jp.txt: not UTF-8 \(byte 0x[0-9a-f]{2} at "
                                         r"offset 0, line 1\).*iconv"):
        read_xtd10(root)
    assert read_xtd10(root, languages=["de"])[1]["de"] == CAPTIONS["de"]  # other languages still read
    with pytest.raises(SystemExit) as exit_:  # the command: before any model is loaded or --out claimed
        evaluate_command(["--model", str(root), "--benchmark", "xtd", "--xtd", str(root), "--out",
                          str(tmp_path / "eval")])
    assert exit_.value.code == 2 and not (tmp_path / "eval").exists()
    assert "test_1kcaptions_jp.txt: not UTF-8" in capsys.readouterr().err


def test_repeated_languages_count_once_and_the_paper_mean_says_over_how_many(tmp_path):
    with pytest.warns(UserWarning, match=r"XTD language\(s\) \['es'\] listed more than once"):
        benchmark = XTD(write_xtd10(tmp_path), languages=["es", "en", "es"])
    assert benchmark.languages == ["es", "en"] and benchmark.identity()["languages"] == ["es", "en"]
    summary, _ = evaluate(benchmark, fake_embed)
    assert paper_mean_label(summary.scores) == "mean over 1 of 7 paper languages"
    assert paper_mean_label({"paper_languages": list(PAPER_LANGUAGES)}) == "mean (7 paper languages)"


def test_missing_image_names_the_list_line(tmp_path):
    root = write_xtd10(tmp_path)
    (root / "images" / NAMES[2]).unlink()
    with pytest.raises(MissingImageError, match=rf"names.txt line 3: image '{NAMES[2]}' not found"):
        list(XTD(root).sets())


def test_unknown_language_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"language\(s\) \['ja'\]; found \['de', 'en', 'es', 'jp'\]"):
        XTD(write_xtd10(tmp_path), languages=["ja"])


def test_row_format_per_language(tmp_path):
    """mmE5's copy: <lang>/test-*.parquet rows, gold at 0, candidates as listed."""
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(NAMES):
        (images / name).write_bytes(image_bytes((red(i), 0, 0)))
    for language in ("es", "zh"):
        rows = [{"qry_text": f"{TEXT_INSTRUCTION} {c}", "qry_img_path": "",
                 "tgt_text": ["<|image_1|>\nRepresent the given image."] * 6,
                 "tgt_img_path": [NAMES[(i + j) % 6] for j in range(6)]}
                for i, c in enumerate(CAPTIONS["es"])]
        (tmp_path / language).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / language / "test-00000-of-00001.parquet")
    benchmark = XTD(tmp_path)
    assert benchmark.languages == ["es", "zh"]
    xtd = next(benchmark.sets())
    assert set(xtd.rankings) == {"es_t2i", "zh_t2i"} and len(xtd.items) == 6 + 5  # images shared
    ranked = rank(xtd.rankings["es_t2i"], encode(xtd.items, fake_embed))
    # each row lists every image, gold first; the row's text differs from instruction + caption by a space
    assert ranked.ranks.tolist() == brute_force("es", "t2i", instruction=TEXT_INSTRUCTION + " ")
    summary, _ = evaluate(benchmark, fake_embed)
    assert summary.scores["format"] == "rows" and summary.scores["paper_languages"] == ["es", "zh"]


@pytest.mark.skipif(not REAL_XTD10.is_dir(), reason="the real XTD10 caption files are not here")
def test_real_xtd10_caption_files():
    names, captions = read_xtd10(REAL_XTD10)
    assert len(names) == 1000 and names[0] == "COCO_train2014_000000061844.jpg"
    assert set(captions) == {"en", "de", "fr", "jp", *PAPER_LANGUAGES}
    assert all(len(lines) == 1000 and all(lines) for lines in captions.values())
    assert captions["jp"][0] == "黒いユニフォームのランナーがホームに帰ってきた"
    assert not any("\r" in line for lines in captions.values() for line in lines)
    last = read_lines(REAL_XTD10 / "XTD10" / "test_1kcaptions_es.txt")[-1]  # the file has no final newline
    assert last == captions["es"][-1] and last


def test_demo_world_layout_reads(tmp_path):
    from mme5.demo.xtd import build_xtd, write_xtd

    write_xtd(tmp_path, build_xtd(seed=0, num_images=5, image_size=16), ["en", "ko"])
    xtd = next(XTD(tmp_path).sets())
    assert set(xtd.rankings) == {"en_t2i", "en_i2t", "ko_t2i", "ko_i2t"}
    assert all(item.image is None or "/images/" in item.image.path for item in xtd.items)
