"""XTD (multilingual text→image retrieval) read from XTD10's original files or from the MMEB row format.

XTD10 layout (any of these files may sit in `<root>` or one folder below, e.g. XTD10/, MIC/ for de and fr,
STAIR/ for jp):
    test_image_names.txt          one image file name a line (MSCOCO-2014)
    test_1kcaptions_<lang>.txt    line i describes image i; LF or CRLF, with or without a final newline
Row format (mmE5's copy, Haon-Chen/XTD-10): `<root>/<lang>/test-*.parquet` read as MMEB rows (gold at 0,
each query against the candidates its row lists); text→image only.
Images are looked up in the image sources (default: `<root>` and its .zip files), as written, then under
`images/` (the demo world), `train2014/` and `val2014/` (an MSCOCO folder).

From the original files, each language ranks its captions against all images (text→image, the paper's
direction) and each image against all captions (image→text), from the same embeddings: the captions
carry the text instruction, the images the image instruction. Candidates are the distinct images
(captions) in order of first appearance, so two identical captions are one candidate, not a tie.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mme5.backbones.base import IMAGE_INSTRUCTION
from mme5.eval.images import ImageStore
from mme5.eval.metrics import metrics_from_ranks
from mme5.eval.registry import once_each
from mme5.eval.retrieval import Ranked, RetrievalSet, SetBuilder
from mme5.eval.rows import add_rows, data_identity, parquet_files
from mme5.eval.run import Summary

PAPER_LANGUAGES = ("es", "it", "ko", "pl", "ru", "tr", "zh")  # mmE5's XTD protocol
TEXT_INSTRUCTION = "Find me an everyday image that matches the given caption:"
IMAGE_NAMES = "test_image_names.txt"
CAPTIONS = "test_1kcaptions_"
IMAGE_PREFIXES = ("", "images/", "train2014/", "val2014/")
KS = (1, 5, 10)


def read_lines(path: Path) -> list[str]:
    """Non-final-newline-safe lines of a UTF-8 text file (LF or CRLF), each stripped; another encoding is
    refused naming the file, the line and the byte (decoding it as something else would score mojibake)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}, line "
                         f"{line}); XTD caption files are UTF-8: convert it, e.g. `iconv -f <encoding> -t "
                         "UTF-8`") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def _one_level(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern)) + sorted(root.glob(f"*/{pattern}"))


def find_xtd10(root: Path) -> tuple[Path, dict[str, Path]] | None:
    """The image-name file and the caption file of each language, or None without an image-name file."""
    names = _one_level(root, IMAGE_NAMES)
    if not names:
        return None
    if len(names) > 1:
        raise ValueError(f"{root}: several {IMAGE_NAMES} files: {[str(p) for p in names]}")
    files: dict[str, Path] = {}
    for path in _one_level(root, f"{CAPTIONS}*.txt"):
        language = path.stem.removeprefix(CAPTIONS)
        if language in files:
            raise ValueError(f"{root}: two caption files for {language!r}: {files[language]}, {path}")
        files[language] = path
    return names[0], files


def read_xtd10(root: str | Path, languages: Sequence[str] | None = None
               ) -> tuple[list[str], dict[str, list[str]]]:
    """Image names and, per language, one caption per image (line i ↔ image i); counts are checked."""
    root = Path(root)
    found = find_xtd10(root)
    if found is None:
        raise FileNotFoundError(f"{root}: no {IMAGE_NAMES} (in the folder or one level below)")
    names_file, files = found
    names = read_lines(names_file)
    captions = {}
    for language in _select(languages, files, root):
        captions[language] = read_lines(files[language])
        if len(captions[language]) != len(names):
            raise ValueError(f"{files[language]}: {len(captions[language])} captions, but {names_file} lists "
                             f"{len(names)} images (line i must describe image i)")
    return names, captions


def _select(languages: Sequence[str] | None, available: dict[str, object], root: Path) -> list[str]:
    if not available:
        raise FileNotFoundError(f"{root}: no XTD language found ({CAPTIONS}<lang>.txt, or "
                                "<lang>/test-*.parquet)")
    languages = once_each(languages, "XTD language(s)")
    unknown = [code for code in languages or [] if code not in available]
    if unknown:
        raise ValueError(f"{root}: no XTD data for language(s) {unknown}; found {sorted(available)}")
    return list(languages) if languages else sorted(available)


def covers_paper_languages(scores: dict[str, Any]) -> bool:
    """XTD scores' "mean" is the paper's: every one of its languages was evaluated."""
    return set(PAPER_LANGUAGES) <= set(scores.get("paper_languages", []))


def paper_mean_label(scores: dict[str, Any]) -> str:
    """What XTD scores' "mean" is: over the paper's languages, or over those of them evaluated (N of 7)."""
    total = len(PAPER_LANGUAGES)
    return f"mean ({total} paper languages)" if covers_paper_languages(scores) else \
        f"mean over {len(scores.get('paper_languages', []))} of {total} paper languages"


def _distinct(rows: list[int]) -> tuple[list[int], list[int]]:
    """(distinct rows in order of first appearance, column of each input row among them)."""
    gallery = list(dict.fromkeys(rows))
    column = {row: j for j, row in enumerate(gallery)}
    return gallery, [column[row] for row in rows]


def _mean(metrics: list[dict[str, float]]) -> dict[str, float] | None:
    if not metrics:
        return None
    names = [k for k in metrics[0] if k != "queries"]
    return {k: sum(m[k] for m in metrics) / len(metrics) for k in names}


class XTD:
    """The XTD benchmark on a folder: one set holding every selected language (images encoded once).

    Args:
        root: folder in the XTD10 layout or the row format (see the module docstring).
        languages: language codes to evaluate (default: all present).
        images: image sources, folders or .zip files (default: `root` and its .zip files).
        max_queries: first N images and their captions (original files; a smaller gallery, so scores run
            higher than on the full set) or first N rows (row format).
        text_instruction: instruction of the caption queries.
        image_instruction: instruction of the image candidates.
    """

    name = "xtd"
    reference_ties = "argsort"  # mmE5's eval_multi.py: the gold among `np.argsort(scores)[-k:]`

    def __init__(self, root: str | Path, languages: Sequence[str] | None = None,
                 images: Sequence[str | Path] | None = None, max_queries: int | None = None,
                 text_instruction: str = TEXT_INSTRUCTION, image_instruction: str = IMAGE_INSTRUCTION):
        self.root = Path(root)
        self.xtd10 = find_xtd10(self.root)
        if self.xtd10 is not None:
            available: dict[str, object] = dict(self.xtd10[1])
        else:
            folders = [d for d in sorted(self.root.iterdir()) if d.is_dir()] if self.root.is_dir() else []
            available = {d.name: d for d in folders if any(d.glob("test-*.parquet"))}
        self.languages = _select(languages, available, self.root)
        # Read now, not when the set is built: a bad caption file fails before a model is loaded or run.
        self.texts = read_xtd10(self.root, self.languages) if self.xtd10 is not None else None
        sources = list(images) if images else [self.root, *sorted(self.root.glob("*.zip"))]
        self.images = ImageStore(sources, IMAGE_PREFIXES)
        self.max_queries = max_queries
        self.text_instruction, self.image_instruction = text_instruction, image_instruction

    def sets(self) -> Iterator[RetrievalSet]:
        builder = SetBuilder(self.name, self.images)
        if self.xtd10 is None:
            for language in self.languages:
                add_rows(builder, f"{language}_t2i", parquet_files(self.root / language), self.max_queries)
        else:
            self._add_xtd10(builder)
        yield builder.build()

    def _add_xtd10(self, builder: SetBuilder) -> None:
        names, captions = self.texts
        count = len(names) if self.max_queries is None else min(len(names), self.max_queries)
        where = self.xtd10[0].name
        images = [builder.item(self.image_instruction, None, name, f"{where} line {i + 1}")
                  for i, name in enumerate(names[:count])]
        image_gallery, image_gold = _distinct(images)
        for language, lines in captions.items():
            texts = [builder.item(self.text_instruction, line, None, "") for line in lines[:count]]
            text_gallery, text_gold = _distinct(texts)
            builder.rank(f"{language}_t2i", texts, torch.tensor(image_gallery).expand(count, -1), image_gold)
            builder.rank(f"{language}_i2t", images, torch.tensor(text_gallery).expand(count, -1), text_gold)

    def identity(self) -> dict[str, Any]:
        """The data evaluated: the selected languages, and the XTD10 text files or the row files of them
        (fingerprint)."""
        if self.xtd10 is not None:
            names, captions = self.xtd10
            files = [names, *(captions[language] for language in self.languages)]
        else:
            files = [f for language in self.languages for f in parquet_files(self.root / language)]
        return data_identity(self.root, files) | {"languages": list(self.languages)}

    def summarize(self, results: dict[str, Ranked]) -> Summary:
        """Recall@1/5/10 (P@1 = R@1) per language and direction; means over the paper's languages
        present ("mean") and over all languages evaluated ("mean_all")."""
        languages: dict[str, dict[str, dict[str, float]]] = {}
        for key, ranked in results.items():
            language, direction = key.rsplit("_", 1)
            languages.setdefault(language, {})[direction] = metrics_from_ranks(ranked.ranks, KS)
        paper = [code for code in PAPER_LANGUAGES if code in languages]
        groups = {"mean": paper, "mean_all": list(languages)}
        directions = sorted({d for entry in languages.values() for d in entry}, reverse=True)  # t2i first
        means = {group: {d: _mean([languages[code][d] for code in codes if d in languages[code]])
                         for d in directions} for group, codes in groups.items()}
        scalars = {}
        for name, per_direction in [*languages.items(), *means.items()]:
            for direction, metrics in per_direction.items():
                tag = name if direction == "t2i" else f"{name}_{direction}"  # t2i, the paper's, goes bare
                if metrics:
                    scalars |= {f"{tag}_r{k}": metrics[f"recall@{k}"] for k in KS}
        scores = {"format": "xtd10" if self.xtd10 else "rows", "paper_languages": paper,
                  "languages": languages, **means}
        return Summary(scores=scores, scalars=scalars)
