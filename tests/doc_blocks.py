"""The fenced code blocks of README.md and docs/*.md, with the section each sits in and its marker comment.

A `bash` block carries, on the line before its fence, either `<!-- run by tests/test_x.py::test_name -->`
(that test reads the block with `doc_commands(page, heading)` and runs its commands with `run_doc_commands`,
changed only where it says so) or `<!-- not run: why -->`; tests/test_docs.py enforces it, so a documented
command is either run or says why not.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\S*)\s*$")
HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")
MARKER = re.compile(r"^<!-- (run by (?P<test>\S+)|not run: (?P<why>.+?)) -->$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root: "docs/data.md"
    line: int  # 1-based line of the opening fence
    language: str
    heading: str  # the nearest heading above the block, without its #s
    marker: str | None  # the marker comment on the line before the fence, if any
    text: str


def pages() -> list[str]:
    """README.md and every page under docs/, as paths relative to the repository root."""
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def blocks(page: str) -> list[Block]:
    """Every fenced block of `page`; an unclosed fence is an error naming its line."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found, heading, i = [], "", 0
    while i < len(lines):
        if (title := HEADING.match(lines[i])) is not None:
            heading = title.group(2)
        elif (fence := FENCE.match(lines[i])) is not None:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{page}:{i + 1}: code block never closed")
            before = lines[i - 1].strip() if i > 0 else ""
            found.append(Block(page, i + 1, fence.group(1), heading, before if MARKER.match(before) else None,
                               "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return found


def doc_commands(page: str, heading: str) -> list[str]:
    """The commands of the one bash block under `heading` of `page`, one per (backslash-continued) line."""
    chosen = [b for b in blocks(page) if b.heading == heading and b.language == "bash"]
    if len(chosen) != 1:
        raise ValueError(f"{page}: {len(chosen)} bash blocks under heading {heading!r}, expected 1")
    return [line for line in chosen[0].text.replace("\\\n", " ").splitlines() if line.strip()]


ASSIGNMENT = re.compile(r"(?P<export>export )?(?P<name>[A-Za-z_]\w*)=(?P<value>\S*)")
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def repository_file(word: str) -> bool:
    """A word naming one of the repository's own files (train.py, configs/...), which a user runs from its
    root and a test from a folder of its own."""
    return word == "train.py" or word.startswith("configs/")


def run_doc_commands(commands: list[str], cwd: Path, env: dict[str, str] | None = None,
                     timeout: int = 600) -> list[str]:
    """Run `commands` in `cwd` as a user types them in a shell at the repository root, one process each:
    `python` is this interpreter, the repository's files are found from `cwd`, `NAME=value` sets a shell
    variable later lines read as `$NAME` and `export NAME=value` also passes it to the processes; `#`
    starts a comment. A failing command fails the test naming it and the end of its stderr; returns each
    command's stdout."""
    env = dict(os.environ if env is None else env)
    shell: dict[str, str] = {}
    outputs = []
    for command in commands:
        words = shlex.split(VARIABLE.sub(lambda m: {**env, **shell}[m[1] or m[2]], command), comments=True)
        if (assignment := ASSIGNMENT.fullmatch(" ".join(words))) is not None:
            shell[assignment["name"]] = assignment["value"]
            if assignment["export"]:
                env[assignment["name"]] = assignment["value"]
            continue
        argv = [sys.executable if word == "python" else str(ROOT / word) if repository_file(word) else word
                for word in words]
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (command, done.stderr[-3000:])
        outputs.append(done.stdout)
    return outputs
