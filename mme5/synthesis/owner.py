"""Who owns a synthesis output folder: a run's `--out`, or the part folder of one job-array task.

Each task of an array claims its own part folder (`<out>/part-<i>-of-<N>`), so the parts run at once, each
under its own lock; what they share at `<out>` (`plan.jsonl`, the embedding cache) is the same for every
part of one plan. The claim is made only if every other folder of the same `<out>` (the other parts, or a
single run's output) recorded the same identity: an array resubmitted with another `--num-shards` would
otherwise put an id into two parts and pay for it twice, and a resume with another model would mix two
models' answers without a word. `--allow-model-change` says that mix is wanted; the folder keeps the model
it was started with as its identity, and each answer row names the model that wrote it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mme5.files import (
    FolderHoldsOtherOutput,
    OutputFolder,
    OutputFolderError,
    claim_folder,
    comparable,
    describe_changes,
    identity_changes,
    read_owner,
)
from mme5.synthesis.config import SynthesisConfig

COMMAND = "mme5.synthesis"
WAYS_OUT = ("resume with the settings recorded, choose another --out, or pass --overwrite to replace what it "
            "holds (that is lost); a change of model alone goes on with --allow-model-change (each answer "
            "row names its model)")
PART = re.compile(r"part-(\d+)-of-(\d+)")

log = logging.getLogger(__name__)


def claim_output(config: SynthesisConfig, identity: dict[str, Any], *, overwrite: bool = False,
                 allow_model_change: bool = False) -> OutputFolder:
    """Lock and claim `config.work_dir` for `identity` (see `SynthesisConfig.output_identity`), after
    checking that the other folders of `config.out` hold the same plan. Raises `OutputFolderError` before
    anything is written."""
    out, work = Path(config.out), config.work_dir
    if out.exists() and not out.is_dir():  # (claim_folder checks `work`, which is below it for a part)
        raise OutputFolderError(f"--out {out} is a file; the output goes into a folder")
    if overwrite and work != out:
        raise OutputFolderError(f"--overwrite replaces one folder, and the parts of a job array share {out} "
                                f"(its plan.jsonl): remove {out}, or choose another --out")
    others = other_records(out, work)
    if allow_model_change:
        identity = _with_recorded_model(identity, [read_owner(work) or {}, *others.values()])
    if not overwrite:  # overwriting a run's --out replaces its part folders too
        for folder, record in others.items():
            _check_same_plan(out, folder, record, identity)
    return claim_folder(work, COMMAND, identity, overwrite=overwrite, ways_out=WAYS_OUT,
                        adopt=lambda folder: written_before_records(folder, config),
                        inputs=[path for path in (config.images, config.embedder) if path is not None])


def written_before_records(folder: Path, config: SynthesisConfig) -> bool:
    """Whether `folder` is this command's output of `config` from before owner records: its `config.json`
    holds the same settings that define the output, with the same image and embedder paths (their content
    at the time cannot be checked now)."""
    try:
        recorded = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and _as_run(recorded, config) == _as_run(asdict(config), config)


def _as_run(values: dict[str, Any], config: SynthesisConfig) -> dict[str, Any]:
    """The identity's keys as a run's `config.json` holds them (paths for the images and embedder)."""
    client = values.get("client") if isinstance(values.get("client"), dict) else {}
    return comparable({key: client.get("model") if key == "model" else values.get(key)
                       for key in config.output_identity(None, None)})


def other_records(out: Path, work: Path) -> dict[Path, dict[str, Any]]:
    """The owner records of the folders of `out` other than `work`: its part folders, and `out` itself when
    `work` is a part. A part folder from before owner records tells its `num_shards` by its name."""
    records = {}
    for folder in sorted(out.glob("part-*-of-*")) + ([out] if work != out else []):
        if folder == work or not folder.is_dir():
            continue
        record = read_owner(folder)
        name = PART.fullmatch(folder.name)
        if record is None and name and folder != out:
            record = {"command": COMMAND, "identity": {"num_shards": int(name[2])}}
        if record is not None:
            records[folder] = record
    return records


def _check_same_plan(out: Path, folder: Path, record: dict[str, Any], identity: dict[str, Any]) -> None:
    if record.get("command") != COMMAND:
        raise FolderHoldsOtherOutput(f"{folder} holds the output of `{record.get('command')}`, not of "
                                     f"`{COMMAND}`; choose another --out")
    recorded = record.get("identity", {})
    changes = identity_changes(recorded, {key: identity.get(key) for key in recorded})
    if changes:
        raise FolderHoldsOtherOutput(
            f"{folder} holds synthesis output of other settings, and every part of {out} must share one "
            f"plan: {describe_changes(changes)}; resubmit with the settings recorded, or choose another "
            f"--out")


def _with_recorded_model(identity: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """`identity` naming the model the folder was started with, so that the claim goes on with another."""
    recorded = next((r["identity"]["model"] for r in records if r.get("identity", {}).get("model")), None)
    if recorded is None or recorded == identity["model"]:
        return identity
    log.warning("going on with model %s in a folder started with %s (--allow-model-change); each answer row "
                "names its model", identity["model"], recorded)
    return {**identity, "model": recorded}
