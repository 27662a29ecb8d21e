"""Checks for settings read from configs and command lines: done while parsing, before a run writes anything,
so that a bad value is one clear message and not a hang, a raw TypeError or a secret saved to disk."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

SECRET_NAME = re.compile(r"(api[_-]?key|secret|password|token|credential)s?$", re.IGNORECASE)


def unknown_settings(values: dict[str, Any], known: set[str], section: str,
                     secret_hint: str = "pass it through the environment") -> None:
    """Refuse settings that are not `known`; a secret-looking one is told where it belongs instead."""
    unknown = sorted(set(values) - known)
    secrets = [name for name in unknown if SECRET_NAME.search(name)]
    if secrets:
        raise ValueError(f"{section}: {secrets} look like credentials; never put a key in a config (it would "
                         f"be saved with the run): {secret_hint}")
    if unknown:
        raise ValueError(f"{section}: unknown settings {unknown}; known: {sorted(known)}")


def at_least(settings: Any, bounds: dict[str, float]) -> None:
    """Each named setting that is set must be at least its bound."""
    for name, bound in bounds.items():
        value = getattr(settings, name)
        if value is not None and value < bound:
            raise ValueError(f"{name} must be at least {bound}, got {value!r}")


def positive(settings: Any, names: tuple[str, ...]) -> None:
    """Each named setting that is set must be above 0."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be above 0, got {value!r}")


def number_at_least(bound: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse `type`: a number of `kind` refused at parse time when below `bound` (`--shard-size 0`,
    `--max-negatives -1` would otherwise fail, or quietly do something else, mid-run)."""
    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError: argparse says "invalid int value"
        if value < bound:
            raise argparse.ArgumentTypeError(f"must be at least {bound}, got {value}")
        return value

    parse.__name__ = kind.__name__  # the name argparse gives the type in its messages
    return parse
