"""Files on disk: atomic writes (the target is the old file or the whole new one, never a part; leftovers are
cleared) and output folders with one owner (lock, record, resume or refuse, swap-in)."""

import json
import os

import pytest

from mme5.files import (
    UMASK,
    AtomicFile,
    FolderHoldsOtherOutput,
    FolderInUse,
    OutputFolderError,
    atomic_write,
    claim_folder,
    files_fingerprint,
    identity_changes,
    path_fingerprint,
    read_owner,
    remove_path,
    remove_stale,
    write_json,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_write(target) as file:
        file.write('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_commit_replaces_and_remove_stale_clears_interrupted_writes(tmp_path):
    target = tmp_path / "shard.tar"
    pending = AtomicFile(target, "wb")
    pending.file.write(b"half")
    assert not target.exists()  # nothing visible before commit
    interrupted = AtomicFile(tmp_path / "other.tar", "wb")  # as if the process died here
    interrupted.file.close()
    pending.file.write(b" and the rest")
    assert pending.commit() == target and target.read_bytes() == b"half and the rest"
    assert remove_stale(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]


def test_files_fingerprint_changes_with_a_rewritten_file_or_other_settings(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")
    first = files_fingerprint([a, b], dtype="float32")
    assert files_fingerprint([b, a], dtype="float32") == first  # order does not matter
    assert files_fingerprint([a, b], dtype="bfloat16") != first
    a.write_bytes(b"abcd")  # same size, rewritten
    os.utime(a, ns=(1, 1))
    assert files_fingerprint([a, b], dtype="float32") != first


# ----------------------------------------------------------------------------- output folders

def _claim(path, identity, **kwargs):
    return claim_folder(path, "mme5.test", identity, **kwargs)


def test_the_same_identity_resumes_and_another_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "out"
    with _claim(out, {"model": "a", "subsets": ["x", "y"]}) as folder:
        assert folder.state == "new" and folder.work == out
        (out / "part.txt").write_text("half")
    with _claim(out, {"model": "a", "subsets": ("x", "y")}) as folder:  # a tuple is the same list
        assert folder.state == "resume" and (out / "part.txt").read_text() == "half"
        assert not folder.was_complete
        folder.complete()
    with _claim(out, {"model": "a", "subsets": ["x", "y"]}) as folder:
        assert folder.state == "resume" and folder.was_complete
    with pytest.raises(FolderHoldsOtherOutput, match=r"model: \"a\" \(recorded\) → \"b\" \(now\)") as error:
        _claim(out, {"model": "b", "subsets": ["x", "y"]}, ways_out="pass --overwrite, or another --out")
    assert "subsets" not in str(error.value) and "another --out" in str(error.value)
    assert (out / "part.txt").read_text() == "half"  # nothing touched
    with pytest.raises(FolderHoldsOtherOutput, match="not of `mme5.other`"):
        claim_folder(out, "mme5.other", {"model": "a", "subsets": ["x", "y"]})
    assert not (tmp_path / ".out.lock").exists()  # every refusal released the lock


def test_a_folder_of_unrecorded_files_is_refused_and_an_empty_one_taken(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own")
    with pytest.raises(FolderHoldsOtherOutput, match=r"no mme5 command recorded .*notes.txt"):
        _claim(tmp_path / "mine", {})
    with pytest.raises(FolderHoldsOtherOutput, match="remove them yourself"):  # someone's data: never swapped
        _claim(tmp_path / "mine", {}, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own"
    (tmp_path / "empty").mkdir()
    with _claim(tmp_path / "empty", {}) as folder:
        assert folder.state == "new"


def test_overwrite_writes_beside_and_swaps_in_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with _claim(out, {"v": 1}) as folder:
        (out / "result.txt").write_text("one")
        folder.complete()
    with _claim(out, {"v": 2}, overwrite=True) as folder:
        assert folder.state == "replace" and folder.work != out
        (folder.work / "result.txt").write_text("two, half written")
    # Stopped before complete: the old output is whole, the replacement waits beside it.
    assert (out / "result.txt").read_text() == "one" and read_owner(out)["identity"] == {"v": 1}
    with _claim(out, {"v": 2}, overwrite=True) as folder:  # resumes the replacement
        assert (folder.work / "result.txt").read_text() == "two, half written"
        (folder.work / "result.txt").write_text("two")
        folder.complete(count=1)
    assert (out / "result.txt").read_text() == "two"
    record = read_owner(out)
    assert record["identity"] == {"v": 2} and record["complete"] and record["count"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swap_cut_between_its_renames_is_finished_or_undone(tmp_path):
    out = tmp_path / "out"
    for complete, expected in ((True, "new"), (False, "old")):
        remove_path(out)
        with _claim(out, {"v": "old"}) as folder:
            (out / "r").write_text("old")
            folder.complete()
        with _claim(out, {"v": "new"}, overwrite=True) as folder:
            (folder.work / "r").write_text("new")
            if complete:
                folder._write_record(complete=True)
        os.replace(out, tmp_path / ".out.replaced")  # the first rename of the swap, then the kill
        with _claim(out, {"v": expected}) as folder:
            assert folder.state == "resume" and (out / "r").read_text() == expected
        assert not (tmp_path / ".out.replaced").exists()


def test_train_style_outputs_are_removed_on_overwrite_and_the_rest_kept(tmp_path):
    run = tmp_path / "run"
    (run / "world").mkdir(parents=True)  # another command's output inside the run folder
    with _claim(run, {"lr": 1}, outputs=("checkpoints", "config.yaml")) as folder:
        assert folder.state == "new"
        (run / "checkpoints").mkdir()
        (run / "config.yaml").write_text("lr: 1")
    with pytest.raises(FolderHoldsOtherOutput, match="lr"):
        _claim(run, {"lr": 2}, outputs=("checkpoints", "config.yaml"))
    with _claim(run, {"lr": 2}, outputs=("checkpoints", "config.yaml"), overwrite=True) as folder:
        assert folder.state == "replace" and folder.work == run
    assert sorted(p.name for p in run.iterdir()) == [".mme5-owner.json", "world"]


HOLDER = """
import sys, time
from pathlib import Path
from mme5.files import claim_folder
folder = claim_folder(sys.argv[1], "mme5.holder", {})
Path(sys.argv[2]).write_text("held")
time.sleep(60)
"""


def test_a_live_holder_is_named_and_a_dead_ones_lock_taken_over(tmp_path):
    import subprocess
    import sys
    import time

    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready)])
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.05)
        with pytest.raises(FolderInUse, match=rf"pid {holder.pid} on host .* since .*mme5.holder"):
            claim_folder(out, "mme5.holder", {})
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=rf"took over the lock of pid {holder.pid} .* no longer runs"):
        folder = claim_folder(out, "mme5.holder", {})
    assert folder.state == "new"  # the holder wrote nothing
    folder.release()
    with claim_folder(out, "mme5.holder", {}):  # a released lock is no stale one
        pass


def test_path_fingerprint_follows_the_files_below_a_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"1")
    first = path_fingerprint(tmp_path / "m")
    assert path_fingerprint(tmp_path / "m") == first
    (tmp_path / "m" / "w.bin").write_bytes(b"22")
    assert path_fingerprint(tmp_path / "m") != first
    assert path_fingerprint(tmp_path / "gone") != path_fingerprint(tmp_path / "gone2")


def test_a_command_that_starts_afresh_refuses_its_own_earlier_output_unless_overwrite(tmp_path):
    with _claim(tmp_path / "out", {"v": 1}) as folder:
        (folder.work / "r").write_text("1")
    with pytest.raises(FolderHoldsOtherOutput, match="holds an earlier output of `mme5.test`; start anew"):
        _claim(tmp_path / "out", {"v": 1}, resume=False, ways_out="start anew")
    with _claim(tmp_path / "out", {"v": 1}, resume=False, overwrite=True) as folder:
        assert folder.state == "replace" and not (folder.work / "r").exists()


def test_path_fingerprint_ignores_the_owner_record(tmp_path):
    """Claiming a folder again rewrites its record; the output it fingerprints (e.g. an exported model that
    an evaluation names) is the same."""
    with _claim(tmp_path / "m", {}) as folder:
        (tmp_path / "m" / "w.bin").write_bytes(b"1")
        folder.complete()
    first = path_fingerprint(tmp_path / "m")
    with _claim(tmp_path / "m", {}) as folder:
        folder.complete(note="again")
    assert path_fingerprint(tmp_path / "m") == first


def test_an_output_from_before_owner_records_is_adopted_when_recognised(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"fingerprint": "abc"}')
    recognised = lambda path: json.loads((path / "manifest.json").read_text())["fingerprint"] == "abc"  # noqa: E731
    with _claim(out, {"v": 1}, adopt=recognised) as folder:
        assert folder.state == "resume" and read_owner(out)["identity"] == {"v": 1}
    (out / ".mme5-owner.json").unlink()
    with pytest.raises(FolderHoldsOtherOutput, match="no mme5 command recorded"):
        _claim(out, {"v": 1}, adopt=lambda path: False)


def test_a_path_that_is_not_utf8_is_recorded_escaped_and_the_lock_never_left(tmp_path):
    import sys

    name = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: a surrogate escape in Python's str
    argv = sys.argv
    sys.argv = ["mme5.test", "--out", name]
    try:
        with _claim(tmp_path / name, {"out": name}) as folder:
            assert folder.state == "new"
    finally:
        sys.argv = argv
    assert read_owner(tmp_path / name)["identity"] == {"out": name}
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no lock file left behind


def test_an_output_folder_that_is_a_file_or_holds_an_input_is_refused(tmp_path):
    (tmp_path / "data" / "set").mkdir(parents=True)
    (tmp_path / "data" / "set" / "rows.jsonl").write_text("{}\n")
    for out in (tmp_path / "data", tmp_path / "data" / "set", tmp_path / "data" / "set" / "rows.jsonl"):
        with pytest.raises(OutputFolderError, match="is or holds the input|is a file"):
            _claim(out, {}, overwrite=True, inputs=[tmp_path / "data" / "set"])
    assert (tmp_path / "data" / "set" / "rows.jsonl").read_text() == "{}\n"
    with _claim(tmp_path / "data" / "set" / "shards", {}, inputs=[tmp_path / "data" / "set"]) as folder:
        assert folder.state == "new"  # beside the inputs, inside their folder: fine


def test_a_folder_whose_lock_cannot_be_written_is_a_named_refusal(tmp_path):
    (tmp_path / "parent").write_text("a file where the lock's folder should be")
    with pytest.raises(OutputFolderError, match=r"cannot write .*parent/out or its lock beside it"):
        _claim(tmp_path / "parent" / "out", {})


def test_the_current_folder_is_claimed_by_its_absolute_path_and_never_swapped_away(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    with _claim(".", {"v": 1}) as folder:
        assert folder.path == tmp_path / "out" and (tmp_path / ".out.lock").is_file()
        (folder.work / "r").write_text("1")
    with pytest.raises(OutputFolderError, match="holds the current folder"):
        _claim(".", {"v": 2}, overwrite=True)
    assert (tmp_path / "out" / "r").read_text() == "1" and not (tmp_path / ".out.replacing").exists()


def test_atomic_files_get_the_permissions_open_would_give_them(tmp_path):
    write_json(tmp_path / "scores.json", {})
    assert (tmp_path / "scores.json").stat().st_mode & 0o777 == 0o666 & ~UMASK  # mkstemp alone: 0o600


def test_a_group_of_settings_is_compared_setting_by_setting_and_a_later_added_one_is_none(tmp_path):
    """A changed setting inside a group is named by its dotted key (not the whole group, cut to a width
    that may hide it); a setting added to the group after a folder was recorded is None there."""
    older = {"model.input_format": {"max_length": 64, "image_token": None}, "model.lora": None}
    added = {"model.input_format": {"max_length": 64, "image_token": None, "preset": None},
             "model.lora": None}
    other = {"model.input_format": {"max_length": 64, "image_token": None, "preset": "gme"},
             "model.lora": {"r": 8}}
    assert identity_changes(older, added) == {}
    assert identity_changes(older, other) == {"model.input_format.preset": (None, "gme"),
                                              "model.lora": (None, {"r": 8})}
    out = tmp_path / "out"
    with _claim(out, older):
        (out / "part.txt").write_text("half")
    with _claim(out, added) as folder:
        assert folder.state == "resume"
    with pytest.raises(FolderHoldsOtherOutput, match=r'model.input_format.preset: null \(recorded\) → "gme"'):
        _claim(out, other)
