"""Model merging: the weighted average of runs fine-tuned from one backbone, as one checkpoint.

    python -m mme5.merge --runs runs/a/last.ckpt runs/b/last.ckpt [--weights 0.7 0.3] --out merged/ab

`--out/model.ckpt` is a normal checkpoint: `python -m mme5.eval --model merged/ab/model.ckpt` scores it and
`python -m mme5.export --ckpt merged/ab/model.ckpt` exports it. Like an adapter-only checkpoint it holds only
what differs from the backbone (the weights some run changed), the rest being reloaded from the backbone.

What is averaged: each run's whole model, its adapters merged into the backbone's weights (a model soup,
Wortsman et al. 2022): W + sum_i w_i * delta_i, with delta_i = s * B_i A_i for a LoRA run (the runs may
differ in rank or targets) and the run's own merged weights minus W for DoRA or full fine-tuning. Averaging
the LoRA factors A and B separately ("LoRA souping") is not offered: sum_i w_i B_i times sum_i w_i A_i
is not the average of the deltas B_i A_i, i.e. not the average of the models.

The runs must share the backbone (its recorded identity: config and weights) and the input format; the
weights must be positive and are normalised to sum 1. A run named twice counts twice (as one run of the summed
weight); a merge is a run too, so merging it again weighs its runs by its weight times theirs. The merge is in
the first run's dtype (`model.dtype`). Runs are training checkpoints: an exported folder holds no recipe to
check, so merge the checkpoints it came from. `--out` is claimed as the other commands claim theirs
(`mme5.files.claim_folder`): the same runs and weights again find it complete, others are refused unless
`--overwrite`, and the checkpoint is written atomically.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mme5.backbones import DTYPES, load_backbone
from mme5.checkpoint import (
    BACKBONE_IDENTITY,
    EXPORT_CONFIG,
    MERGED_FROM,
    checkpoint_backbone,
    load_encoder,
    read_run_checkpoint,
    trained_on,
)
from mme5.files import OutputFolderError, claim_folder, path_fingerprint, remove_path, save_torch
from mme5.hub import local_model
from mme5.settings import command_parser

COMMAND = "mme5.merge"
CHECKPOINT = "model.ckpt"


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One positive finite weight per run, scaled to sum 1 (None: equal weights)."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"--weights: {len(weights)} weights for {count} runs; give one per run")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"--weights must be positive, got {list(weights)}")
    return [w / sum(weights) for w in weights]


def read_run(path: Path) -> dict[str, Any]:
    """A run checkpoint's recipe, read without its tensors (memory-mapped)."""
    if (path / EXPORT_CONFIG).is_file():
        raise ValueError(f"{path}: an exported model folder, not a checkpoint; merge the checkpoints (.ckpt) "
                         "it was exported from")
    return read_run_checkpoint(path)


def check_compatible(runs: Sequence[Path], checkpoints: Sequence[dict[str, Any]], backbone: str | None
                     ) -> None:
    """Refuse runs of different backbones (recorded identity, else the backbone folder's) or input formats,
    naming the first run and the one that differs."""
    def identity(path: Path, checkpoint: dict[str, Any]) -> dict[str, str]:
        found = trained_on(path, checkpoint, backbone)
        return {part: found.get(part) for part in ("config", "weights")}

    first, reference = runs[0], checkpoints[0]
    for path, checkpoint in zip(runs[1:], checkpoints[1:], strict=True):
        if identity(path, checkpoint) != identity(first, reference):
            raise ValueError(f"{first} and {path} were trained on different backbones "
                             f"({reference['hyper_parameters']['backbone']} and "
                             f"{checkpoint['hyper_parameters']['backbone']} differ in config or weights): "
                             "only runs of one backbone can be merged")
        ours, theirs = (c["hyper_parameters"].get("input_format") for c in (reference, checkpoint))
        if dict(ours or {}) != dict(theirs or {}):
            raise ValueError(f"{first} and {path} were trained with different input formats ({ours} and "
                             f"{theirs}): the merged model would have no one prompt format")


def merged_weights(runs: Sequence[Path], weights: Sequence[float], backbone: str | None, dtype: str | None,
                   trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """{backbone weight name: W + sum_i w_i (W_i - W)} for the weights some run changed, in the backbone's
    dtype; the sum is taken in float32, one run in memory at a time."""
    base_model = load_backbone(local_model(backbone or checkpoint_backbone(runs[0])),
                               DTYPES[dtype] if dtype else None).model
    base = base_model.state_dict()
    deltas: dict[str, torch.Tensor] = {}
    for path, weight in zip(runs, weights, strict=True):
        encoder = load_encoder(path, dtype=dtype, backbone=backbone, trust_checkpoint=trust_checkpoint
                               ).encoder
        model = encoder.model.merge_and_unload() if encoder.has_adapters else encoder.model
        for name, tensor in model.state_dict().items():
            if not torch.equal(tensor, base[name]):
                delta = tensor.float() - base[name].float()
                deltas[name] = deltas[name] + weight * delta if name in deltas else weight * delta
        del encoder, model
    return {name: (base[name].float() + delta).to(base[name].dtype) for name, delta in deltas.items()}


def merge(runs: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
          backbone: str | None = None, overwrite: bool = False, trust_checkpoint: bool = False) -> Path:
    """Write `out/model.ckpt`, the weighted average of `runs` (see the module docstring); returns its path."""
    runs, out = [Path(run) for run in runs], Path(out)
    if len(runs) < 2:
        raise ValueError(f"--runs: give at least two checkpoints to merge, got {len(runs)}")
    weights = normalised_weights(weights, len(runs))
    if backbone is not None and Path(backbone).is_file():
        raise ValueError(f"--backbone {backbone}: a file; give the backbone's folder (or hub id)")
    checkpoints = [read_run(run) for run in runs]
    check_compatible(runs, checkpoints, backbone)
    source = backbone or checkpoint_backbone(runs[0])
    identity = {"runs": [str(run.resolve()) for run in runs],
                "runs_files": [path_fingerprint(run) for run in runs], "weights": weights,
                "backbone": backbone and str(Path(backbone).resolve())}
    inputs = [p for p in (*runs, source) if p and Path(p).exists()]
    with claim_folder(out, COMMAND, identity, overwrite=overwrite, inputs=inputs,
                      ways_out="pass --overwrite to replace it, or choose another --out") as folder:
        if folder.was_complete:
            print(f"{out} already holds this merge (same runs and weights): nothing to write")
            folder.complete()
            return out / CHECKPOINT
        try:
            save_torch(folder.work / CHECKPOINT, merged_checkpoint(runs, checkpoints, weights, backbone,
                                                                   trust_checkpoint))
        except BaseException:
            if folder.state == "new":  # nothing to resume: a failed first merge leaves no folder
                remove_path(out)
            raise
        folder.complete()
    return out / CHECKPOINT


def merged_checkpoint(runs: Sequence[Path], checkpoints: Sequence[dict[str, Any]], weights: Sequence[float],
                      backbone: str | None, trust_checkpoint: bool) -> dict[str, Any]:
    """The checkpoint of the merged model: the first run's recipe without adapters (the Matryoshka sizes
    every run trained), the changed weights, and what was merged."""
    hparams = dict(checkpoints[0]["hyper_parameters"])
    weights_by_name = merged_weights(runs, weights, backbone, hparams.get("dtype"), trust_checkpoint)
    dims = [set(c["hyper_parameters"].get("matryoshka_dims") or ()) for c in checkpoints]
    common = [d for d in hparams.get("matryoshka_dims") or () if all(d in s for s in dims)]
    hparams |= {"lora": None, "matryoshka_dims": common or None, "matryoshka_weights": None}
    return {"state_dict": {f"encoder.model.{name}": tensor for name, tensor in weights_by_name.items()},
            "hyper_parameters": hparams,
            BACKBONE_IDENTITY: checkpoints[0].get(BACKBONE_IDENTITY),
            MERGED_FROM: [{"checkpoint": str(run.resolve()), "weight": weight, "global_step":
                           checkpoint.get("global_step")}
                          for run, weight, checkpoint in zip(runs, weights, checkpoints, strict=True)]}


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(prog="python -m mme5.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, type=Path, help="checkpoints (.ckpt) to merge")
    parser.add_argument("--weights", nargs="+", type=float,
                        help="one positive weight per run, normalised to sum 1 (default: equal)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write model.ckpt into")
    parser.add_argument("--backbone", help="backbone folder, when the runs' recorded one has moved")
    parser.add_argument("--overwrite", action="store_true", help="replace another merge in --out")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle checkpoints holding more than tensors and plain types")
    args = parser.parse_args(argv)
    try:
        path = merge(args.runs, args.out, args.weights, args.backbone, args.overwrite, args.trust_checkpoint)
    except (OutputFolderError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"merged: {path}")


if __name__ == "__main__":
    main()
