"""Turns a training checkpoint into a standalone model folder that needs neither PEFT nor this repo's
Lightning code to load: LoRA/DoRA merged into the base weights, plus `mme5_embedding.json` saying how to
pool and normalise.

    python -m mme5.export --ckpt runs/x/last.ckpt --out exported/x [--dtype bfloat16]

The folder loads with `load_backbone(DIR)` (or any `AutoModelForImageTextToText`), with
`mme5.Embedder.from_pretrained(DIR)`, and with `python -m mme5.eval --model DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mme5.backbones import DTYPES
from mme5.checkpoint import load_encoder, write_export_config


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None, max_length: int | None = None,
           backbone: str | None = None, query_instruction: str = "", target_instruction: str = "",
           trust_checkpoint: bool = False) -> Path:
    """Merge the checkpoint's adapters into its backbone and write the model folder `out`; returns it.

    dtype: weights' dtype of the export (None: the dtype the checkpoint was trained in).
    max_length: text tokens per item (None: the training's input format's).
    backbone: folder to rebuild the encoder from, when the checkpoint's recorded one has moved.
    trust_checkpoint: see `mme5.checkpoint.load_encoder`.
    """
    ckpt, out = Path(ckpt), Path(out)
    if ckpt.suffix != ".ckpt":
        raise ValueError(f"{ckpt}: expected an EmbeddingModule checkpoint (.ckpt)")
    loaded = load_encoder(ckpt, dtype=dtype, max_length=max_length, backbone=backbone,
                          trust_checkpoint=trust_checkpoint)
    encoder = loaded.encoder
    model = encoder.model.merge_and_unload() if encoder.has_adapters else encoder.model
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    encoder.adapter.processor.save_pretrained(out)
    hparams = loaded.recipe.get("hyper_parameters") or {}
    lora = hparams.get("lora")
    source = {
        "checkpoint": str(ckpt.resolve()),
        "global_step": loaded.recipe.get("global_step"),
        "backbone": str(hparams.get("backbone")),
        "lora": dict(lora) if isinstance(lora, dict) else (vars(lora) if lora is not None else None),
    }
    write_export_config(out, encoder, model.dtype, {"query": query_instruction, "target": target_instruction},
                        source)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mme5.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="EmbeddingModule checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: the checkpoint's)")
    parser.add_argument("--max-length", type=int, help="text tokens per item (default: the training's)")
    parser.add_argument("--backbone", help="backbone folder, when the checkpoint's recorded one has moved")
    parser.add_argument("--query-instruction", default="", help="default instruction for queries")
    parser.add_argument("--target-instruction", default="", help="default instruction for targets")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle a .ckpt holding more than tensors and plain types (runs code from it)")
    args = parser.parse_args(argv)
    out = export(args.ckpt, args.out, args.dtype, args.max_length, args.backbone, args.query_instruction,
                 args.target_instruction, args.trust_checkpoint)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
