"""Command-line checks of mme5.settings that several commands share."""

import os

import pytest

from mme5.backbones.tiny import main as tiny
from mme5.data.convert import main as convert
from mme5.data.mine import main as mine
from mme5.demo.world import main as demo
from mme5.export import main as export


@pytest.mark.parametrize("command, args", [(demo, []), (tiny, ["--family", "llava"]),
                                           (export, ["--ckpt", "unused.ckpt"])])
def test_an_out_whose_name_is_not_utf8_is_refused_at_parse_time(command, args, tmp_path, capsys):
    """These commands write --out's name into UTF-8 files (the demo's manifests, a model card): a name in
    another encoding failed after the work (a traceback for the demo, a half-written folder left)."""
    out = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")  # Latin-1 bytes: a surrogate escape in Python's str
    with pytest.raises(SystemExit) as exit_info:
        command([*args, "--out", out])
    assert exit_info.value.code == 2 and "caf\\udce9 is not UTF-8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, args", [
    (demo, ["--out", "x"]), (export, ["--ckpt", "x.ckpt", "--out", "x"]),
    (convert, ["--input", "x.jsonl", "--out", "x"]), (mine, ["--model", "m", "--shards", "s", "--out", "x"])])
def test_a_flag_must_be_spelled_out(command, args, capsys):
    """argparse's default takes a prefix for the flag it starts: `--overwrit` would replace an output."""
    with pytest.raises(SystemExit) as exit_info:
        command([*args, "--overwrit"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --overwrit" in capsys.readouterr().err
