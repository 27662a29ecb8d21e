"""Atomic writes: the target is the old file or the whole new one, never a part; leftovers are cleared."""

import json
import os

import pytest

from mme5.files import AtomicFile, atomic_write, files_fingerprint, remove_stale, write_json


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
