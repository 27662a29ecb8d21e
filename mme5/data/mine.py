"""Mine hard negatives for a converted source with any model the project loads (a plain backbone too).

    python -m mme5.data.mine --model M --shards data/shards/mine --out data/shards/mine-hardneg \\
        [--rank-band 10:50] [--max-negatives 3] [--margin 0.95] [--within task language]

The candidates are the source's distinct positives (by content: published string and image bytes) of the
sample's own target kind (text, image or image+text, so mined sides fit its modality) and, with `--within`,
of samples sharing its task, language or source (a mixed source mines each data set's negatives from that
data set, as the published hard negatives are). Every
query is embedded with its own side, every candidate with its; each query's neighbours among the candidates
(`mme5.retrieval.nearest`, the synthesis image index's component) are taken from the rank band, its own
positive and anything with its own or its positive's content left out, and a neighbour scoring at least
`margin` × the positive's score is dropped as a likely false negative. Up to `max_negatives` mined sides are
appended to the sample's own negatives, and the samples are written to new shards with the mining settings
and counts in the manifest.

Resumable: the embeddings are saved under `<out>/.mining/` once computed, and the shards resume after the
last finished one. The source's distinct positives are held in memory.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mme5.backbones import Item
from mme5.data.collate import side_item
from mme5.data.schema import Sample, Side
from mme5.data.shards import MANIFEST, ShardWriter, read_manifest, read_samples, shard_urls
from mme5.files import files_fingerprint, save_torch
from mme5.retrieval import nearest

Embed = Callable[[list[Item]], Tensor]
WORK = ".mining"
GROUP_FIELDS = ("source", "task", "language")  # what `--within` may keep candidates to


@dataclass(frozen=True)
class MiningSettings:
    """rank_band: 1-based ranks (inclusive) among a query's candidates, its own positive excluded.
    max_negatives: mined negatives added per sample. margin: a candidate scoring at least margin × the
    positive's score is taken for a false negative and dropped. replace: mined negatives replace the
    sample's own (they are appended otherwise). within: only samples sharing these fields with the query's
    give candidates."""

    rank_band: tuple[int, int] = (10, 50)
    max_negatives: int = 3
    margin: float = 0.95
    replace: bool = False  # the mined negatives replace the sample's own instead of following them
    within: tuple[str, ...] = ()  # fields (GROUP_FIELDS) a candidate's sample shares with the query's

    def __post_init__(self) -> None:
        low, high = self.rank_band
        if not 1 <= low <= high:
            raise ValueError(f"rank_band must be low:high with 1 <= low <= high, got {low}:{high}")
        if unknown := set(self.within) - set(GROUP_FIELDS):
            raise ValueError(f"within: unknown field(s) {sorted(unknown)}; choose from "
                             f"{', '.join(GROUP_FIELDS)}")
        if self.max_negatives < 1:
            raise ValueError(f"max_negatives must be at least 1, got {self.max_negatives}")


def mine(shards: str | Path, out: str | Path, embed: Embed, model_name: str, settings: MiningSettings,
         shard_size: int = 1000) -> dict[str, Any]:
    """Write `shards`' samples with mined negatives to `out`; returns the new manifest."""
    shards, out = Path(shards), Path(out)
    samples = list(read_samples(shard_urls(shards), strict=True))
    candidates, positive_of = _candidates(samples)
    job = files_fingerprint([shards / MANIFEST, *map(Path, shard_urls(shards))], model=model_name,
                            settings=repr(settings))
    if (out / MANIFEST).exists() and read_manifest(out).get("extra", {}).get("job") != job:
        raise FileExistsError(f"{out} holds shards of another mining run; choose another --out")
    if (out / MANIFEST).exists() and read_manifest(out)["complete"]:
        return read_manifest(out)
    queries = _embedded(out / WORK / f"queries-{job}.pt", embed, [side_item(s.query) for s in samples])
    pool = _embedded(out / WORK / f"candidates-{job}.pt", embed, [side_item(side) for side in candidates])
    chosen, counts = choose_negatives(queries, pool, samples, candidates, positive_of, settings)
    writer = ShardWriter(out, max_count=shard_size, resume=(out / MANIFEST).exists(),
                         extra={"job": job, "source": str(shards), "mined": {
                             "model": model_name, "rank_band": list(settings.rank_band),
                             "max_negatives": settings.max_negatives, "margin": settings.margin,
                             "replace": settings.replace, "within": list(settings.within),
                             "counts": dict(counts)}})
    start = writer.resume_cursor or 0
    with writer:
        for index in range(start, len(samples)):
            sample = samples[index]
            mined = [candidates[j] for j in chosen[index]]
            own = [] if settings.replace else sample.negatives
            writer.write(replace(sample, negatives=[*own, *mined]), cursor=index + 1)
    return read_manifest(out)


def _candidates(samples: Sequence[Sample]) -> tuple[list[Side], list[int]]:
    """The distinct positives, and each sample's positive's index among them."""
    index: dict[int, int] = {}
    candidates: list[Side] = []
    positive_of = []
    for sample in samples:
        key = sample.positive.content_key()
        if key not in index:
            index[key] = len(candidates)
            candidates.append(sample.positive)
        positive_of.append(index[key])
    return candidates, positive_of


def choose_negatives(queries: Tensor, pool: Tensor, samples: Sequence[Sample], candidates: Sequence[Side],
                     positive_of: Sequence[int], settings: MiningSettings) -> tuple[list[list[int]], Counter]:
    """Per sample, the candidate indices mined as negatives (best first), and what was counted on the way.

    A sample's candidates are the positives of the samples of its own group: its target kind (an image
    target takes image negatives, so the mined sides fit its modality) and the `settings.within` fields."""
    chosen: list[list[int]] = [[] for _ in samples]
    counts: Counter = Counter(samples=len(samples))
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, sample in enumerate(samples):
        key = (sample.modality.target, *(str(getattr(sample, name)) for name in settings.within))
        groups.setdefault(key, []).append(i)
    for key in sorted(groups):
        rows = groups[key]
        kept = sorted({positive_of[i] for i in rows})
        for row, picks in zip(rows, _choose(queries[rows], pool[kept], [samples[i] for i in rows],
                                            [candidates[j] for j in kept], kept,
                                            [positive_of[i] for i in rows], settings, counts), strict=True):
            chosen[row] = picks
    return chosen, counts


def _choose(queries: Tensor, pool: Tensor, samples: Sequence[Sample], candidates: Sequence[Side],
            original: Sequence[int], positive_of: Sequence[int], settings: MiningSettings,
            counts: Counter) -> list[list[int]]:
    """`choose_negatives` within one group: `original` maps this pool's rows to candidate indices."""
    local = {j: row for row, j in enumerate(original)}
    index_of = {side.content_key(): row for row, side in enumerate(candidates)}
    excluded = []
    for sample, own in zip(samples, positive_of, strict=True):
        banned = {sample.query.content_key(), *(n.content_key() for n in sample.negatives)}
        excluded.append([local[own], *(index_of[key] for key in banned if key in index_of)])
    low, high = settings.rank_band
    scores, indices = nearest(queries, pool, high, excluded)
    positives = pool[torch.as_tensor([local[j] for j in positive_of])]
    positive_scores = (queries.float() * positives.float()).sum(-1)
    chosen = []
    for row in range(len(samples)):
        picks = []
        for rank in range(low - 1, min(high, indices.shape[1])):
            j, score = int(indices[row, rank]), float(scores[row, rank])
            if j < 0:
                break
            if score >= settings.margin * float(positive_scores[row]):
                counts["dropped_as_false_negative"] += 1
                continue
            picks.append(original[j])
            if len(picks) == settings.max_negatives:
                break
        counts["mined"] += len(picks)
        counts["samples_short_of_max"] += len(picks) < settings.max_negatives
        chosen.append(picks)
    return chosen


def _embedded(path: Path, embed: Embed, items: list[Item]) -> Tensor:
    """The items' embeddings, computed once and kept at `path` (a rerun loads them)."""
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    embeddings = torch.nn.functional.normalize(embed(items).float(), dim=-1)
    save_torch(path, embeddings)
    return embeddings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mme5.data.mine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported folder, .ckpt, backbone folder or hub id")
    parser.add_argument("--shards", required=True, type=Path, help="converted source (a shard directory)")
    parser.add_argument("--out", required=True, type=Path, help="shard directory to write")
    parser.add_argument("--rank-band", default="10:50", help="ranks low:high to mine from (default: 10:50)")
    parser.add_argument("--max-negatives", type=int, default=3, help="mined negatives per sample")
    parser.add_argument("--margin", type=float, default=0.95,
                        help="drop a neighbour scoring at least this times the positive's score")
    parser.add_argument("--replace", action="store_true",
                        help="mined negatives replace the samples' own (default: appended after them)")
    parser.add_argument("--within", nargs="+", default=[], choices=GROUP_FIELDS, metavar="FIELD",
                        help="mine only among samples sharing these fields (source, task, language): "
                             "negatives from the query's own data set, as the published hard negatives")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the weights')")
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    low, _, high = args.rank_band.partition(":")
    try:
        settings = MiningSettings((int(low), int(high or low)), args.max_negatives, args.margin, args.replace,
                                  tuple(args.within))
    except ValueError as error:
        parser.error(f"--rank-band {args.rank_band!r} / --max-negatives: {error}")
    from mme5.checkpoint import load_encoder

    loaded = load_encoder(args.model, args.device, args.dtype)
    encoder = loaded.encoder

    def embed(items: list[Item]) -> Tensor:
        return encoder.embed(items, args.batch_size, progress=True)

    name = f"{args.model}:{loaded.fingerprint}"
    manifest = mine(args.shards, args.out, embed, name, settings, args.shard_size)
    print(json.dumps({"out": str(args.out), "samples": manifest["num_samples"],
                      "counts": manifest["extra"]["mined"]["counts"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
