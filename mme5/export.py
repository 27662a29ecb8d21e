"""Turns a training checkpoint into a model folder that the field's tools load:

    python -m mme5.export --ckpt runs/x/last.ckpt --out exported/x [--dtype bfloat16] [--scores eval/x]
        [--adapter-only] [--push-to-hub you/name]

The folder holds
- the weights: a transformers model folder with LoRA/DoRA merged into the base weights (needs neither PEFT nor
  this repo's Lightning code), or with `--adapter-only` a standard PEFT adapter folder (`adapter_config.json`
  + safetensors) for `PeftModel.from_pretrained(base, DIR)`;
- the processor, and `mme5_embedding.json` (pooling, normalisation, input format, instructions, source);
- sentence-transformers files (`modules.json`, `config_sentence_transformers.json`): `SentenceTransformer(DIR,
  trust_remote_code=True)` embeds as `mme5.Embedder.from_pretrained(DIR)` does, the instructions being its
  named prompts "query" and "document";
- for Qwen2-VL and LLaVA, a chat template rendering the project's prompt (`mme5.integrations.vllm`);
- a model card `README.md` (Hub metadata, usage, input format, training recipe, scores from `--scores`).

`--push-to-hub` uploads the folder with huggingface_hub after writing it (token from `HF_TOKEN` or `hf auth
login`); a failed upload leaves the folder whole and says how to retry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mme5.backbones import DTYPES
from mme5.checkpoint import load_encoder, save_model_folder
from mme5.hub import is_hub_id
from mme5.integrations import write_sentence_transformers_files
from mme5.integrations.vllm import chat_template
from mme5.model_card import model_card

CHAT_TEMPLATE_FAMILIES = ("qwen2_vl", "llava")  # what current vLLM serves as pooling models


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None, max_length: int | None = None,
           backbone: str | None = None, query_instruction: str = "", target_instruction: str = "",
           trust_checkpoint: bool = False, adapter_only: bool = False, scores: str | Path | None = None,
           name: str | None = None) -> Path:
    """Write the model folder `out` from checkpoint `ckpt`; returns it.

    dtype: weights' dtype of a merged export (None: the dtype the checkpoint was trained in).
    max_length: text tokens per item (None: the training's input format's).
    backbone: folder to rebuild the encoder from, when the checkpoint's recorded one has moved.
    adapter_only: write the trained adapters as a PEFT folder instead of merged weights.
    scores: an evaluation's output folder (or its scores.json) for the model card's table.
    name: what the card calls the model (default: the folder's name; the hub repository when pushing).
    trust_checkpoint: see `mme5.checkpoint.load_encoder`.
    """
    ckpt, out = Path(ckpt), Path(out)
    if ckpt.suffix != ".ckpt":
        raise ValueError(f"{ckpt}: expected an EmbeddingModule checkpoint (.ckpt)")
    scores_data = _read_scores(Path(scores)) if scores else None  # a bad path fails before the slow part
    loaded = load_encoder(ckpt, dtype=dtype, max_length=max_length, backbone=backbone,
                          trust_checkpoint=trust_checkpoint)
    encoder = loaded.encoder
    hparams = loaded.recipe.get("hyper_parameters") or {}
    recorded_backbone = str(backbone or hparams.get("backbone"))
    # A hub id stays an id (people load the base from the hub); a local folder is written as found here.
    base = recorded_backbone if is_hub_id(recorded_backbone) else loaded.description["backbone"]
    instructions = {"query": query_instruction, "target": target_instruction}
    source = {"checkpoint": str(ckpt.resolve()), "global_step": loaded.recipe.get("global_step"),
              "backbone": base, "lora": _plain(hparams.get("lora"))}
    if adapter_only:
        if not encoder.has_adapters:
            raise ValueError(f"{ckpt}: trained without adapters (full fine-tuning); export merged weights")
        for config in encoder.model.peft_config.values():
            config.base_model_name_or_path = base
        model = encoder.model
    else:
        model = encoder.model.merge_and_unload() if encoder.has_adapters else encoder.model
        if dtype is not None:
            model = model.to(DTYPES[dtype])
    family = encoder.adapter.family
    if family in CHAT_TEMPLATE_FAMILIES:
        encoder.adapter.processor.chat_template = chat_template(encoder.adapter.image_token)
    save_model_folder(out, encoder, instructions, source, model)
    write_sentence_transformers_files(out, instructions)
    input_format = loaded.description["input_format"] | {"image_token": encoder.adapter.image_token}
    card = model_card(name=name or out.name, family=family, backbone=base, recipe=loaded.recipe,
                      instructions=instructions, adapter_only=adapter_only, scores=scores_data,
                      input_format=input_format,
                      backbone_folder=Path(loaded.description["backbone"]),
                      servable=family in CHAT_TEMPLATE_FAMILIES and not adapter_only)
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the hub repository `repo_id` (created if missing); returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message="Upload an mme5 export")
    return str(getattr(commit, "commit_url", commit))


def _plain(value: Any) -> Any:
    """A recorded setting (a dict or a jsonargparse Namespace) as plain JSON types."""
    return dict(value) if isinstance(value, dict) else vars(value) if value is not None else None


def _read_scores(path: Path) -> dict[str, Any]:
    file = path / "scores.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no scores.json (the output folder of python -m mme5.eval)")
    return json.loads(file.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mme5.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="EmbeddingModule checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: the checkpoint's)")
    parser.add_argument("--max-length", type=int, help="text tokens per item (default: the training's)")
    parser.add_argument("--backbone", help="backbone folder, when the checkpoint's recorded one has moved")
    parser.add_argument("--query-instruction", default="", help="default instruction for queries")
    parser.add_argument("--target-instruction", default="", 
                        help="default instruction for documents (targets)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write a PEFT adapter folder (for the base model) instead of merged weights")
    parser.add_argument("--scores", type=Path, help="evaluation output folder: its scores go into the card")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this hub repository")
    parser.add_argument("--private", action="store_true", help="create the hub repository private")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle a .ckpt holding more than tensors and plain types (runs code from it)")
    args = parser.parse_args(argv)
    out = export(args.ckpt, args.out, args.dtype, args.max_length, args.backbone, args.query_instruction,
                 args.target_instruction, args.trust_checkpoint, args.adapter_only, args.scores,
                 name=args.push_to_hub)
    print(f"wrote {out}")
    if args.push_to_hub:
        try:
            print(f"pushed: {push_to_hub(out, args.push_to_hub, args.private)}")
        except Exception as error:  # noqa: BLE001 - any hub failure: the folder is written, say how to retry
            sys.exit(f"could not push {out} to {args.push_to_hub} ({type(error).__name__}: {error}). The "
                     f"folder is complete; retry with: hf upload {args.push_to_hub} {out} .")


if __name__ == "__main__":
    main()
