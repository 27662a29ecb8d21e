"""Checks for settings read from configs and command lines: done while parsing, before a run writes anything,
so that a bad value is one clear message and not a hang, a raw TypeError or a secret saved to disk."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
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


def number_at_least(bound: float, kind: type = int, at_most: float | None = None) -> Callable[[str], Any]:
    """An argparse `type`: a number of `kind` refused at parse time when below `bound`, above `at_most` or
    not finite (`--shard-size 0`, `--max-negatives -1`, `--margin nan` would otherwise fail, or quietly do
    something else, mid-run)."""
    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError: argparse says "invalid int value"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
        if value < bound or (at_most is not None and value > at_most):
            span = f"at least {bound}" if at_most is None else f"between {bound} and {at_most}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = kind.__name__  # the name argparse gives the type in its messages
    return parse


def utf8_path(text: str) -> Path:
    """An argparse `type`: a path refused at parse time when its name is not UTF-8 (bytes of another
    encoding), for commands that write it into UTF-8 files (model cards, manifests, configs): they failed
    after the work."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
        raise argparse.ArgumentTypeError(f"{shown} is not UTF-8 (a name in another encoding?); rename it, "
                                         "e.g. with convmv, or choose another") from None
    return Path(text)


def required_settings(values: dict[str, Any], cls: type, section: str) -> None:
    """Refuse `values` that leave out a field of dataclass `cls` without a default (a clear message instead of
    `__init__()`'s TypeError)."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{section}: missing settings {missing}")


def check_types(values: dict[Any, Any], cls: type, where: str) -> None:
    """Each value must fit the type its field of dataclass `cls` declares (`int`, `float`, `str`, `bool`,
    `X | None`, `list[X]`, `dict[K, V]`, `Any`), so that a config saying `num_samples: ten` or giving a
    mapping for a list is named with `where` (e.g. its file) and key, not a TypeError deep in a run.
    Unknown keys are left to `unknown_settings`."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not isinstance(name, str):
            raise ValueError(f"{where}: setting names are words, found {name!r}")
        if name in hints and not _fits(value, hints[name]):
            raise ValueError(f"{where}: {name}: expected {_describe(hints[name])}, found "
                             f"{type(value).__name__} {value!r}")


def _fits(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(key, args[0]) and _fits(item, args[1])
                                               for key, item in value.items())
    if expected is float:  # YAML writes 2.0 as 2
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any, plural: bool = False) -> str:
    """`an integer`, `a list of integers`, `a mapping of strings to numbers or null`, ..."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg, plural) for arg in args)
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {_describe(args[0], True)}"
    if origin is dict:
        mapping = "mappings" if plural else "a mapping"
        return f"{mapping} of {_describe(args[0], True)} to {_describe(args[1], True)}"
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
             bool: ("true or false", "true or false"), type(None): ("null", "null"),
             Any: ("anything", "values")}
    name = getattr(expected, "__name__", str(expected))
    return names.get(expected, (name, name))[plural]



def command_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """The argument parser of a project command: flags must be spelled out in full (argparse's default would
    take `--over` for `--overwrite`, and a misspelt prefix for whichever flag it starts)."""
    return argparse.ArgumentParser(allow_abbrev=False, **kwargs)
