"""Test only: stop the write of one stage output half-way, so a test can `kill -9` the stage then.

test_kill_resume.py puts this folder first on the PYTHONPATH of `dvc repro` (so of every
`python -m stages.<name>` it starts) and sets XBAR_TEST_PAUSE_WRITE to an output's path as the
stage writes it (e.g. artifacts/tasks/t2/task.pt). Python imports this module at start-up; once
`workflow.io` is imported, its `atomic_write_bytes` writing that path runs as always (same temp
file beside the output, same name) but stops after half the bytes: flushed, `paused writing
<path>` printed on stderr, then asleep. Nothing in the project's code knows of this.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys
import time
from pathlib import Path

PAUSE_WRITE_ENV = "XBAR_TEST_PAUSE_WRITE"


def _pausing(atomic_write_bytes):  # noqa: ANN001, ANN202
    @functools.wraps(atomic_write_bytes)
    def write(path, data: bytes) -> None:  # noqa: ANN001
        if Path(path).as_posix() != os.environ[PAUSE_WRITE_ENV]:
            return atomic_write_bytes(path, data)
        fdopen = os.fdopen

        def open_then_pause(fd: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            f = fdopen(fd, *args, **kwargs)  # the temp file atomic_write_bytes just made
            f.write(data[: len(data) // 2])
            f.flush()
            print(f"xbar test: paused writing {path}", file=sys.stderr, flush=True)
            time.sleep(3600)  # the test kills the process here

        os.fdopen = open_then_pause
        try:
            return atomic_write_bytes(path, data)
        finally:
            os.fdopen = fdopen

    return write


class _PauseWrite(importlib.abc.MetaPathFinder):
    """Once `workflow.io` is executed, replace its `atomic_write_bytes` with a pausing one."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != "workflow.io":
            return None
        sys.meta_path.remove(self)
        spec = next(filter(None, (f.find_spec(name, path, target) for f in sys.meta_path
                                  if hasattr(f, "find_spec"))), None)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_pause(module) -> None:  # noqa: ANN001
            exec_module(module)
            module.atomic_write_bytes = _pausing(module.atomic_write_bytes)

        spec.loader.exec_module = exec_and_pause
        return spec


if os.environ.get(PAUSE_WRITE_ENV):
    sys.meta_path.insert(0, _PauseWrite())
