"""Model references as local folders: a path as it is, a hub id through huggingface_hub's cache.

One resolver for every loader (backbones, checkpoints, exports), so a missing folder and an unreachable
hub id both fail with a message that says which it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Weights in other formats than the safetensors transformers loads (Llama's `original/*.pth`, ...).
_HUB_IGNORE = ["original/*", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx", "*.gguf"]


def card_licence(folder: Path) -> str | None:
    """The `license:` of a hub card's front matter (`folder/README.md`: a model's or a data set's), if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    parts = card.read_text(encoding="utf-8", errors="replace").split("---")
    match = re.search(r"^license:\s*(\S+)\s*$", parts[1] if len(parts) > 2 else "", re.MULTILINE)
    return match.group(1).strip("\"'") if match else None


def is_hub_id(value: str | None) -> bool:
    """`value` names a hub repository (`namespace/name`), not a path that exists here."""
    return bool(value) and bool(HUB_ID.fullmatch(value)) and not Path(value).exists()


def local_model(path_or_id: str | Path) -> Path:
    """`path_or_id` as a local path: an existing file or folder as is, a hub id (`namespace/name`, optionally
    `@revision`) as its snapshot folder, downloaded or found in the hub cache (`HF_HUB_OFFLINE=1`: cache
    only)."""
    path = Path(path_or_id)
    if path.exists():
        return path
    text = str(path_or_id)
    repo_id, _, revision = text.partition("@")
    if not HUB_ID.fullmatch(repo_id):
        raise FileNotFoundError(f"{text}: no such file or folder (nor a hub id namespace/name)")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, ignore_patterns=_HUB_IGNORE))
    except Exception as error:  # noqa: BLE001 - offline, unreachable, unknown repo: one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise FileNotFoundError(
            f"{text}: no such folder here, and as a hub id it could not be fetched nor found in the local "
            f"hub cache (HF_HUB_OFFLINE={offline}, cache {constants.HF_HUB_CACHE}): {type(error).__name__}. "
            f"Download it where there is network (`hf download {repo_id}`) and copy the cache, or pass the "
            "model folder") from None


def model_identity(path_or_id: str | Path) -> dict[str, str]:
    """What names a model before it is loaded or downloaded, for an output folder's identity: a local file or
    folder by its resolved path and its files' fingerprint, a hub id (`@revision` included) as written."""
    from mme5.files import path_fingerprint

    path = Path(path_or_id)
    if path.exists():
        return {"model": str(path.resolve()), "model_files": path_fingerprint(path)}
    return {"model": str(path_or_id)}
