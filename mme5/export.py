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
- for the families vLLM serves (`CHAT_TEMPLATE_FAMILIES`: the Qwen-VL families and LLaVA), a chat template
  rendering the project's prompt (`mme5.integrations.vllm`);
- a model card `README.md` (Hub metadata, usage, input format, training recipe, scores from `--scores`).

`--push-to-hub` uploads the folder with huggingface_hub after writing it (token from `HF_TOKEN` or `hf auth
login`); a failed upload leaves the folder whole and says how to retry. The folder's owner record
(`.mme5-owner.json`) stays local.

`--out` belongs to one export (`mme5.files.claim_folder`; its identity: `export_identity`): the same
checkpoint and settings again find it complete and write nothing; another checkpoint or other settings are
refused unless `--overwrite`, whose export is written beside the folder and swapped in when complete.
`--scores` must be the evaluation of this checkpoint (scores.json names the model it scored).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

from mme5.backbones import DTYPES
from mme5.backbones.presets import DEFAULT as DEFAULT_PRESET
from mme5.checkpoint import MAX_STEPS, checkpoint_backbone, load_encoder, save_model_folder, trained_dims
from mme5.files import OWNER_RECORD, OutputFolderError, claim_folder, path_fingerprint, remove_path
from mme5.hub import is_hub_id
from mme5.integrations import write_sentence_transformers_files
from mme5.integrations.vllm import chat_template
from mme5.model_card import model_card
from mme5.settings import command_parser, number_at_least, utf8_path

# What current vLLM serves as pooling models (docs/models/pooling_models/embed.md, multimodal embedding
# models): Qwen3-VL by name (Qwen3-VL-Embedding), Qwen2-VL, Qwen2.5-VL and LLaVA(-NeXT) as generative
# `*ForConditionalGeneration` models converted with `--convert embed`. Mllama left vLLM after 0.10.2.
CHAT_TEMPLATE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")
COMMAND = "mme5.export"


def export_identity(ckpt: Path, *, dtype: str | None, max_length: int | None, backbone: str | None,
                    instructions: dict[str, str], adapter_only: bool, scores: Path | None,
                    name: str | None) -> dict[str, Any]:
    """What an export folder holds: the checkpoint and its backbone (recorded or given) by their files, and
    every setting that changes the written files: merged or adapter-only, dtype, input format, instructions,
    and the card's scores and name."""
    def files(path: str | Path | None) -> str | None:
        return path_fingerprint(path) if path and Path(path).exists() else None  # a hub id: by name

    return {"checkpoint": str(ckpt.resolve()), "checkpoint_files": files(ckpt),
            "backbone": backbone and (str(Path(backbone).resolve()) if Path(backbone).exists() else backbone),
            "backbone_files": files(backbone),
            "adapter_only": adapter_only, "dtype": dtype, "max_length": max_length,
            "instructions": instructions, "scores": scores and str(scores.resolve()),
            "scores_files": files(scores), "name": name}


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None, max_length: int | None = None,
           backbone: str | None = None, query_instruction: str = "", target_instruction: str = "",
           trust_checkpoint: bool = False, adapter_only: bool = False, scores: str | Path | None = None,
           name: str | None = None, overwrite: bool = False, scores_of_other_model: bool = False) -> Path:
    """Write the model folder `out` from checkpoint `ckpt`; returns it. Raises `OutputFolderError` when `out`
    holds another export (unless `overwrite`) or another process writes it; an `out` that already holds this
    very export is left as it is.

    dtype: weights' dtype of a merged export (None: the dtype the checkpoint was trained in).
    max_length: text tokens per item (None: the training's input format's).
    backbone: folder to rebuild the encoder from, when the checkpoint's recorded one has moved.
    adapter_only: write the trained adapters as a PEFT folder instead of merged weights.
    scores: an evaluation's output folder (or its scores.json) for the model card's table; it must have
        scored `ckpt` itself unless `scores_of_other_model` (you vouch that they are this model's).
    name: what the card calls the model (default: the folder's name; the hub repository when pushing).
    overwrite: replace another export in `out` (written beside it, swapped in when complete).
    trust_checkpoint: see `mme5.checkpoint.load_encoder`.
    """
    ckpt, out = Path(ckpt), Path(out)
    if ckpt.suffix != ".ckpt":
        raise ValueError(f"{ckpt}: expected an EmbeddingModule checkpoint (.ckpt)")
    scores_file = _scores_file(Path(scores)) if scores else None  # a bad path fails before the slow part
    scores_data = _read_scores(scores_file, ckpt, scores_of_other_model) if scores_file else None
    instructions = {"query": query_instruction, "target": target_instruction}
    source = backbone or checkpoint_backbone(ckpt)  # the weights an adapter-only checkpoint lacks
    identity = export_identity(ckpt, dtype=dtype, max_length=max_length, backbone=source,
                               instructions=instructions, adapter_only=adapter_only, scores=scores_file,
                               name=name)
    inputs = [p for p in (ckpt, source, scores_file) if p]
    with claim_folder(out, COMMAND, identity, overwrite=overwrite, inputs=inputs,
                      ways_out="pass --overwrite to replace it, or choose another --out") as folder:
        if folder.was_complete:
            print(f"{out} already holds this export (same checkpoint and settings): nothing to write")
            folder.complete()
            return out
        try:
            _write(folder.work, ckpt, name or out.name, dtype, max_length, backbone, instructions,
                   trust_checkpoint, adapter_only, scores_data)
        except BaseException:
            if folder.state == "new":  # an export does not resume: a failed first one leaves no folder
                remove_path(out)
            raise
        folder.complete()
    return out


def _write(out: Path, ckpt: Path, name: str, dtype: str | None, max_length: int | None, backbone: str | None,
           instructions: dict[str, str], trust_checkpoint: bool, adapter_only: bool,
           scores_data: dict[str, Any] | None) -> None:
    """The export's files in `out` (see the module docstring)."""
    loaded = load_encoder(ckpt, dtype=dtype, max_length=max_length, backbone=backbone,
                          trust_checkpoint=trust_checkpoint)
    encoder = loaded.encoder
    hparams = loaded.recipe.get("hyper_parameters") or {}
    recorded_backbone = str(backbone or hparams.get("backbone"))
    # A hub id stays an id (people load the base from the hub); a local folder is written as found here.
    base = recorded_backbone if is_hub_id(recorded_backbone) else loaded.description["backbone"]
    step, planned = loaded.recipe.get("global_step"), loaded.recipe.get(MAX_STEPS)
    source = {"checkpoint": str(ckpt.resolve()), "global_step": step, "max_steps": planned,
              "backbone": base, "lora": _plain(hparams.get("lora"))}
    if step is not None and planned is not None and 0 < step < planned:
        warnings.warn(f"{ckpt} is at step {step} of the {planned} its run was asked for: the run was stopped "
                      "or is still going; exporting it as it is", stacklevel=2)
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
    # The template renders the published format only: another preset's export carries none.
    servable = family in CHAT_TEMPLATE_FAMILIES and encoder.adapter.preset.name == DEFAULT_PRESET
    if servable:
        encoder.adapter.processor.chat_template = chat_template(encoder.adapter.image_token)
    save_model_folder(out, encoder, instructions, source, model, trained_dims(loaded.recipe))
    write_sentence_transformers_files(out, instructions)
    input_format = loaded.description["input_format"] | {"image_token": encoder.adapter.image_token}
    card = model_card(name=name, family=family, backbone=base, recipe=loaded.recipe,
                      instructions=instructions, adapter_only=adapter_only, scores=scores_data,
                      input_format=input_format,
                      backbone_folder=Path(loaded.description["backbone"]),
                      servable=servable and not adapter_only)
    (out / "README.md").write_text(card, encoding="utf-8")


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the hub repository `repo_id` (created if missing); returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message="Upload an mme5 export", ignore_patterns=[OWNER_RECORD])
    return str(getattr(commit, "commit_url", commit))


def _plain(value: Any) -> Any:
    """A recorded setting (a dict or a jsonargparse Namespace) as plain JSON types."""
    return dict(value) if isinstance(value, dict) else vars(value) if value is not None else None


def _scores_file(path: Path) -> Path:
    file = path / "scores.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no scores.json (the output folder of python -m mme5.eval)")
    return file


def _read_scores(file: Path, ckpt: Path, other_model: bool) -> dict[str, Any]:
    """The scores of `file`, refused when they were computed on another model than `ckpt` (the card would
    credit this model with another's scores) unless `other_model`."""
    scores = json.loads(file.read_text(encoding="utf-8"))
    scored = scores.get("model") or {}
    path, files = str(ckpt.resolve()), path_fingerprint(ckpt)
    if other_model or (scored.get("path") == path and scored.get("files") in (files, None)):
        if not other_model and scored.get("files") is None:
            warnings.warn(f"{file} was written before scores recorded the model's files: it scored {path}, "
                          "but whether that file has changed since cannot be told", stacklevel=3)
        return scores
    raise ValueError(f"{file}: these scores were computed on {scored.get('path')} (files "
                     f"{scored.get('files')}), not on the checkpoint being exported, {path} (files {files}); "
                     f"evaluate it (python -m mme5.eval --model {ckpt} ...), or, if the scores are this very "
                     "model's in another form (e.g. its earlier export), pass --scores-of-other-model")


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(prog="python -m mme5.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="EmbeddingModule checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, type=utf8_path, help="folder to write")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: the checkpoint's)")
    parser.add_argument("--max-length", type=number_at_least(1),
                        help="text tokens per item (default: the training's)")
    parser.add_argument("--backbone", help="backbone folder, when the checkpoint's recorded one has moved")
    parser.add_argument("--query-instruction", default="", help="default instruction for queries")
    parser.add_argument("--target-instruction", default="", 
                        help="default instruction for documents (targets)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write a PEFT adapter folder (for the base model) instead of merged weights")
    parser.add_argument("--scores", type=Path, help="evaluation output folder: its scores go into the card "
                        "(they must be this checkpoint's)")
    parser.add_argument("--scores-of-other-model", action="store_true",
                        help="accept --scores that name another model file than --ckpt (e.g. this "
                             "checkpoint's earlier export or a copy): you vouch that they are this model's")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (another export); the old one stays until the new one "
                             "is complete")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this hub repository")
    parser.add_argument("--private", action="store_true", help="create the hub repository private")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle a .ckpt holding more than tensors and plain types (runs code from it)")
    args = parser.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.dtype, args.max_length, args.backbone, args.query_instruction,
                     args.target_instruction, args.trust_checkpoint, args.adapter_only, args.scores,
                     name=args.push_to_hub, overwrite=args.overwrite,
                     scores_of_other_model=args.scores_of_other_model)
    except (OutputFolderError, OSError, ValueError) as error:  # bad input or a taken --out: no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"exported: {out}")
    if args.push_to_hub:
        try:
            print(f"pushed: {push_to_hub(out, args.push_to_hub, args.private)}")
        except Exception as error:  # noqa: BLE001 - any hub failure: the folder is written, say how to retry
            sys.exit(f"could not push {out} to {args.push_to_hub} ({type(error).__name__}: {error}). The "
                     f"folder is complete; retry with: hf upload {args.push_to_hub} {out} . --exclude "
                     f"{OWNER_RECORD}")


if __name__ == "__main__":
    main()
