"""Starting a run from a trained model's weights (`model.init_from`): a second training stage, fine-tuning a
merge (`mme5.merge`), or the warm-started arms of benchmarks/techniques.py.

Only the model's weights are taken. The optimiser, the schedule, the data stream's position and the loss's
learned temperatures start afresh, as in any new run; `--ckpt_path` resumes a run instead (its checkpoint's
weights then replace these, and `init_from` is not read again).

What may start from what (refused otherwise, before anything is written):
- a full fine-tune (`model.lora: null`) from any checkpoint of train.py or mme5.merge on the same backbone: a
  full one, a merge, or a LoRA one (its adapters merged into the weights first);
- a LoRA run from a LoRA checkpoint with the same LoRA settings: it trains those adapters further.
New adapters on top of a fine-tuned model need that model as the backbone: export it (`python -m
mme5.export`) and name the export as `model.backbone`. A LoRA run's checkpoints hold its adapters only and
are scored on `model.backbone`, so a LoRA run started from other weights would be scored on the wrong ones.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from mme5.checkpoint import (
    ADAPTER_ONLY,
    EXPORT_CONFIG,
    MERGED_FROM,
    load_encoder,
    read_run_checkpoint,
    trained_on,
)
from mme5.encoder import Encoder, LoraSettings
from mme5.files import path_fingerprint

INITIALISED_FROM = "initialised_from"  # checkpoints of a run started with init_from: what it started from


def read_start(path: str | Path) -> dict[str, Any]:
    """The checkpoint `init_from` names, memory-mapped; ValueError naming it when it is not one of train.py
    or mme5.merge."""
    path = Path(path)
    if path.is_dir() and ((path / EXPORT_CONFIG).is_file() or (path / "config.json").is_file()):
        raise ValueError(f"model.init_from {path}: a model folder, which is a backbone: name it as "
                         "model.backbone; init_from takes a checkpoint (.ckpt) of train.py or mme5.merge")
    if not path.exists():
        raise ValueError(f"model.init_from {path}: no such file")
    try:
        return read_run_checkpoint(path)
    except ValueError as error:
        raise ValueError(f"model.init_from {error}") from None


def check_start(path: str | Path, checkpoint: dict[str, Any], backbone: dict[str, str],
                lora: dict[str, Any] | None) -> None:
    """Refuse a start on another backbone than `backbone` (its identity), or one a LoRA run of settings `lora`
    cannot continue (see the module docstring)."""
    where = f"model.init_from {path}"
    recorded = trained_on(Path(path), checkpoint)
    changed = [part for part in ("config", "weights") if recorded[part] != backbone.get(part)]
    if changed:
        raise ValueError(f"{where} was trained on the backbone at {recorded.get('path')}, which differs from "
                         f"model.backbone ({backbone.get('path')}) in its {' and '.join(changed)}: its "
                         "weights are another model's. Set model.backbone to the backbone it was trained on")
    if lora is None:
        return
    theirs = checkpoint["hyper_parameters"].get("lora")
    if not checkpoint.get(ADAPTER_ONLY) or theirs is None:
        raise ValueError(f"{where} is not a LoRA run, and a LoRA run can only continue the adapters of one. "
                         "Train its weights further with model.lora: null, or export it (python -m "
                         "mme5.export) and train new adapters with the export as model.backbone")
    if asdict(LoraSettings(**dict(theirs))) != asdict(LoraSettings(**dict(lora))):
        raise ValueError(f"{where} trained other adapters (model.lora {dict(theirs)}; this run's: "
                         f"{dict(lora)}). "
                         "Continue them with the same model.lora, or export it (python -m mme5.export) and "
                         "train new adapters with the export as model.backbone")


def load_start(encoder: Encoder, path: str | Path, checkpoint: dict[str, Any], backbone: str,
               dtype: str | None) -> dict[str, Any]:
    """Put the start's weights into `encoder` (built from `backbone`, not yet sharded); returns what it
    started from, for the run's checkpoints."""
    weights = {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items()
               if k.startswith("encoder.")}
    if checkpoint.get(ADAPTER_ONLY) and not encoder.has_adapters:  # a full fine-tune of a LoRA run's model
        start = load_encoder(path, dtype=dtype, backbone=backbone).encoder
        weights = {f"model.{k}": v for k, v in start.model.merge_and_unload().state_dict().items()}
        del start
    # Adapters only, or a merge's changed weights: the rest is the backbone's, already in `encoder`.
    partial = encoder.has_adapters or MERGED_FROM in checkpoint
    try:
        result = encoder.load_state_dict(weights, strict=not partial)
    except RuntimeError as error:  # shapes or names of another architecture
        raise ValueError(f"model.init_from {path}: its weights do not fit this model: "
                         f"{' '.join(str(error).split())[:300]}") from None
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    missing = trainable - set(weights) if encoder.has_adapters else set()
    if result.unexpected_keys or missing:
        raise ValueError(f"model.init_from {path}: weights this model does not have "
                         f"{sorted(result.unexpected_keys)[:5]}, or lacks {sorted(missing)[:5]}")
    return {"checkpoint": str(Path(path).resolve()), "files": path_fingerprint(path),
            "global_step": checkpoint.get("global_step"), "merged_from": checkpoint.get(MERGED_FROM),
            INITIALISED_FROM: checkpoint.get(INITIALISED_FROM)}
