"""python -m mme5.synthesis --config configs/synthesis/default.yaml [overrides] [--retry-failed]
[--mode online|batch] [--local-batch-command CMD] [--allow-model-change] [--overwrite] [--dry-run]"""

from __future__ import annotations

import argparse
import json
import sys

from mme5.files import OutputFolderError
from mme5.settings import command_parser
from mme5.synthesis.config import SynthesisConfig, estimate, planned_samples, read_settings
from mme5.synthesis.pipeline import run
from mme5.synthesis.plan import split, summary

# flag → (section, key); section None: a top-level setting
OVERRIDES = {
    "base_url": ("client", "base_url"), "model": ("client", "model"),
    "concurrency": ("client", "max_concurrency"), "mode": ("client", "mode"),
    "local_batch_command": ("client", "local_batch_command"),
    "num_samples": (None, "num_samples"), "images": (None, "images"), "out": (None, "out"),
    "seed": (None, "seed"), "embedder": (None, "embedder"), "shard": (None, "shard_index"),
    "num_shards": (None, "num_shards"), "retry_failed": (None, "retry_failed"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser(prog="python -m mme5.synthesis", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML settings (configs/synthesis/default.yaml)")
    parser.add_argument("--base-url")
    parser.add_argument("--model")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--images", help="image folder or list file")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--mode", choices=("online", "batch"),
                        help="online: one chat call per sample; batch: JSONL files through the Batch API "
                             "(half price, within 24 h) or --local-batch-command")
    parser.add_argument("--local-batch-command",
                        help='mode batch on one\'s own GPUs: a command with {input} and {output}, e.g. "vllm '
                             'run-batch -i {input} -o {output} --model M"')
    parser.add_argument("--seed", type=int)
    parser.add_argument("--embedder", help="model folder of the neighbour-image retrieval model")
    parser.add_argument("--shard", type=int, help="this job's index in a job-array split")
    parser.add_argument("--num-shards", type=int, help="jobs in the job-array split")
    parser.add_argument("--retry-failed", action="store_true", default=None,
                        help="re-attempt the ids recorded in failed.jsonl (a plain resume skips them)")
    parser.add_argument("--allow-model-change", action="store_true",
                        help="resume a folder with another --model than the one it was started with (each "
                             "answer row names its model)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a folder holding other output (its samples are lost once this run "
                             "completes); not for job-array parts")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan's mix and a token/cost estimate (online and batch prices)")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> SynthesisConfig:
    values = read_settings(args.config)
    values["client"] = dict(values.get("client") or {})
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            (values[section] if section else values)[key] = value
    return SynthesisConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
        if args.dry_run:
            plan = split(planned_samples(config), config.num_shards, config.shard_index)
            report = {"mix": summary(plan), "estimate": estimate(config, plan),
                      "model": config.client["model"]}
            print(json.dumps(report, indent=2, ensure_ascii=False))
            return 0
        result = run(config, overwrite=args.overwrite, allow_model_change=args.allow_model_change)
    except (OSError, ValueError, OutputFolderError) as error:  # bad settings or inputs, a folder refused
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "stopped" in result:  # the service or the disk failed: resume once it is fixed
        print(f"error: synthesis stopped: {result['stopped']}", file=sys.stderr)
        return 2
    if result["written"] == 0:
        print(f"error: no sample written ({result['failed']} failed: {result['failed_by_reason']})",
              file=sys.stderr)
        return 1
    return 0 if result["written"] + result["failed"] == result["planned"] else 1


if __name__ == "__main__":
    sys.exit(main())
