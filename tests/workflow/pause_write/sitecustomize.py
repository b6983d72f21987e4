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
import importlib.util
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


if os.environ.get(PAUSE_WRITE_ENV):
    # the import hook the benchmarks' stage probe uses too, loaded by its path (tests/ -> the repository root)
    _hook = Path(__file__).resolve().parents[3] / "benchmarks" / "stage_probe" / "after_import.py"
    _spec = importlib.util.spec_from_file_location("xbar_test_after_import", _hook)
    _after_import = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_after_import)
    _after_import.wrap_after_import("workflow.io", "atomic_write_bytes", _pausing)
