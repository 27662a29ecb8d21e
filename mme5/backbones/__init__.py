"""One adapter per MLLM family; `load_backbone` picks it from a checkpoint's `config.json`, and the input
format's preset from the checkpoint's files when the format does not name one (`resolve_preset`)."""

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from mme5.backbones.base import (
    IMAGE_INSTRUCTION,
    IMAGE_PLACEHOLDER,
    BackboneAdapter,
    Chunk,
    InputFormat,
    Item,
)
from mme5.backbones.gemma3 import Gemma3Adapter
from mme5.backbones.llava import LlavaAdapter
from mme5.backbones.llava_onevision import LlavaOnevisionAdapter
from mme5.backbones.mllama import MllamaAdapter
from mme5.backbones.presets import detect
from mme5.backbones.qwen2_5_vl import Qwen2_5_VLAdapter
from mme5.backbones.qwen2_vl import Qwen2VLAdapter
from mme5.backbones.qwen3_5 import Qwen3_5Adapter
from mme5.backbones.qwen3_vl import Qwen3VLAdapter
from mme5.hub import local_model

# Weight dtypes by the names configs and command lines use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ADAPTERS: dict[str, type[BackboneAdapter]] = {
    a.family: a for a in (MllamaAdapter, Qwen2VLAdapter, LlavaAdapter, Qwen3VLAdapter, Qwen2_5_VLAdapter,
                          Qwen3_5Adapter, LlavaOnevisionAdapter, Gemma3Adapter)
}


def adapter_for_model_type(model_type: str) -> type[BackboneAdapter]:
    """The adapter class handling HF `config.model_type` `model_type`."""
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise ValueError(f"no backbone adapter for model_type {model_type!r}; supported model types: {supported}")


def _adapter_of(folder: Path) -> type[BackboneAdapter]:
    """The adapter class of a model folder, from its `config.json` model_type."""
    model_type = AutoConfig.from_pretrained(folder).model_type
    try:
        return adapter_for_model_type(model_type)
    except ValueError as err:
        raise ValueError(f"{folder}/config.json: {err}") from None


def family_of(path_or_id: str | Path) -> str:
    """The `--family` of a checkpoint (folder or hub id), from its `config.json`."""
    return _adapter_of(local_model(path_or_id)).family


def resolve_preset(folder: Path, input_format: InputFormat | None, family: str) -> InputFormat:
    """`input_format` with its preset: the one it names (a warning when the folder's files say another),
    else the one the folder's files say for the model's `family` (`presets.detect`), else the default."""
    input_format = InputFormat.of(input_format)
    detected = detect(folder, family)
    if input_format.preset is None:
        return replace(input_format, preset=detected.name) if detected else input_format
    if detected is not None and detected.name != input_format.preset:
        warnings.warn(f"input format preset {input_format.preset!r} was asked for, but {detected.reason} "
                      f"{detected.name!r}: the model is fed another format than it was trained with",
                      stacklevel=3)
    return input_format


def load_backbone(path_or_id: str | Path, dtype: torch.dtype | None = None,
                  input_format: InputFormat | None = None, **kwargs: Any) -> BackboneAdapter:
    """Load a checkpoint (folder or hub id), model and processor, with the adapter of its model_type and the
    input format's preset resolved on its files (`resolve_preset`)."""
    folder = local_model(path_or_id)
    adapter = _adapter_of(folder)
    input_format = resolve_preset(folder, input_format, adapter.family)
    return adapter.from_pretrained(folder, dtype=dtype, input_format=input_format, **kwargs)


def load_backbone_skeleton(path_or_id: str | Path, dtype: torch.dtype | None = None,
                           input_format: InputFormat | None = None, **kwargs: Any) -> BackboneAdapter:
    """The checkpoint's adapter with its model on the meta device (architecture only, no weights read)."""
    folder = local_model(path_or_id)
    adapter = _adapter_of(folder)
    input_format = resolve_preset(folder, input_format, adapter.family)
    return adapter.skeleton(folder, dtype=dtype, input_format=input_format, **kwargs)


def load_processing(path_or_id: str | Path, input_format: InputFormat | None = None) -> BackboneAdapter:
    """The checkpoint's adapter with its processor only (no weights loaded): `prompt` and `collate` work.

    Cheap to build and to send to dataloader workers, which must not carry a copy of the model.
    """
    folder = local_model(path_or_id)
    adapter = _adapter_of(folder)
    return adapter.processing_only(folder, resolve_preset(folder, input_format, adapter.family))


__all__ = [
    "ADAPTERS",
    "DTYPES",
    "IMAGE_INSTRUCTION",
    "IMAGE_PLACEHOLDER",
    "BackboneAdapter",
    "Chunk",
    "InputFormat",
    "Item",
    "adapter_for_model_type",
    "family_of",
    "load_backbone",
    "load_backbone_skeleton",
    "load_processing",
    "resolve_preset",
]
