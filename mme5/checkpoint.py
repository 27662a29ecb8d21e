"""The trained encoder on disk: the checkpoint and export formats, what writes them and every loader.

Formats:
- A Lightning checkpoint of `EmbeddingModule` (`.ckpt`): `hyper_parameters` (backbone, input_format, lora,
  dtype, ...), `datamodule_hyper_parameters` (sources, batch), `state_dict` (`encoder.*`; only the
  adapters' weights when `adapter_only`, the backbone then being reloaded from `backbone`), `adapter_keys`
  (their names),
  `rng_states` (every rank's generators, for an exact resume). A merge of runs (`mme5.merge`) is one too,
  without adapters: `merged_from` names the runs, the state dict holds the weights they changed.
- An exported folder (`python -m mme5.export`): a transformers model folder with merged adapters plus
  `mme5_embedding.json` (pooling, normalisation, input format, instructions, source).
- A PEFT adapter folder (`adapter_config.json`, no `config.json`): LoRA/DoRA weights applied to the base
  model its config names (`--adapter-only` exports, or e.g. VLM2Vec's released Qwen2-VL adapters); with
  `mme5_embedding.json` when it is an export of ours.
- A plain backbone folder (zero-shot: last-token pooling, no adapters), e.g. the released
  `intfloat/mmE5-mllama-11b-instruct`.

`load_encoder` reads all four, from a path or a hub id (`namespace/name[@revision]`, through the local
hub cache), and returns the encoder with what it was loaded from.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from mme5.backbones import DTYPES, InputFormat, family_of, load_backbone, resolve_preset
from mme5.backbones.presets import DEFAULT as DEFAULT_PRESET
from mme5.encoder import Encoder, LoraSettings
from mme5.files import OWNER_RECORD, files_fingerprint, remove_stale, save_torch, write_json
from mme5.hub import local_model

ADAPTER_ONLY = "adapter_only"  # the state dict holds the trainable (adapter) weights only
ADAPTER_KEYS = "adapter_keys"  # their names, for checks after a strategy popped the state dict
RNG_STATES = "rng_states"  # one {"torch", "cuda"} per rank
BACKBONE_IDENTITY = "backbone_identity"  # `backbone_identity` of the backbone trained on
MERGED_FROM = "merged_from"  # a merge of runs (`mme5.merge`): holds the weights the merge changed only
MAX_STEPS = "max_steps"  # the steps the run was asked for: a checkpoint before them is of an unfinished run
EXPORT_CONFIG = "mme5_embedding.json"  # marks an exported folder
PEFT_CONFIG = "adapter_config.json"  # marks a PEFT adapter folder
EXPORT_FORMAT_VERSION = 2  # 2: the input format (published prompt rule, image token, resolution) recorded


# ----------------------------------------------------------------------------- writing (training)


def drop_frozen_weights(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State-dict post hook of a LoRA/DoRA run: keep the trainable weights, drop the frozen backbone's.

    The backbone is reloaded from `backbone`, so an 11B run's checkpoints hold megabytes, not 22 GB, and can
    be written often. Dropping the frozen weights here, not from the finished checkpoint, also spares FSDP
    gathering them to rank 0 first.
    """
    trainable = {prefix + name for name, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in trainable]:
        del state_dict[key]


def add_training_state(checkpoint: dict[str, Any], rng_states: list[Any], adapter_names: Iterable[str] | None,
                       backbone: dict[str, str]) -> None:
    """Record every rank's random state, the backbone's identity and, for an adapter-only run, the
    adapters' names."""
    checkpoint[RNG_STATES] = rng_states
    checkpoint[BACKBONE_IDENTITY] = backbone
    if adapter_names is not None:
        checkpoint[ADAPTER_ONLY] = True  # see `drop_frozen_weights`
        # Their names too: ModelParallelStrategy loads (and pops) the state dict before the module's
        # `on_load_checkpoint` sees it, so the check there needs them.
        checkpoint[ADAPTER_KEYS] = sorted(adapter_names)


def backbone_identity(folder: Path) -> dict[str, str]:
    """What makes a backbone this one and not another of the same shape, cheaply and independent of where
    it lies: its config and, per weight file, its size and first and last MiB (no full read of 22 GB)."""
    digest = hashlib.sha1()
    for file in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(0, size - (1 << 20)))
            digest.update(f"{file.name}:{size}".encode() + head + handle.read())
    config = hashlib.sha1((folder / "config.json").read_bytes()).hexdigest()[:16]
    return {"config": config, "weights": digest.hexdigest()[:16], "path": str(folder.resolve())}


def check_backbone(checkpoint: dict[str, Any], current: dict[str, str]) -> None:
    """Refuse to resume a checkpoint on another backbone than the one it was trained on (adapters and the
    optimiser state would silently continue on different weights)."""
    recorded = checkpoint.get(BACKBONE_IDENTITY)
    if recorded is None:
        return  # written before identities were recorded
    changed = [part for part in ("config", "weights") if recorded.get(part) != current.get(part)]
    if changed:
        raise ValueError(
            f"this checkpoint was trained on the backbone at {recorded.get('path')}; the backbone now loaded "
            f"({current.get('path')}) differs in its {' and '.join(changed)}. Resume with "
            "--model.backbone set to the original one")


def check_adapters(checkpoint: dict[str, Any], trainable: set[str]) -> None:
    """Refuse an adapter-only checkpoint whose adapters are not this model's (loading is non-strict)."""
    if not checkpoint.get(ADAPTER_ONLY):
        return
    saved = set(checkpoint.get("state_dict") or checkpoint[ADAPTER_KEYS])
    if saved != trainable:
        missing, unexpected = sorted(trainable - saved)[:5], sorted(saved - trainable)[:5]
        raise ValueError(f"adapter-only checkpoint does not match this model's adapters: missing "
                         f"{missing}, unexpected {unexpected}")


def rng_state_of_rank(checkpoint: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """This rank's saved random state; rank 0's when the checkpoint comes from another world size."""
    states = checkpoint.get(RNG_STATES)
    if not states:
        return None
    return states[rank] if len(states) == world else states[0]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on the checkpoint's own filesystem.

    Lightning stages a checkpoint in the system's temporary folder and moves it into place: across
    filesystems (the usual cluster layout: /tmp local, checkpoints on shared storage) that move is a copy,
    and a kill or a full disk during it leaves a torn `last.ckpt` in place of the good one. Here the file is
    written beside its target, flushed, and renamed over it (`mme5.files.save_torch`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
                        ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        remove_stale(Path(path).parent)  # a killed write's temporary file
        save_torch(path, checkpoint)


def run_checkpoint_dir(trainer: Any) -> Path:
    """Where a run's checkpoints go: the first ModelCheckpoint's folder, else `<root>/checkpoints`."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a loadable checkpoint (cheaply: the archive's directory, not its tensors), or None.

    torch.save writes a zip archive whose directory is at the end: a torn or 0-byte file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                return "no data.pkl in the archive"
    except (zipfile.BadZipFile, OSError) as error:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return None


def read_run_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of train.py or mme5.merge, memory-mapped and without unpickling code; ValueError naming
    `path` and what it is instead (a folder, missing, torn, not ours)."""
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a checkpoint file (.ckpt) of train.py")
    if path.suffix != ".ckpt" or not path.is_file():
        raise ValueError(f"{path}: not a checkpoint file (.ckpt) of train.py")
    if problem := checkpoint_problem(path):  # e.g. torn by a kill while it was saved
        raise ValueError(f"{path}: not a loadable checkpoint ({problem}); take another of the run's")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: holds Python objects beyond tensors and plain types, which train.py's "
                         "checkpoints never do") from None
    if "backbone" not in (checkpoint.get("hyper_parameters") or {}) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not an EmbeddingModule checkpoint (no hyper_parameters.backbone or "
                         "state_dict)")
    return checkpoint


def trained_on(path: Path, checkpoint: dict[str, Any], backbone: str | None = None) -> dict[str, str]:
    """The identity of the backbone a checkpoint was trained on: recorded, else that of `backbone` or of its
    recorded backbone (checkpoints written before identities were recorded)."""
    if recorded := checkpoint.get(BACKBONE_IDENTITY):
        return recorded
    return backbone_identity(local_model(backbone or checkpoint_backbone(path)))


# ----------------------------------------------------------------------------- writing (export)


def write_export_config(folder: Path, encoder: Encoder, dtype: torch.dtype, instructions: dict[str, str],
                        source: dict[str, Any], matryoshka_dims: list[int] | None = None) -> None:
    """`mme5_embedding.json` of an exported folder: how to pool, normalise and prompt, where from, and the
    leading sizes trained as embeddings too (`matryoshka_dims`, null when only the whole one was)."""
    write_json(folder / EXPORT_CONFIG, {
        "format_version": EXPORT_FORMAT_VERSION,
        "pooling": "last_token",
        "normalize": encoder.normalize,
        "family": encoder.adapter.family,
        "input_format": asdict(encoder.adapter.input_format),
        "dtype": str(dtype).removeprefix("torch."),
        "instructions": instructions,
        "source": source,
        "matryoshka_dims": matryoshka_dims,
    })


def save_model_folder(folder: Path, encoder: Encoder, instructions: dict[str, str], source: dict[str, Any],
                      model: nn.Module | None = None, matryoshka_dims: list[int] | None = None) -> None:
    """Write an exported folder: `model`'s weights (default: the encoder's own; a PEFT model writes its
    adapters only), the processor and `mme5_embedding.json`."""
    model = encoder.model if model is None else model
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    encoder.adapter.processor.save_pretrained(folder)
    write_export_config(folder, encoder, model.dtype, instructions, source, matryoshka_dims)


def trained_dims(recipe: Mapping[str, Any]) -> list[int] | None:
    """The Matryoshka dimensions a model was trained at, from a `LoadedModel.recipe`: an export's
    `matryoshka_dims` or a checkpoint's `model.matryoshka_dims`; None when not recorded."""
    hparams = recipe.get("hyper_parameters") or {}
    dims = recipe.get("matryoshka_dims") or hparams.get("matryoshka_dims")
    return list(dims) if dims else None


def read_export_config(folder: Path) -> dict[str, Any]:
    """An exported folder's settings, refused when they ask for what `Encoder` does not do."""
    settings = json.loads((folder / EXPORT_CONFIG).read_text())
    if settings.get("pooling", "last_token") != "last_token":
        raise ValueError(f"{folder / EXPORT_CONFIG}: pooling {settings['pooling']!r} is not supported")
    if "input_format" not in settings and "max_length" in settings:  # format 1 recorded max_length alone
        settings["input_format"] = {"max_length": settings["max_length"]}
    return settings


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """An encoder in eval mode and what it was loaded from."""

    encoder: Encoder
    fingerprint: str  # names the model in the embedding cache
    description: dict[str, Any]  # what was loaded, for scores.json
    # A .ckpt's hyper-parameters and step, an exported folder's config; empty for a backbone folder.
    recipe: dict[str, Any] = field(default_factory=dict)


def load_encoder(path: str | Path, device: str = "cpu", dtype: str | None = None,
                 max_length: int | None = None, backbone: str | None = None,
                 trust_checkpoint: bool = False, preset: str | None = None,
                 num_frames: int | None = None) -> LoadedModel:
    """The encoder of a checkpoint, exported folder or backbone folder (a path or a hub id), in eval mode
    on `device`.

    dtype: weights' dtype ("float32", "bfloat16", "float16"; None: the checkpoint's own).
    max_length: text tokens per item (None: the recorded input format's).
    num_frames: frames kept of each video (None: the recorded input format's; e.g. 64 to score as
        Qwen3-VL-Embedding reports video).
    preset: the input format preset (`mme5.backbones.presets`; None: the recorded one, else what the
        model's files say, else "mme5").
    backbone: folder to rebuild a `.ckpt`'s encoder from, when its recorded one has moved.
    trust_checkpoint: unpickle a `.ckpt` that holds more than tensors and plain types (runs code from the
        file: only for files from a source you trust). The project's own checkpoints never need it.
    """
    path = local_model(path)
    identity: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".ckpt":
        kind = "lightning-checkpoint"
        encoder, recipe, source = _from_checkpoint(path, dtype, max_length, preset, backbone,
                                                   trust_checkpoint, num_frames)
        # The weights that are not in the checkpoint are the backbone's: its files are part of the model.
        files = [path, *model_files(source)]
        identity["backbone"] = str(source.resolve())
    elif path.is_dir() and (path / PEFT_CONFIG).is_file() and not (path / "config.json").is_file():
        kind = "adapter"
        recipe = read_export_config(path) if (path / EXPORT_CONFIG).is_file() else {}
        base = local_model(backbone or _peft_base(path))
        # The adapter folder's files say what the adapters were trained with (e.g. VLM2Vec's card).
        input_format = resolve_preset(path, _input_format(recipe.get("input_format"), max_length, preset,
                                                             num_frames), family_of(base))
        model = load_backbone(base, DTYPES[dtype] if dtype else None, input_format=input_format)
        encoder = Encoder(model, normalize=recipe.get("normalize", True), peft_folder=path)
        files = [*model_files(path), *model_files(base)]
        identity["backbone"] = str(base.resolve())
    elif path.is_dir() and (path / "config.json").is_file():
        exported = (path / EXPORT_CONFIG).is_file()
        recipe = read_export_config(path) if exported else {}
        model = load_backbone(path, DTYPES[dtype] if dtype else None,
                              input_format=_input_format(recipe.get("input_format"), max_length, preset,
                                                         num_frames))
        kind = "exported" if exported else "backbone"
        encoder = Encoder(model, normalize=recipe.get("normalize", True))
        files = model_files(path)
    else:
        raise ValueError(f"{path}: expected a Lightning checkpoint (.ckpt), an exported or backbone folder "
                         "with config.json, or a PEFT adapter folder with adapter_config.json")
    encoder.to(device).eval()
    settings = {"dtype": dtype, "input_format": asdict(encoder.adapter.input_format), "kind": kind}
    description = {"name": path.name, "path": str(path.resolve()), **identity, **settings,
                   "family": encoder.adapter.family, "adapters": encoder.has_adapters}
    # Names the model in the embedding cache: its files (a .ckpt's backbone's too) and the settings that
    # change embeddings (dtype, input format).
    return LoadedModel(encoder, files_fingerprint(files, **settings), description, recipe)


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that its fingerprint covers: all but the owner record of the command
    that wrote it (rewritten whenever the folder is claimed again, the model unchanged)."""
    return [f for f in folder.iterdir() if f.is_file() and f.name != OWNER_RECORD]


def _input_format(recorded: Any, max_length: int | None, preset: str | None = None,
                  num_frames: int | None = None) -> InputFormat:
    """The recorded input format (a dict, a dataclass or None: the defaults), `max_length`, `preset` and
    `num_frames` overriding. A format recorded before presets existed (a dict without `preset`) was the
    published one; one recorded before truncation rules (without `truncation`) cut text tokens only."""
    legacy = isinstance(recorded, Mapping) and "preset" not in recorded
    result = InputFormat.of(recorded)
    if legacy or preset:
        result = replace(result, preset=preset or DEFAULT_PRESET)
    if isinstance(recorded, Mapping) and "truncation" not in recorded:
        result = replace(result, truncation="text")
    overrides = {"max_length": max_length, "num_frames": num_frames}
    return replace(result, **{name: value for name, value in overrides.items() if value})


def _from_checkpoint(path: Path, dtype: str | None, max_length: int | None, preset: str | None,
                     backbone: str | None, trust: bool = False, num_frames: int | None = None
                     ) -> tuple[Encoder, dict[str, Any], Path]:
    """An EmbeddingModule checkpoint's encoder, its recipe (everything in it but weights and states) and
    the backbone folder it was rebuilt from."""
    # The module saves plain types only, so its checkpoints load without unpickling code (weights_only).
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: holds Python objects beyond tensors and plain types; loading it would run code from "
            f"the file ({str(error).splitlines()[0]}). If you trust its source, pass --trust-checkpoint "
            "(trust_checkpoint=True)") from None
    hparams = checkpoint.get("hyper_parameters") or {}
    if "backbone" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not an EmbeddingModule checkpoint (expected hyper_parameters.backbone and "
                         f"a state_dict; found keys {sorted(checkpoint)})")
    source = local_model(backbone or _recorded_backbone(path, hparams["backbone"]))
    dtype = dtype or hparams.get("dtype")
    # Checkpoints before the input format was recorded kept max_length in the data module's settings.
    recorded = hparams.get("input_format") or {
        "max_length": (checkpoint.get("datamodule_hyper_parameters") or {}).get("max_length", 256)}
    encoder = Encoder(load_backbone(source, DTYPES[dtype] if dtype else None,
                                    input_format=_input_format(recorded, max_length, preset, num_frames)),
                      _lora(hparams.get("lora")))
    weights = {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items()
               if k.startswith("encoder.")}
    # An adapter-only checkpoint holds the trained adapters, a merge the changed weights; the rest comes from
    # the backbone just loaded.
    partial = checkpoint.get(ADAPTER_ONLY, False) or MERGED_FROM in checkpoint
    result = encoder.load_state_dict(weights, strict=not partial)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights that this encoder does not have: {result.unexpected_keys[:5]}")
    recipe = {key: checkpoint.get(key) for key in ("hyper_parameters", "datamodule_hyper_parameters",
                                                   MAX_STEPS, "global_step", "epoch")}
    return encoder, recipe, source


def _peft_base(folder: Path) -> str:
    """The base model a PEFT adapter folder was trained on (its `base_model_name_or_path`)."""
    base = json.loads((folder / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / PEFT_CONFIG} names no base_model_name_or_path: pass the base model's "
                         "folder or hub id with --backbone")
    return base


def _lora(value: Any) -> LoraSettings | None:
    """The checkpoint's `lora` hyper-parameter (a dataclass, a dict or a jsonargparse Namespace)."""
    if value is None or isinstance(value, LoraSettings):
        return value
    return LoraSettings(**(dict(value) if isinstance(value, Mapping) else vars(value)))


def checkpoint_backbone(path: str | Path) -> str | None:
    """The backbone a `.ckpt` was trained from (a folder here, or a hub id), read without loading its weights
    (memory-mapped); None for anything else, or when it cannot be told (loading the checkpoint says why).
    A command's output folder must not be, or hold, it: the checkpoint's other weights are the backbone's."""
    path = Path(path)
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return _recorded_backbone(path, checkpoint["hyper_parameters"]["backbone"])
    except (pickle.UnpicklingError, KeyError, TypeError, OSError, RuntimeError):
        return None


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
