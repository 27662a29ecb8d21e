"""Real faults against the checkpoint writer: a kill -9 in the middle of a write, and a full disk, on a
filesystem other than the temporary folder's (a tmpfs mounted here: the usual cluster layout). Needs root
to mount; skipped otherwise. The synthesis faults (a 401 server, an unreachable one, a full disk while
committing, kill -9 mid-run) are in test_synthesis_pipeline.py, against a real local HTTP server."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mme5.checkpoint import AtomicCheckpointIO, checkpoint_problem

WRITE = """
import sys, torch
from mme5.checkpoint import AtomicCheckpointIO
AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(int(sys.argv[2]))}, sys.argv[1])
"""


@pytest.fixture
def tmpfs(tmp_path, request):
    """A tmpfs (`request.param` in size, default 4 MiB) mounted under the test's folder, then unmounted."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    size = getattr(request, "param", "4m")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def good_checkpoint(path: Path) -> None:
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)


@pytest.mark.parametrize("tmpfs", ["512m"], indirect=True)
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_whole(tmpfs):
    target = tmpfs / "last.ckpt"
    good_checkpoint(target)
    # 240 MB written in a child (long enough to be caught in the act): killed as soon as its temporary file
    # appears beside the target
    child = subprocess.Popen([sys.executable, "-c", WRITE, str(target), str(60_000_000)],
                             env=os.environ | {"PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmpfs.glob(".last.ckpt.*.tmp")) and child.poll() is None:
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert checkpoint_problem(target) is None
    assert torch.load(target, weights_only=True)["step"] == 1  # the previous checkpoint, whole
    good_checkpoint(target)  # the next write clears the killed one's temporary file
    assert [p.name for p in tmpfs.iterdir()] == ["last.ckpt"]


def test_a_full_disk_fails_the_write_and_keeps_the_previous_checkpoint(tmpfs):
    target = tmpfs / "last.ckpt"
    good_checkpoint(target)
    with pytest.raises(OSError) as error:  # 8 MB into a 4 MiB filesystem
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(2_000_000)}, target)
    assert error.value.errno == 28  # ENOSPC, raised, not swallowed
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmpfs.iterdir()] == ["last.ckpt"]  # nothing half-written left behind
