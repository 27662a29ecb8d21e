"""The model card (`README.md`) of an exported folder: Hub metadata in YAML front matter, how to load the
model three ways, its input format, the training recipe read from the checkpoint, and, given an evaluation's
`scores.json`, its MMEB / XTD table.

Everything in it comes from files: the checkpoint's recorded recipe, the training sources' manifests (for the
languages), the backbone's own card (for the licence) and the scores file. What is unknown is left out and
said so, never guessed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from mme5.checkpoint import trained_dims
from mme5.eval.registry import META_TASKS, SPLITS, mean_over_sets
from mme5.eval.xtd import paper_mean_label
from mme5.hub import card_licence, is_hub_id

PAPER = "https://arxiv.org/abs/2502.08468"
RECIPE_KEYS = ("lr", "temperature", "warmup", "schedule", "gradient_cache", "chunk_size", "dtype")
DATA_KEYS = ("batch_size", "num_negatives", "negative_padding")
# Training techniques beyond the paper's recipe (docs/training.md): listed when switched on.
TECHNIQUE_KEYS = ("mask_false_negatives", "hardness_mode", "hardness_strength", "false_negative_threshold",
                  "false_negative_margin", "task_temperatures", "temperature_groups")
HUB_LANGUAGE = {"jp": "ja"}  # XTD10 (and the demo world) write Japanese as "jp"; the Hub wants ISO 639-1


def model_card(*, name: str, family: str, backbone: str, recipe: dict[str, Any], instructions: dict[str, str],
               input_format: dict[str, Any], adapter_only: bool, scores: dict[str, Any] | None = None,
               backbone_folder: Path | None = None, servable: bool = False) -> str:
    """The card's text. `recipe`: the checkpoint's hyper-parameters, data settings and step (as
    `LoadedModel.recipe` holds them); `scores`: an evaluation's `scores.json`, if any; `servable`: the folder
    has a chat template for pooling servers."""
    hparams = recipe.get("hyper_parameters") or {}
    data = recipe.get("datamodule_hyper_parameters") or {}
    sources = [source.get("path") for source in data.get("sources") or [] if isinstance(source, dict)]
    languages = _languages(sources)
    licence = card_licence(backbone_folder) if backbone_folder else None
    dims = trained_dims(recipe)
    meta = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "feature-extraction",
        "tags": ["mme5", "sentence-transformers", "multimodal-embedding", "image-text-retrieval", family,
                 *(["peft", "lora"] if adapter_only else []), *(["matryoshka"] if dims else [])],
    }
    if is_hub_id(backbone):
        meta["base_model"] = backbone
    if languages:
        meta["language"] = languages
    if licence:
        meta["license"] = licence
    datasets = [s for s in sources if s and is_hub_id(s)]
    if datasets:
        meta["datasets"] = datasets
    lines = ["---", *_yaml(meta), "---", "", f"# {name}", "",
             f"A multimodal, multilingual embedding model fine-tuned from `{backbone}` ({family}) with "
             f"mme5 the way the mmE5 paper ({PAPER}) does: last-token pooling, "
             "L2-normalised vectors, compared by cosine similarity.", ""]
    lines += _usage(name, adapter_only, backbone, instructions)
    lines += _input_format(input_format, instructions)
    if dims:
        lines += _matryoshka(name, dims)
    if servable:
        lines += ["## Serve", "", "The folder's chat template renders the input format (system message = "
                  "instruction; user message = text and image), so a pooling server applying it embeds as "
                  "above, e.g.:", "", "```bash",
                  f"vllm serve {name} --runner pooling --convert embed  # LAST pooling, normalised", "```",
                  "", "(Not run by the project's tests: no GPU there.)", ""]
    lines += _training(hparams, data, recipe, sources, languages)
    lines += _scores(scores) if scores else ["## Evaluation", "", "No scores were given to the export "
                                             "(`python -m mme5.export --scores DIR`).", ""]
    if not licence:
        lines += ["## Licence", "", f"Not recorded: the licence of `{backbone}` applies; check its card.", ""]
    return "\n".join(lines)


def _yaml(meta: dict[str, Any]) -> list[str]:
    """Flat YAML of strings and lists of strings (JSON-quoted strings are valid YAML)."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {json.dumps(str(v))}" for v in value)]
        else:
            lines.append(f"{key}: {json.dumps(str(value))}")
    return lines


def _usage(name: str, adapter_only: bool, backbone: str, instructions: dict[str, str]) -> list[str]:
    load = "the base model plus this adapter" if adapter_only else "this folder"
    lines = ["## Use", "", f"Three ways to load {load} (`pip install 'mme5[integrations]'` for the second):",
             "",
             "```python", "from mme5 import Embedder", "",
             f'model = Embedder.from_pretrained("{name}")',
             'q = model.encode_query(["a red cube on the grass"])',
             'd = model.encode_document([{"image": "cube.png"}, "a red cube"])',
             "scores = model.similarity(q, d)", "```", "", "```python",
             "from PIL import Image", "from sentence_transformers import SentenceTransformer", "",
             f'model = SentenceTransformer("{name}", trust_remote_code=True)  # the module is mme5\'s',
             'q = model.encode_query(["a red cube on the grass"])',
             'd = model.encode_document([Image.open("cube.png"), "a red cube"])', "```", ""]
    if adapter_only:
        lines += ["```python", "from peft import PeftModel",
                  "from transformers import AutoModelForImageTextToText", "",
                  f'base = AutoModelForImageTextToText.from_pretrained("{backbone}")',
                  f'model = PeftModel.from_pretrained(base, "{name}").merge_and_unload()', "```", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForImageTextToText", "",
                  f'model = AutoModelForImageTextToText.from_pretrained("{name}")  # adapters merged', "```",
                  ""]
    lines += ["With transformers alone, feed the prompt of the input format below and take the final hidden "
              "state of the last token, L2-normalised.", ""]
    return lines


def _matryoshka(name: str, dims: list[int]) -> list[str]:
    return ["## Smaller embeddings", "",
            f"Trained as a Matryoshka model: the first {', '.join(map(str, dims))} dimensions are embeddings "
            "too. Keep the first D and L2-normalise again:", "", "```python",
            f'model = Embedder.from_pretrained("{name}", truncate_dim={min(dims)})',
            f'model = SentenceTransformer("{name}", trust_remote_code=True, truncate_dim={min(dims)})',
            "q = model.encode_query([...], normalize_embeddings=True)  # unit vectors; cosine needs no flag",
            "```", "", f"Evaluate at a size with `python -m mme5.eval --dim {min(dims)} ...`.", ""]


def _input_format(input_format: dict[str, Any], instructions: dict[str, str]) -> list[str]:
    rows = [f"| {key} | `{json.dumps(value)}` |" for key, value in input_format.items()]
    return ["## Input format", "",
            "Each side is written in the published mmE5/MMEB format (`<|image_1|>\\n` + instruction + text + "
            "`\\n`; a bare text as is), the placeholder replaced by the family's image token:", "",
            "| Setting | Value |", "|---|---|", *rows,
            f"| query instruction | `{json.dumps(instructions.get('query', ''))}` |",
            f"| document instruction | `{json.dumps(instructions.get('target', ''))}` |", ""]


def _training(hparams: dict[str, Any], data: dict[str, Any], recipe: dict[str, Any], sources: list[str],
              languages: list[str]) -> list[str]:
    if not hparams:
        return ["## Training", "", "Not recorded (exported from a folder without a training recipe).", ""]
    lora = hparams.get("lora") or {}
    rows = [(key, hparams[key]) for key in RECIPE_KEYS if key in hparams]
    rows += [(key, hparams[key]) for key in TECHNIQUE_KEYS if hparams.get(key)]
    rows += [(key, data[key]) for key in DATA_KEYS if key in data]
    rows += [(f"lora.{key}", lora[key]) for key in ("r", "alpha", "dropout", "use_dora") if key in lora]
    rows += [("global_step", recipe.get("global_step"))]
    if hparams.get("init_from"):  # a second stage: its steps are counted from that start
        rows += [("init_from", hparams["init_from"])]
    lines = ["## Training", "", "| Setting | Value |", "|---|---|",
             *(f"| {key} | {value} |" for key, value in rows), ""]
    if sources:
        lines += ["Training data: " + ", ".join(f"`{s}`" for s in sources) + ".", ""]
    if languages:
        lines += [f"Languages in the training data ({len(languages)}): {', '.join(languages)}.", ""]
    return lines


def _scores(scores: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation", ""]
    mmeb = scores.get("mmeb")
    if mmeb:
        label, mean = mean_over_sets(mmeb)  # "Overall" only when every set was evaluated
        header = [*META_TASKS, *SPLITS, label]
        values = [*(mmeb.get(k) for k in (*META_TASKS, *SPLITS)), mean]
        metric, ties = mmeb.get("metric", "precision@1"), mmeb.get("ties", "pessimistic")
        lines += [f"MMEB ({metric}, %, ties {ties}):", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                  "| " + " | ".join(map(_cell, values)) + " |", ""]
    xtd = scores.get("xtd")
    if xtd:
        languages = list(xtd.get("languages", {}))
        values = [xtd["languages"][code].get("t2i", {}).get("recall@10") for code in languages]
        paper = (xtd.get("mean") or {}).get("t2i", {}).get("recall@10")
        lines += ["XTD text→image Recall@10 (%):", "",
                  "| " + " | ".join([*languages, paper_mean_label(xtd)]) + " |",
                  "|" + "---|" * (len(languages) + 1),
                  "| " + " | ".join(_cell(v) for v in [*values, paper]) + " |", ""]
    return lines


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}"


def _languages(sources: list[str]) -> list[str]:
    """Languages counted in the training sources' manifests (those still on disk), most samples first."""
    counts: Counter[str] = Counter()
    for source in sources:
        if not source or not Path(source).is_dir():
            continue
        for manifest in sorted(Path(source).glob("**/manifest.json")):
            counts.update((json.loads(manifest.read_text()).get("counts") or {}).get("language") or {})
    return [HUB_LANGUAGE.get(language, language) for language, _ in counts.most_common()]
