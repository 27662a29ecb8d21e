"""What a training run folder is, and what may change when a run is resumed.

A run folder (`trainer.default_root_dir`) is owned by one recipe: the settings that define the model being
trained (`RECIPE_KEYS`) and the backbone's identity. Resuming it, or starting from a checkpoint of another
run, with another recipe is refused naming the keys; every other setting (learning rate, schedule, steps,
chunking, data loading) may change on resume and is applied and listed in the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from mme5.backbones import InputFormat, presets
from mme5.checkpoint import BACKBONE_IDENTITY, checkpoint_problem
from mme5.encoder import LoraSettings
from mme5.files import OutputFolderError, comparable, describe_changes, identity_changes

COMMAND = "train.py fit"
# The module settings that define what is trained: a checkpoint of another value is another model.
# The loss's training techniques are in it: each changes the loss, and task_temperatures the parameters, so
# going on with another value would train another model under the same run's name; so is the model it started
# from (init_from).
RECIPE_KEYS = ("lora", "dtype", "input_format", "temperature", "learnable_temperature",
               "mask_false_negatives", "gradient_scale", "hardness_mode", "hardness_strength",
               "false_negative_threshold", "false_negative_margin", "task_temperatures", "temperature_groups",
               "matryoshka_dims", "matryoshka_weights", "init_from")
# What a run recorded before a recipe setting existed trained with (its record has no such key).
RECIPE_DEFAULTS = {"hardness_strength": 0.0, "task_temperatures": False}
DATAMODULE_STATE = "ShardDataModule"  # Lightning keeps a data module's state under its class name
# What a run writes in its folder besides the checkpoint folders and the logger's folder.
RUN_FILES = ("hpc_ckpt_*.ckpt", "data_report.json")


class ResumeRefused(OutputFolderError):
    """The run asked for cannot start: a checkpoint of another recipe, or contradictory flags."""


def _truncation_identity(recorded: Any, input_format: InputFormat, detected_preset: str,
                         family: str | None) -> str | None:
    """The cut rule a run trains with, as its identity holds it: the preset's rule for the family where the
    format names none (`family` None: as named), and None for "text", the rule of every run recorded before
    truncation rules existed (their records have no such key, read as None). So resuming such a run is
    refused where the rule would now change under it (mllama: "sequence"), and accepted with
    `--model.input_format.truncation text`."""
    if isinstance(recorded, Mapping) and "truncation" not in recorded:
        return None
    rule = input_format.truncation
    if rule is None and family is not None:
        rule = presets.preset(input_format.preset or detected_preset).truncation_for(family)
    return None if rule == "text" else rule


def run_identity(hparams: dict[str, Any], backbone: dict[str, str], detected_preset: str,
                 family: str | None = None) -> dict[str, Any]:
    """The identity of a run folder: its recipe and the backbone's content (not its path). Settings given
    in part (`input_format: {max_length: 64}`, a `lora` of some fields, or none: the defaults) are compared
    complete, so that spelling out a default is no other recipe. The input format's preset is None when it
    is `detected_preset`, the one the backbone's files give a format naming none: naming it is no other
    recipe (and run folders recorded before presets, or without one named, keep their identity). A
    max_length left None is the preset's, so that naming it is no other recipe either."""
    recipe = {key: hparams.get(key, RECIPE_DEFAULTS.get(key)) for key in RECIPE_KEYS}
    input_format = InputFormat.of(recipe["input_format"])
    chosen = presets.preset(input_format.preset or detected_preset)
    input_format = replace(input_format, max_length=input_format.max_length or chosen.max_length,
                           truncation=_truncation_identity(recipe["input_format"], input_format,
                                                           detected_preset, family))
    if input_format.preset == detected_preset:
        input_format = replace(input_format, preset=None)
    recipe["input_format"] = asdict(input_format)
    if recipe["lora"] is not None:
        recipe["lora"] = asdict(LoraSettings(**dict(recipe["lora"])))
    return {**{f"model.{key}": value for key, value in recipe.items()},
            "backbone": {part: backbone.get(part) for part in ("config", "weights")}}


def run_outputs(trainer: Any) -> tuple[str, ...]:
    """The run's own outputs inside its folder, as globs relative to it: checkpoint folders, the logger's
    folder (TensorBoard events and the saved config.yaml) and `RUN_FILES`. Other things there (the demo's
    world and backbone, your data) are not the run's."""
    root = Path(trainer.default_root_dir).resolve()
    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    folders += [Path(logger.log_dir) for logger in trainer.loggers if getattr(logger, "log_dir", None)]
    inside = [f.resolve().relative_to(root) for f in folders if f.resolve().is_relative_to(root)]
    return tuple(sorted({str(path) for path in inside if str(path) != "."})) + RUN_FILES


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A checkpoint's hyper-parameters, data settings, step and backbone identity, without reading its
    tensors into memory (memory-mapped)."""
    if not Path(path).is_file():
        raise ResumeRefused(f"--ckpt_path {path}: no such file")
    if problem := checkpoint_problem(Path(path)):
        raise ResumeRefused(f"--ckpt_path {path} is not a loadable checkpoint ({problem})")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "hyper_parameters" not in checkpoint:
        raise ResumeRefused(f"--ckpt_path {path} is not a checkpoint of train.py (no hyper_parameters); "
                            "to start from a model's weights, give its folder as model.backbone")
    return {"hyper_parameters": dict(checkpoint.get("hyper_parameters") or {}),
            "datamodule_hyper_parameters": dict(checkpoint.get("datamodule_hyper_parameters") or {}),
            "global_step": checkpoint.get("global_step"),
            "datamodule_state": checkpoint.get(DATAMODULE_STATE),
            BACKBONE_IDENTITY: checkpoint.get(BACKBONE_IDENTITY)}


def check_recipe(path: str | Path, recorded: dict[str, Any], hparams: dict[str, Any],
                 backbone: dict[str, str], detected_preset: str, family: str | None = None) -> None:
    """Refuse to resume from a checkpoint of another recipe or another backbone, naming what differs
    (`detected_preset`: as `run_identity`)."""
    old_backbone = recorded.get(BACKBONE_IDENTITY) or backbone  # none recorded: checked when loading
    before = run_identity(recorded["hyper_parameters"], old_backbone, detected_preset, family)
    changes = identity_changes(before, run_identity(hparams, backbone, detected_preset, family))
    if changes:
        raise ResumeRefused(
            f"--ckpt_path {path} was trained with another recipe: {describe_changes(changes)}. Resume with "
            "its settings, or start a new run from the backbone (another trainer.default_root_dir, or "
            "--overwrite without --ckpt_path)")


def resume_changes(recorded: dict[str, Any], hparams: dict[str, Any], data_hparams: dict[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
    """The settings that differ from the checkpoint's, as {"model.lr": (old, new), "data.batch_size": ...}.
    The recipe (`RECIPE_KEYS`, and the data module's copy of the input format) is left out: `check_recipe`
    found it the same, only spelled otherwise."""
    changes = {f"model.{key}": change for key, change in
               identity_changes(recorded["hyper_parameters"], comparable(hparams)).items()
               if key.split(".")[0] not in RECIPE_KEYS}
    changes |= {f"data.{key}": change for key, change in
                identity_changes(recorded["datamodule_hyper_parameters"], comparable(data_hparams)).items()
                if not key.startswith("input_format.")}  # model.input_format's copy (linked by train.py)
    return changes
