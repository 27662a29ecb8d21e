"""SIGTERM in a command that is not training: an exit that runs the command's clean-up.

Python's default for SIGTERM (`kill`, `scancel`, a SLURM job's time limit) ends the process at once, with no
`finally` block run. `python -m mme5.eval` keeps its embeddings in parts of `flush_every` items: killed so,
it loses up to that many items a rank. Under `sigterm_as_exit()` the signal raises `SystemExit(143)` (128 +
15, the status the default action gives) in the main thread, so the encoder's `finally` writes what it
computed since its last part and the output folder's lock is released; a second SIGTERM acts at once.
Training handles signals itself (`mme5.preemption`: a checkpoint at a step boundary).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_STATUS = 128 + signal.SIGTERM


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143); outside the main thread (where Python runs signal
    handlers) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the clean-up itself is not interrupted twice
        raise SystemExit(EXIT_STATUS)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
