"""Does mining help? The demo recipe trained with no hard negatives, against the same recipe trained on
negatives mined with that first model (an ANCE-style second round), per seed; both scored on the demo
world's MMEB and XTD.

    python benchmarks/mining_gain.py --demo runs/demo [--seeds 0 1] [--steps 600] [--out runs/mining-gain]
        [--rank-band 10:50] [--margin 0.95] [--within task language]

Arms, each from the demo's untrained backbone with `configs/demo.yaml` (the seed sets `seed_everything` and
the data stream's seed):
  plain-s<seed>  the training shards with `data.num_negatives 0`: in-batch negatives only, as a user's
                 pairs without negatives would train;
  mined-s<seed>  shards mined from the same training shards by plain-s<seed>'s last checkpoint (`--replace`,
                 one per sample: the world's own designed negatives are not used), `data.num_negatives 1`
                 (`--within F...`: mined among samples sharing those fields, arm mined-F...-s<seed>).
The world's designed negatives (the demo itself, `<demo>/eval/trained`) are shown as a reference when
present. Every step is skipped when its output exists, so an interrupted run continues; scores go to
`<out>/scores/<arm>`, and the table is `mme5.eval.compare`'s (one row per arm).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arms import arm_folder, evaluate, paired_gain, run, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `make demo-data` folder")
    parser.add_argument("--out", type=Path, default=Path("runs/mining-gain"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rank-band", default="10:50")
    parser.add_argument("--margin", default="0.95")
    parser.add_argument("--within", nargs="+", default=[], help="mine --within these fields (task, ...)")
    args = parser.parse_args()
    demo, out = args.demo.resolve(), args.out.resolve()
    scored: list[Path] = []
    for seed in args.seeds:
        plain = arm_folder(out, f"plain-s{seed}", demo)
        plain_checkpoint = train(plain, seed, args.steps, "--data.num_negatives", "0")
        scored.append(evaluate(plain_checkpoint, demo, out / "scores" / plain.name))
        mined = arm_folder(out, "-".join(["mined", *args.within, f"s{seed}"]), demo)
        shards = mined / "shards"  # a finished mining run is left as it is
        run("-m", "mme5.data.mine", "--model", str(plain_checkpoint), "--shards",
            str(demo / "world" / "train"), "--out", str(shards), "--replace", "--max-negatives", "1",
            "--rank-band", args.rank_band, "--margin", args.margin,
            *(["--within", *args.within] if args.within else []))
        sources = json.dumps([{"path": str(shards)}])
        mined_checkpoint = train(mined, seed, args.steps, "--data.sources", sources,
                                 "--data.num_negatives", "1")
        scored.append(evaluate(mined_checkpoint, demo, out / "scores" / mined.name))
    reference = demo / "eval" / "trained" / "scores.json"
    if reference.exists():
        scored.append(reference.parent)
    run("-m", "mme5.eval.compare", *map(str, scored))
    mined_name = "-".join(["mined", *args.within])
    scores = out / "scores"
    print(paired_gain({f"s{seed}": ([scores / f"plain-s{seed}"], scores / f"{mined_name}-s{seed}")
                       for seed in args.seeds}, mined_name, "plain"))


if __name__ == "__main__":
    main()
