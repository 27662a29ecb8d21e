"""Mine hard negatives for a converted source with any model the project loads (a plain backbone too).

    python -m mme5.data.mine --model M --shards data/shards/mine --out data/shards/mine-hardneg \\
        [--rank-band 10:50] [--max-negatives 3] [--margin 0.95 | --below-positive 0.1] \\
        [--min-positive-score 0.3 [--report-only]] [--within task language] [--append | --replace] \\
        [--num-negatives 3] [--overwrite]

The candidates are the source's distinct positives (by content: published string and image bytes) of the
sample's own target kind (text, image or image+text, so mined sides fit its modality) and, with `--within`,
of samples sharing its task, language or source (a mixed source mines each data set's negatives from that
data set, as the published hard negatives are). Every
query is embedded with its own side, every candidate with its; each query's neighbours among the candidates
(`mme5.retrieval.nearest`, the synthesis image index's component) are taken from the rank band, the
positives of its query (of every sample with its query) and anything with the content of the query or of
its own negatives left out, and a neighbour scoring at least `margin` × the positive's score is dropped as
a likely false negative (with `--below-positive δ` instead, Qwen3-VL-Embedding's rule: one scoring at least
the mean score of its query's positives + δ). Up to `max_negatives` mined sides are put before the sample's
own negatives (training reads the first `data.num_negatives` of the list: `--append` puts them after,
`--replace` drops the sample's own), and the samples are written to new shards with the mining settings,
the counts and the list positions the mined sides took in the manifest.

Positive refinement (`--min-positive-score t⁺`, Qwen3-VL-Embedding §3.3): a sample whose positive the mining
model scores at most t⁺ is likely label noise; it is left out of the output (`--report-only`: kept), and
either way named by id, source shard and row in `<out>/positive_refinement.jsonl`. Its positive stays a
candidate for the other queries (a document of the corpus), never for a query it is a positive of. A t⁺ that
leaves no sample stops the run (the list written) instead of writing an empty source. With `--max-negatives
0` it is the only thing done: the kept samples are written with their own negatives, nothing mined.

`--out` is claimed (`mme5.files.claim_folder`): a rerun of the same mining (source files, model, settings)
resumes, the embeddings saved under `<out>/.mining/` once computed and the shards after the last finished
one; other mining is refused unless `--overwrite` (written beside, swapped in when complete). A source with a
missing, truncated or unreadable shard stops the run naming the shard. The source's distinct positives are
held in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mme5.backbones import DTYPES, Item
from mme5.checkpoint import checkpoint_backbone
from mme5.data.collate import side_item
from mme5.data.schema import Sample, Side
from mme5.data.shards import MANIFEST, CorruptSample, ShardWriter, read_manifest, read_samples, shard_urls
from mme5.files import OutputFolderError, atomic_write, claim_folder, files_fingerprint, save_torch
from mme5.hub import model_identity
from mme5.retrieval import nearest
from mme5.settings import command_parser, number_at_least

Embed = Callable[[list[Item]], Tensor]
WORK = ".mining"
GROUP_FIELDS = ("source", "task", "language")  # what `--within` may keep candidates to
PLACEMENTS = ("first", "append", "replace")  # where mined negatives go in a sample's list
COMMAND = "mme5.data.mine"
REFINEMENT = "positive_refinement.jsonl"  # the samples below --min-positive-score, named


@dataclass(frozen=True)
class MiningSettings:
    """rank_band: 1-based ranks (inclusive) among a query's candidates, its own positive excluded.
    max_negatives: mined negatives added per sample. margin: a candidate scoring at least margin × the
    positive's score is taken for a false negative and dropped. placement: "first" (before the sample's own
    negatives, where the collator reads), "append" (after them) or "replace" (instead of them). within: only
    samples sharing these fields with the query's give candidates.
    min_positive_score: t⁺; a sample whose positive scores at most this is dropped (likely label noise), or
    only reported with `report_only`. below_positive: δ; a candidate is kept only if it scores below the mean
    score of its query's positives (of the samples kept) + δ. None: the rule is off; rules set together
    all apply."""

    rank_band: tuple[int, int] = (10, 50)
    max_negatives: int = 3
    margin: float | None = 0.95
    placement: str = "first"  # one of PLACEMENTS
    within: tuple[str, ...] = ()  # fields (GROUP_FIELDS) a candidate's sample shares with the query's
    min_positive_score: float | None = None
    report_only: bool = False
    below_positive: float | None = None

    def __post_init__(self) -> None:
        low, high = self.rank_band
        if not 1 <= low <= high:
            raise ValueError(f"rank_band must be low:high with 1 <= low <= high, got {low}:{high}")
        if unknown := set(self.within) - set(GROUP_FIELDS):
            raise ValueError(f"within: unknown field(s) {sorted(unknown)}; choose from "
                             f"{', '.join(GROUP_FIELDS)}")
        if self.max_negatives < (0 if self.min_positive_score is not None else 1):
            raise ValueError(f"max_negatives must be at least 1 (0 only with min_positive_score: refine the "
                             f"positives, mine nothing), got {self.max_negatives}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.report_only and self.min_positive_score is None:
            raise ValueError("report_only reports the samples below min_positive_score: set it too")
        # Scores are cosines in [-1, 1]: a threshold outside its range keeps or drops everything.
        for name, limit in (("min_positive_score", 1.0), ("below_positive", 2.0)):
            value = getattr(self, name)
            if value is not None and not -limit <= value <= limit:  # NaN too
                raise ValueError(f"{name} must be between {-limit} and {limit} (scores are cosines), got "
                                 f"{value}")

    def place(self, own: list[Side], mined: list[Side]) -> tuple[list[Side], range]:
        """A sample's negatives after mining, and the list positions the mined ones take."""
        if self.placement == "append":
            return [*own, *mined], range(len(own), len(own) + len(mined))
        return [*mined, *(own if self.placement == "first" else [])], range(len(mined))


def mining_identity(shards: Path, model: str | dict[str, Any], settings: MiningSettings,
                    shard_size: int) -> dict[str, Any]:
    """What defines a mining output (its folder's identity): the source's files, the model, the settings;
    flat, so that a refusal names the one key that differs. A setting added later is off as None (what an
    older folder's record reads as), so mining folders written before it resume."""
    return {"source": str(shards.resolve()), "source_files": files_fingerprint(source_files(shards)),
            **(model if isinstance(model, dict) else {"model": model}), **asdict(settings),
            "report_only": settings.report_only or None, "shard_size": shard_size}


def mine(shards: str | Path, out: str | Path, embed: Embed, model: str | dict[str, Any],
         settings: MiningSettings, shard_size: int = 1000, overwrite: bool = False) -> dict[str, Any]:
    """Write `shards`' samples with mined negatives to `out`; returns the new manifest.

    `model` names the model in the folder's identity (`mme5.hub.model_identity`); `embed` is called only when
    embeddings are not saved yet, so a resumed or complete output never loads the model."""
    shards, out = Path(shards), Path(out)
    check_separate(shards, out)
    check_source(shards)
    identity = mining_identity(shards, model, settings, shard_size)
    model_path = model["model"] if isinstance(model, dict) else model  # a local path, or a hub id
    inputs = [p for p in (shards, model_path, checkpoint_backbone(model_path)) if p]  # a .ckpt's backbone too
    with claim_folder(out, COMMAND, identity, overwrite=overwrite, inputs=inputs,
                      ways_out="pass --overwrite to mine it again, or choose another --out") as folder:
        work = folder.work
        if (work / MANIFEST).exists() and read_manifest(work)["complete"]:
            folder.complete()
            return read_manifest(work)
        samples = read_source(shards)
        candidates, positive_of = _candidates(samples)
        queries = _embedded(work / WORK / "queries.pt", embed, [side_item(s.query) for s in samples])
        pool = _embedded(work / WORK / "candidates.pt", embed, [side_item(side) for side in candidates])
        scores = positive_scores(queries, pool, positive_of)
        low = below_min_positive(scores, settings)
        dropped = set() if settings.report_only else set(low)
        kept = [i for i in range(len(samples)) if i not in dropped]
        chosen, counts = choose_negatives(queries, pool, samples, candidates, positive_of, settings, kept) \
            if settings.max_negatives else ([[] for _ in samples], Counter(samples=len(samples), mined=0))
        placed = {i: settings.place(samples[i].negatives, [candidates[j] for j in chosen[i]]) for i in kept}
        # {list position: mined negatives there}: training reads the positions below `data.num_negatives`
        positions = Counter(k for _, slots in placed.values() for k in slots)
        refinement = {}
        if settings.min_positive_score is not None:
            counts["positive_below_min_score"] = len(low)
            counts["dropped_for_positive_score"] = len(samples) - len(kept)
            write_low_positives(work / REFINEMENT, shards, samples, low, scores, kept)
            refinement = {"low_positives": REFINEMENT}
            if not kept:
                raise ValueError(nothing_left(shards, work / REFINEMENT, settings, scores))
        writer = ShardWriter(work, max_count=shard_size, resume=True, extra={"source": str(shards), "mined": {
            "model": model, **asdict(settings), "counts": dict(counts),
            "positions": {str(k): positions[k] for k in sorted(positions)}, **refinement}})
        with writer:
            for position in range(writer.resume_cursor or 0, len(kept)):
                index = kept[position]
                writer.write(replace(samples[index], negatives=placed[index][0]), cursor=position + 1)
        folder.complete(samples=len(samples), written=len(kept), mined=counts["mined"])
    return read_manifest(out)


def mined_within(manifest: dict[str, Any], num_negatives: int) -> int:
    """The mined negatives that a training reading the first `num_negatives` of each list uses."""
    return sum(n for k, n in manifest["extra"]["mined"]["positions"].items() if int(k) < num_negatives)


def source_files(shards: Path) -> list[Path]:
    """A source's manifest and shards (what mining reads)."""
    return [shards / MANIFEST, *map(Path, shard_urls(shards))]


def check_separate(shards: Path, out: Path) -> None:
    """Refuse an `out` that is, holds or lies inside the source: writing it would change what is read."""
    source, target = shards.resolve(), out.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise ValueError(f"--out {out} and --shards {shards} overlap; mine into a folder of its own")


def check_source(shards: Path) -> None:
    """Refuse, before anything is claimed, a source whose manifest is not complete or whose shards are missing
    or of another size than the manifest records (truncated or replaced)."""
    manifest = read_manifest(shards)
    if not manifest.get("complete"):
        raise ValueError(f"{shards}: the source's manifest is not marked complete (its conversion was "
                         "stopped before the end?); finish it first")
    for info in manifest["shards"]:
        path = shards / info["file"]
        if not path.is_file():
            raise ValueError(f"{path}: shard listed in the manifest is missing")
        if info.get("bytes") is not None and path.stat().st_size != info["bytes"]:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, the manifest records {info['bytes']} "
                             "(truncated or replaced); convert the source again")


def read_source(shards: Path) -> list[Sample]:
    """Every sample of the source, shard by shard; an unreadable shard or one holding fewer samples than its
    manifest counts stops the run naming it (a mining run never drops samples silently)."""
    samples: list[Sample] = []
    for info in read_manifest(shards)["shards"]:
        path = shards / info["file"]
        try:
            read = list(read_samples([str(path)], strict=True))
        except CorruptSample as error:
            raise ValueError(f"{path}: cannot be read ({error}); convert the source again") from None
        if len(read) != info["count"]:
            raise ValueError(f"{path}: {len(read)} samples read, the manifest counts {info['count']}; "
                             "convert the source again")
        samples += read
    return samples


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


def positive_scores(queries: Tensor, pool: Tensor, positive_of: Sequence[int]) -> Tensor:
    """Each sample's score for its own positive (cosine: the embeddings are normalised). (N,)"""
    return (queries.float() * pool[torch.as_tensor(list(positive_of), dtype=torch.long)].float()).sum(-1)


def below_min_positive(scores: Tensor, settings: MiningSettings) -> list[int]:
    """The samples whose positive scores at most t⁺: Qwen3-VL-Embedding keeps a query only if a positive
    scores above it (refines the labels), the rest being likely label noise."""
    if settings.min_positive_score is None:
        return []
    return [i for i, score in enumerate(scores.tolist()) if score <= settings.min_positive_score]


def nothing_left(shards: Path, listed: Path, settings: MiningSettings, scores: Tensor) -> str:
    """Why mining stops instead of writing a source of no samples (which training would refuse later)."""
    return (f"--min-positive-score {settings.min_positive_score}: every one of the {len(scores)} samples of "
            f"{shards} has its positive scored at most that (highest: {scores.max().item():.4f}), so none "
            f"would be left; they are listed in {listed}. Lower it, or add --report-only, with "
            "--overwrite")


def write_low_positives(path: Path, shards: Path, samples: Sequence[Sample], low: Sequence[int],
                        scores: Tensor, kept: Sequence[int]) -> None:
    """One JSON line per sample below t⁺: its id, source shard and row there, score, and whether it was
    dropped, so that a suspected label error can be looked up and fixed at its source."""
    rows = [(info["file"], row) for info in read_manifest(shards)["shards"] for row in range(info["count"])]
    written = set(kept)
    with atomic_write(path) as file:
        for i in low:
            file.write(json.dumps({"id": samples[i].id, "shard": rows[i][0], "row": rows[i][1],
                                   "positive_score": round(float(scores[i]), 6),
                                   "dropped": i not in written}, ensure_ascii=False) + "\n")


def choose_negatives(queries: Tensor, pool: Tensor, samples: Sequence[Sample], candidates: Sequence[Side],
                     positive_of: Sequence[int], settings: MiningSettings,
                     kept: Sequence[int] | None = None) -> tuple[list[list[int]], Counter]:
    """Per sample, the candidate indices mined as negatives (best first), and what was counted on the way.

    A sample's candidates are the positives of the samples of its own group: its target kind (an image
    target takes image negatives, so the mined sides fit its modality) and the `settings.within` fields;
    never a positive of its query (of any sample with the same query content). Only the `kept` samples
    (default: all) are mined for; every sample's positive is a candidate."""
    kept = range(len(samples)) if kept is None else kept
    chosen: list[list[int]] = [[] for _ in samples]
    counts: Counter = Counter(samples=len(samples))
    scores = positive_scores(queries, pool, positive_of)
    query_positives, query_means = _query_positives(samples, positive_of, scores, kept)
    groups = [(sample.modality.target, *(str(getattr(sample, name)) for name in settings.within))
              for sample in samples]
    pools: dict[tuple[str, ...], set[int]] = {}  # a group's candidates: the positives of all its samples
    for group, j in zip(groups, positive_of, strict=True):
        pools.setdefault(group, set()).add(j)
    asking: dict[tuple[str, ...], list[int]] = {}
    for i in kept:
        asking.setdefault(groups[i], []).append(i)
    for key in sorted(asking):
        rows = asking[key]
        original = sorted(pools[key])
        local = {j: row for row, j in enumerate(original)}
        index_of = {candidates[j].content_key(): row for row, j in enumerate(original)}
        excluded = []
        for i in rows:
            banned = {samples[i].query.content_key(), *(n.content_key() for n in samples[i].negatives)}
            excluded.append([*(local[j] for j in query_positives[i] if j in local),
                             *(index_of[k] for k in banned if k in index_of)])
        picks = _choose(queries[rows], pool[original], excluded, scores[rows], query_means[rows], settings,
                        counts)
        for i, local_picks in zip(rows, picks, strict=True):
            chosen[i] = [original[row] for row in local_picks]
    return chosen, counts


def _query_positives(samples: Sequence[Sample], positive_of: Sequence[int], scores: Tensor,
                     kept: Sequence[int]) -> tuple[list[set[int]], Tensor]:
    """Per sample, its query's positives (candidate indices, over every sample with that query content),
    and the mean score of the query's kept positives (Qwen3-VL-Embedding's s̄⁺; NaN for a query none of
    whose samples is kept)."""
    keys = [sample.query.content_key() for sample in samples]
    positives: dict[int, set[int]] = {}
    for key, j in zip(keys, positive_of, strict=True):
        positives.setdefault(key, set()).add(j)
    sums: dict[int, list[float]] = {}
    values = scores.tolist()
    for i in kept:
        sums.setdefault(keys[i], []).append(values[i])
    means = torch.tensor([sum(sums[key]) / len(sums[key]) if key in sums else float("nan") for key in keys])
    return [positives[key] for key in keys], means


def _choose(queries: Tensor, pool: Tensor, excluded: Sequence[Sequence[int]], own_scores: Tensor,
            query_means: Tensor, settings: MiningSettings, counts: Counter) -> list[list[int]]:
    """`choose_negatives` within one group: per query, the pool rows taken from its rank band that pass the
    false-negative rules (the margin on its own positive's score, δ on its query's mean positive score)."""
    low, high = settings.rank_band
    scores, indices = nearest(queries, pool, high, excluded)
    chosen = []
    for row in range(queries.shape[0]):
        picks = []
        for rank in range(low - 1, min(high, indices.shape[1])):
            j, score = int(indices[row, rank]), float(scores[row, rank])
            if j < 0:
                break
            if settings.margin is not None and score >= settings.margin * float(own_scores[row]):
                counts["dropped_as_false_negative"] += 1
                continue
            if settings.below_positive is not None and \
                    score >= float(query_means[row]) + settings.below_positive:
                counts["dropped_above_positive_mean"] += 1
                continue
            picks.append(j)
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
    parser = command_parser(prog="python -m mme5.data.mine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported folder, .ckpt, backbone folder or hub id")
    parser.add_argument("--shards", required=True, type=Path, help="converted source (a shard directory)")
    parser.add_argument("--out", required=True, type=Path, help="shard directory to write")
    parser.add_argument("--rank-band", default="10:50", help="ranks low:high to mine from (default: 10:50)")
    parser.add_argument("--max-negatives", type=int, default=3,
                        help="mined negatives per sample (0 with --min-positive-score: refine only)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--margin", type=number_at_least(0, float),
                      help="drop a neighbour scoring at least this times the positive's score (default: "
                           "0.95, unless --below-positive)")
    rule.add_argument("--below-positive", type=number_at_least(-2, float, at_most=2), metavar="DELTA",
                      help="instead of --margin: keep a neighbour only if it scores below the mean score of "
                           "its query's positives + DELTA (Qwen3-VL-Embedding)")
    parser.add_argument("--min-positive-score", type=number_at_least(-1, float, at_most=1), metavar="T",
                        help="drop a sample whose positive scores (cosine) at most T (likely label "
                             f"noise); listed in OUT/{REFINEMENT}")
    parser.add_argument("--report-only", action="store_true",
                        help="with --min-positive-score: keep those samples, only list them")
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument("--append", dest="placement", action="store_const", const="append",
                           default="first",
                           help="put mined negatives after the samples' own (default: before them, where "
                                "training reads its first data.num_negatives)")
    placement.add_argument("--replace", dest="placement", action="store_const", const="replace",
                           help="mined negatives replace the samples' own")
    parser.add_argument("--num-negatives", type=number_at_least(0), default=3, metavar="K",
                        help="report how many mined negatives a training with data.num_negatives K reads "
                             "(default: 3, the paper recipes'; configs/demo.yaml: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace another output in --out")
    parser.add_argument("--within", nargs="+", default=[], choices=GROUP_FIELDS, metavar="FIELD",
                        help="mine only among samples sharing these fields (source, task, language): "
                             "negatives from the query's own data set, as the published hard negatives")
    parser.add_argument("--batch-size", type=number_at_least(1), default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: the weights')")
    parser.add_argument("--shard-size", type=number_at_least(1), default=1000)
    args = parser.parse_args(argv)
    if args.report_only and args.min_positive_score is None:
        parser.error("--report-only reports the samples below --min-positive-score: give it too")
    low, _, high = args.rank_band.partition(":")
    margin = args.margin if args.margin is not None or args.below_positive is not None else 0.95
    try:
        settings = MiningSettings((int(low), int(high or low)), args.max_negatives, margin, args.placement,
                                  tuple(args.within), args.min_positive_score, args.report_only,
                                  args.below_positive)
    except ValueError as error:
        parser.error(f"--rank-band {args.rank_band!r} / --max-negatives: {error}")
    try:
        model = {**model_identity(args.model), "dtype": args.dtype}
        manifest = mine(args.shards, args.out, lazy_embed(args), model, settings, args.shard_size,
                        args.overwrite)
    except (OutputFolderError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = manifest["extra"]["mined"]["counts"]
    used = mined_within(manifest, args.num_negatives)
    print(json.dumps({"out": str(args.out), "samples": manifest["num_samples"], "counts": counts,
                      "read_by_training": {"num_negatives": args.num_negatives, "mined": used}}))
    if used < counts["mined"]:
        print(f"note: a training with data.num_negatives {args.num_negatives} reads {used} of the "
              f"{counts['mined']} mined negatives (it reads the first {args.num_negatives} of each sample's "
              "list; see the manifest's extra.mined.positions)", file=sys.stderr)
    if (listed := manifest["extra"]["mined"].get("low_positives")) is not None:
        print(f"note: {counts['positive_below_min_score']} samples' positive scored at most "
              f"{args.min_positive_score} ({counts['dropped_for_positive_score']} dropped); each is named "
              f"in {args.out / listed}", file=sys.stderr)
    return 0


def lazy_embed(args: argparse.Namespace) -> Embed:
    """`embed` with the model loaded at the first call: a resumed mining whose embeddings are saved, or a
    complete one, never loads (nor downloads) it."""
    encoders = []

    def embed(items: list[Item]) -> Tensor:
        if not encoders:
            from mme5.checkpoint import load_encoder

            encoders.append(load_encoder(args.model, args.device, args.dtype).encoder)
        return encoders[0].embed(items, args.batch_size, progress=True)

    return embed


if __name__ == "__main__":
    raise SystemExit(main())
