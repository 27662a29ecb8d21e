"""mteb (2.x) for a model trained here: an encoder wrapper with its ModelMeta, and XTD as local mteb tasks.

    python -m mme5.integrations.mteb --model exported/x --xtd data/xtd --out runs/mteb   # local XTD
    python -m mme5.integrations.mteb --model exported/x --task MSCOCOT2IRetrieval --out runs/mteb

    import mteb
    from mme5.integrations.mteb import mteb_model
    results = mteb.evaluate(mteb_model("exported/x"), tasks=mteb.get_tasks(tasks=[...]))

The encoder turns mteb's batches ("text", "image" or both) into the project's items, the instruction being
the one mteb resolves for the task and the side (`AbsEncoder.get_instruction`: the task's prompt, else
mteb's default), and embeds them with `Encoder.embed`, the evaluation's own path. `xtd_tasks` turns the XTD
benchmark as `mme5.eval` reads it (the same items, the same instructions) into mteb retrieval tasks, one per
language and direction, so mteb's recall@k on them is `mme5.eval`'s.

mteb's own model loader wants its image extra (torchvision) for image models; `mteb_model` builds the
encoder itself and attaches the ModelMeta, which mteb accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from mme5.backbones import Item
from mme5.embedder import Embedder
from mme5.eval.images import load_image
from mme5.eval.retrieval import ItemSpec, RetrievalSet
from mme5.eval.xtd import XTD
from mme5.images import to_rgb
from mme5.settings import command_parser

# mteb names languages by ISO 639-3 and script; XTD10's codes are ISO 639-1 (and "jp").
XTD_LANGUAGES = {"de": "deu-Latn", "en": "eng-Latn", "es": "spa-Latn", "fr": "fra-Latn", "it": "ita-Latn",
                 "jp": "jpn-Jpan", "ko": "kor-Hang", "pl": "pol-Latn", "ru": "rus-Cyrl", "tr": "tur-Latn",
                 "zh": "zho-Hans"}
DIRECTIONS = {"t2i": ("text", "image"), "i2t": ("image", "text")}


class MME5Encoder(AbsEncoder):
    """An `Embedder` as an mteb encoder (text, image and text+image inputs)."""

    def __init__(self, embedder: Embedder, batch_size: int = 32):
        self.embedder = embedder
        self.batch_size = batch_size

    def encode(self, inputs: Any, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        instruction = self.get_instruction(task_metadata, prompt_type)
        items = []
        for batch in inputs:
            texts, images = batch.get("text"), batch.get("image")
            for i in range(len(batch["id"])):
                image = images[i] if images is not None else None
                # mteb hands images over in their stored mode (RGBA stays RGBA)
                items.append(Item(instruction, texts[i] if texts is not None else None,
                                  to_rgb(image) if image is not None else None))
        embeddings = self.embedder.encoder.embed(items, kwargs.get("batch_size") or self.batch_size,
                                                 progress=bool(kwargs.get("show_progress_bar")))
        return embeddings.numpy()


def model_meta(embedder: Embedder, name: str | None = None) -> ModelMeta:
    """A ModelMeta describing a loaded model (name: "namespace/name"; default "mme5/<folder>")."""
    description = embedder.description
    encoder = embedder.encoder
    return ModelMeta(
        loader=None, name=name or f"mme5/{description.get('name', 'model')}",
        revision=description.get("fingerprint"), release_date=None, languages=None,
        n_parameters=sum(p.numel() for p in encoder.parameters()), memory_usage_mb=None,
        max_tokens=encoder.adapter.max_length, embed_dim=encoder.dim, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name=ScoringFunction.COSINE, use_instructions=True, training_datasets=None,
        modalities=["text", "image"])


def mteb_model(model: str | Path | Embedder, name: str | None = None, batch_size: int = 32,
               **load: Any) -> MME5Encoder:
    """The mteb encoder of a model folder, checkpoint or hub id (or a loaded `Embedder`), its ModelMeta
    attached. `load`: `Embedder.from_pretrained` arguments (device, dtype, max_length)."""
    embedder = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, **load)
    encoder = MME5Encoder(embedder, batch_size)
    encoder.mteb_model_meta = model_meta(embedder, name)
    return encoder


class LocalRetrievalTask(AbsTaskRetrieval):
    """A retrieval task whose data is in memory (no hub): one split "test", one subset "default". Made by
    `local_task` (mteb wants the metadata on the class)."""

    def __init__(self, split: RetrievalSplitData):
        self._split = split
        super().__init__()

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if not self.data_loaded:
            self.dataset = {"default": {"test": self._split}}
            self.data_loaded = True


def local_task(metadata: TaskMetadata, split: RetrievalSplitData) -> LocalRetrievalTask:
    """An mteb task of its own class, named after the task."""
    task_class = type(metadata.name.replace("-", "_"), (LocalRetrievalTask,), {"metadata": metadata})
    return task_class(split)


def xtd_tasks(root: str | Path, languages: Sequence[str] | None = None, max_queries: int | None = None,
              directions: Sequence[str] = ("t2i", "i2t")) -> list[LocalRetrievalTask]:
    """XTD in the XTD10 file layout, as `mme5.eval` reads it, as mteb tasks `XTD-<lang>-<direction>`."""
    benchmark = XTD(root, languages, max_queries=max_queries)
    if benchmark.xtd10 is None:
        raise ValueError(f"{root}: mteb tasks are made from the XTD10 files (test_image_names.txt and "
                         "test_1kcaptions_<lang>.txt); the row format has per-query candidate lists")
    (retrieval_set,) = benchmark.sets()
    instructions = {"text": benchmark.text_instruction, "image": benchmark.image_instruction}
    tasks = []
    for key in retrieval_set.rankings:
        language, direction = key.rsplit("_", 1)
        if direction in directions:
            query, document = DIRECTIONS[direction]
            prompt = {"query": instructions[query], "document": instructions[document]}
            metadata = _metadata(f"XTD-{language}-{direction}", direction,
                                 XTD_LANGUAGES.get(language, language), prompt)
            tasks.append(local_task(metadata, split_data(retrieval_set, key)))
    return tasks


def split_data(retrieval_set: RetrievalSet, key: str) -> RetrievalSplitData:
    """One ranking of a set as mteb data: its queries, the shared gallery as the corpus, the gold as qrels."""
    ranking = retrieval_set.rankings[key]
    gallery = ranking.candidates[0]
    if not bool((ranking.candidates == gallery).all()):
        raise ValueError(f"{retrieval_set.name}/{key}: queries have their own candidate lists; only a shared "
                         "gallery becomes an mteb corpus")
    items = retrieval_set.items
    query_rows, gallery_rows = ranking.queries.tolist(), gallery.tolist()
    queries = _dataset([f"q{i}" for i in range(len(query_rows))], [items[row] for row in query_rows])
    corpus = _dataset([f"d{row}" for row in gallery_rows], [items[row] for row in gallery_rows])
    qrels = {f"q{i}": {f"d{gallery_rows[gold]}": 1} for i, gold in enumerate(ranking.gold.tolist())}
    return RetrievalSplitData(queries=queries, corpus=corpus, relevant_docs=qrels, top_ranked=None)


def _dataset(ids: list[str], items: list[ItemSpec]) -> Dataset:
    columns: dict[str, list[Any]] = {"id": ids}
    if any(item.prompt is not None for item in items):
        raise ValueError("items with a verbatim published prompt cannot be split into mteb's text and "
                         "instruction")
    if all(item.text is not None for item in items):
        columns["text"] = [item.text for item in items]
    if all(item.image is not None for item in items):
        columns["image"] = [load_image(item.image) for item in items]
    if len(columns) == 1:
        raise ValueError("mteb columns hold one kind of input: all items need a text, or all an image")
    return Dataset.from_dict(columns)


def _metadata(name: str, category: str, language: str, prompt: dict[str, str]) -> TaskMetadata:
    return TaskMetadata(
        name=name, description=f"{name}: XTD read by mme5 from local files.", reference=None,
        dataset={"path": "local/xtd", "revision": "local"}, type="Any2AnyRetrieval", category=category,
        modalities=["text", "image"], eval_splits=["test"], eval_langs=[language], main_score="recall_at_10",
        date=None, domains=["Encyclopaedic"], task_subtypes=["Image Text Retrieval"], license="not specified",
        annotations_creators="human-annotated", dialect=[], sample_creation="found", bibtex_citation="",
        prompt=prompt)


def main(argv: list[str] | None = None) -> None:
    import mteb

    parser = command_parser(prog="python -m mme5.integrations.mteb",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported folder, .ckpt, backbone folder or hub id")
    parser.add_argument("--xtd", type=Path, help="XTD10 folder: evaluate it as local mteb tasks")
    parser.add_argument("--languages", nargs="+", help="XTD languages (default: all present)")
    parser.add_argument("--max-queries", type=int, help="XTD: first N images and their captions")
    parser.add_argument("--task", action="append", default=[], help="an mteb task name (needs its data)")
    parser.add_argument("--out", required=True, type=Path, help="mteb result folder")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the weights')")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if not args.xtd and not args.task:
        parser.error("give --xtd and/or --task")
    tasks = [*(xtd_tasks(args.xtd, args.languages, args.max_queries) if args.xtd else []),
             *(mteb.get_tasks(tasks=args.task) if args.task else [])]
    model = mteb_model(args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    results = mteb.evaluate(model, tasks=tasks, cache=mteb.ResultCache(args.out), overwrite_strategy="always",
                            encode_kwargs={"batch_size": args.batch_size, "show_progress_bar": True},
                            co2_tracker=False)
    for result in results.task_results:
        print(f"{result.task_name}: {result.get_score():.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
