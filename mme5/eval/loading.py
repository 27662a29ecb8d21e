"""Loads the model to evaluate and names it for the embedding cache.

Accepted: a Lightning checkpoint of `EmbeddingModule` (`.ckpt`: the encoder is rebuilt from the saved
hyper-parameters `backbone`/`lora`, then its `encoder.*` weights are loaded) or a plain backbone folder
(zero-shot: last-token pooling, no LoRA) or an exported folder (`python -m mme5.export`: a backbone folder
with merged adapters and `mme5_embedding.json`, whose pooling, normalisation and max_length it follows).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mme5.backbones import DTYPES, load_backbone
from mme5.data.collate import lockstep_batch
from mme5.encoder import Encoder, LoraSettings
from mme5.eval.encode import Embed
from mme5.sharding import is_sharded_module

CONFIG_NAME = "mme5_embedding.json"  # marks an exported folder (see mme5.export)
DEFAULT_MAX_LENGTH = 256


def embedder(encoder: Encoder) -> Embed:
    """`embed(items)` of an encoder: its adapter batches the items, the encoder embeds them (no grad).

    For an FSDP-sharded encoder (evaluation during training) every batch is a `lockstep_batch`, so all
    ranks run the same modules, and `embed([])` runs a placeholder batch (see `encode(lockstep=True)`).
    """
    lockstep = is_sharded_module(encoder)

    @torch.no_grad()
    def embed(items: list) -> torch.Tensor:
        collate = encoder.adapter.collate
        return encoder(lockstep_batch(items, collate) if lockstep else collate(items))

    return embed


def fingerprint(files: list[Path], **settings: Any) -> str:
    """Identity of a model for the cache: its files' names, sizes and modification times, plus settings
    that change embeddings (dtype, max_length). Cheap: no weights are hashed."""
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]
    payload = json.dumps({"files": stats, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def _lora(value: Any) -> LoraSettings | None:
    """The checkpoint's `lora` hyper-parameter (a dataclass, a dict or a jsonargparse Namespace)."""
    if value is None or isinstance(value, LoraSettings):
        return value
    return LoraSettings(**(dict(value) if isinstance(value, Mapping) else vars(value)))


def encoder_from_checkpoint(path: Path, dtype: str | None, max_length: int | None,
                            backbone: str | None) -> Encoder:
    """An EmbeddingModule checkpoint's encoder; max_length None = the training data module's, else 256."""
    # Unpickling: our own checkpoints hold dataclasses in their hyper-parameters; load trusted files only.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "backbone" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not an EmbeddingModule checkpoint (expected hyper_parameters.backbone and "
                         f"a state_dict; found keys {sorted(checkpoint)})")
    source = backbone or _recorded_backbone(path, hparams["backbone"])
    dtype = dtype or hparams.get("dtype")
    trained = (checkpoint.get("datamodule_hyper_parameters") or {}).get("max_length")
    max_length = max_length or trained or DEFAULT_MAX_LENGTH
    encoder = Encoder(load_backbone(source, DTYPES[dtype] if dtype else None, max_length=max_length),
                      _lora(hparams.get("lora")))
    weights = {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items()
               if k.startswith("encoder.")}
    # An adapter-only checkpoint holds the trained adapters; the rest comes from the backbone just loaded.
    result = encoder.load_state_dict(weights, strict=not checkpoint.get("adapter_only", False))
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights that this encoder does not have: {result.unexpected_keys[:5]}")
    return encoder


def _recorded_backbone(checkpoint: Path, recorded: str) -> str:
    """The backbone a checkpoint was trained from: a hub id as is; a relative folder is looked up from the
    working directory, then from the checkpoint's parent folders (a run directory moved as a whole)."""
    candidate = Path(recorded)
    if candidate.exists():
        return recorded
    if not candidate.is_absolute():
        for parent in checkpoint.resolve().parents:
            if (parent / candidate / "config.json").is_file():
                return str(parent / candidate)
    if candidate.is_absolute() or len(candidate.parts) != 2 or recorded.startswith("."):
        raise FileNotFoundError(f"{checkpoint} was trained from backbone {recorded}, which does not exist "
                                "here; pass its folder with --backbone")
    return recorded  # "namespace/name": a hub id


@dataclass
class LoadedModel:
    encoder: Encoder
    fingerprint: str  # names the model in the embedding cache
    description: dict[str, Any]  # what was loaded, for scores.json


def _exported_settings(path: Path) -> dict[str, Any]:
    """An exported folder's settings, refused when they ask for what `Encoder` does not do."""
    settings = json.loads((path / CONFIG_NAME).read_text())
    if settings.get("pooling", "last_token") != "last_token":
        raise ValueError(f"{path / CONFIG_NAME}: pooling {settings['pooling']!r} is not supported")
    return settings


def load_encoder(path: str | Path, device: str = "cpu", dtype: str | None = None,
                 max_length: int | None = None, backbone: str | None = None) -> LoadedModel:
    """The encoder of a checkpoint, exported folder or backbone folder, in eval mode on `device`.

    dtype: weights' dtype ("float32", "bfloat16", "float16"; None: the checkpoint's own).
    max_length: text tokens per item (None: the exported folder's or the training's, else 256).
    backbone: folder to rebuild a `.ckpt`'s encoder from, when its recorded one has moved.
    """
    path = Path(path)
    exported = path.is_dir() and (path / CONFIG_NAME).is_file()
    settings = _exported_settings(path) if exported else {}
    max_length = max_length or settings.get("max_length")
    if path.is_file() and path.suffix == ".ckpt":
        kind, files = "lightning-checkpoint", [path]
        encoder = encoder_from_checkpoint(path, dtype, max_length, backbone)
    elif path.is_dir() and (path / "config.json").is_file():
        model = load_backbone(path, DTYPES[dtype] if dtype else None,
                              max_length=max_length or DEFAULT_MAX_LENGTH)
        kind = "exported" if exported else "backbone"
        encoder = Encoder(model, normalize=settings.get("normalize", True))
        files = [f for f in path.iterdir() if f.is_file()]
    else:
        raise ValueError(f"{path}: expected a Lightning checkpoint (.ckpt), or an exported or backbone "
                         "folder with config.json")
    encoder.to(device).eval()
    settings = {"dtype": dtype, "max_length": encoder.adapter.max_length, "kind": kind}
    description = {"name": path.name, "path": str(path.resolve()), **settings,
                   "family": encoder.adapter.family, "adapters": encoder.has_adapters}
    return LoadedModel(encoder, fingerprint(files, **settings), description)
