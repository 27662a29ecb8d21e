"""README.md and docs/: every command block is run by a test that reads it or says why not, every relative
link and anchor resolves, and the README stays a ten-minute read."""

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest
from doc_blocks import MARKER, ROOT, Block, blocks, pages

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_LIMIT = 12_500  # characters: what this is, set-up, the demo's numbers, a map of docs/


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of `page`'s headings, a repeated one numbered as GitHub does (`x`, `x-1`, ...)."""
    counts: dict[str, int] = {}
    found = set()
    for line in re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S).splitlines():
        if (title := re.match(r"^#{1,6} (.+?)\s*$", line)) is not None:
            base = slug(title.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return found


def reads(test_file: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """The test functions of `test_file` and the (page, heading) pairs it passes to `doc_commands`."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    calls = {tuple(arg.value for arg in node.args) for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "doc_commands"
             and all(isinstance(arg, ast.Constant) for arg in node.args)}
    return functions, calls


def marker_problem(block: Block) -> str | None:
    """Why `block`'s marker is not acceptable, or None."""
    if block.marker is None:
        return "a bash block needs <!-- run by tests/test_x.py::test_name --> or <!-- not run: why --> above"
    test = MARKER.match(block.marker).group("test")
    if test is None:
        return None
    file, _, name = test.partition("::")
    if not (ROOT / file).is_file():
        return f"{file} does not exist"
    functions, calls = reads(ROOT / file)
    if name not in functions:
        return f"{file} has no test {name!r}"
    if (block.page, block.heading) not in calls:
        return f"{file} does not read it: no doc_commands({block.page!r}, {block.heading!r})"
    return None


ALL_BLOCKS = [block for page in pages() for block in blocks(page)]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: f"{b.page}:{b.line}")
def test_every_code_block_is_typed_and_every_bash_block_is_run_or_says_why(block):
    assert block.language, f"{block.page}:{block.line}: a code block without a language (bash, python, text)"
    if block.language == "bash":
        problem = marker_problem(block)
        assert problem is None, f"{block.page}:{block.line}: {problem}"


def test_the_own_data_commands_are_read_by_their_test():
    own = [b for b in ALL_BLOCKS if b.heading == "Your own data" and b.language == "bash"]
    assert len(own) == 1 and "run by tests/test_own_data.py::" in own[0].marker


@pytest.mark.parametrize("page", pages())
def test_relative_links_and_anchors_resolve(page):
    source = ROOT / page
    text = re.sub(r"```.*?```", "", source.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_the_readme_is_a_ten_minute_read():
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size <= README_LIMIT, f"README.md has {size} characters: move topic detail into docs/"


def test_the_marker_check_catches_a_missing_test_and_an_unread_block():
    block = Block("docs/data.md", 1, "bash", "Your own data", None, "")
    assert "needs" in marker_problem(block)
    missing = replace(block, marker="<!-- run by tests/test_own_data.py::nope -->")
    assert "has no test 'nope'" in marker_problem(missing)
    test = "test_the_docs_take_a_folder_of_pairs_to_a_trained_exported_model"
    unread = replace(block, heading="Elsewhere", marker=f"<!-- run by tests/test_own_data.py::{test} -->")
    assert "does not read it" in marker_problem(unread)


def test_anchors_follow_github():
    assert slug("Public rows → shards") == "public-rows--shards"
    assert slug("Is it learning? (`health/*`, `mme5/health.py`)") == "is-it-learning-health-mme5healthpy"
