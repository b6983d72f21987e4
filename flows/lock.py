"""One pipeline run at a time per workspace: an exclusive file lock.

DVC refuses a second `dvc repro` in the same workspace (its own lock fails at
once), and two "add task" runs racing on params.yaml would both pick the same
`after`. So every flow (and through them the CLI) holds this lock around the
whole params-edit + `dvc repro` section; a second trigger waits for the first
instead of failing. `fcntl.flock` is released by the kernel when the holder
dies, so a crashed run never leaves a stale lock behind.

The lock is per open file, not per process: two threads of one process
serialize too, and a thread that already holds it must not take it again.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from xbar.errors import UserError

# Under .dvc/tmp: git-ignored, and next to DVC's own lock, which it guards.
LOCK_FILE = Path(".dvc") / "tmp" / "xbar-run.lock"
DEFAULT_TIMEOUT_S = 6 * 3600.0  # a default task trains for minutes; real-scale ones for hours
POLL_S = 0.5


class LockTimeout(UserError):
    """Another run kept the workspace for longer than we were willing to wait."""


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_FILE


@contextmanager
def workspace_lock(root: Path = Path("."), timeout_s: float = DEFAULT_TIMEOUT_S, holder: str = "xbar run",
                   on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the workspace's run lock; wait up to `timeout_s` for it, then raise LockTimeout.

    `holder` is written into the lock file so a waiting run can say who it waits for;
    `on_wait` is told once (with that text) when we have to wait.
    """
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": opening must not truncate the holder's note before we own the lock.
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path}: the workspace is busy ({_note(path)}) for more than "
                                      f"{timeout_s:.0f} s; try again when it has finished") from None
                if on_wait and not told:
                    on_wait(f"waiting for the workspace lock {path} ({_note(path)})")
                    told = True
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        try:
            f.seek(0)
            f.truncate()
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.write(f"{holder}, pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n")
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()  # an empty note = nobody holds it
            f.flush()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _note(path: Path) -> str:
    try:
        return path.read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"
