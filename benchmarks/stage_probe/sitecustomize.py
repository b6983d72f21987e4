"""The stages' own figures for benchmarks/figures.py, measured from outside the stages.

figures.py puts this folder first on the PYTHONPATH of `xbar add-task` (so of DVC and of every
`python -m stages.<name>` it starts) and sets XBAR_BENCH_LOG to a file. Python imports this module
at start-up; in a stage process it then appends one JSON line to that file as the process exits:

    {"stage", "task", "seconds", "ended", "mlflow_seconds", "peak_rss_mb"}

`seconds` is the process's wall time since it started (interpreter and imports included); `ended`
the time it ended (epoch seconds: figures.py finds DVC's time between the stages from it);
`mlflow_seconds` the part spent in MLflow, timed around `workflow.tracking.retry`, which every
MLflow call (the import of mlflow included) goes through; `peak_rss_mb` the process's peak memory.
Other processes (the CLI, Prefect, DVC) write nothing. The project's code knows nothing of this.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time

from after_import import wrap_after_import  # this folder is on sys.path: Python found this module here

LOG_ENV = "XBAR_BENCH_LOG"
_mlflow_seconds = [0.0]
_written = [False]


def _timed(retry):  # noqa: ANN001, ANN202
    @functools.wraps(retry)
    def timed(*args, **kwargs):  # noqa: ANN202
        start = time.perf_counter()
        try:
            return retry(*args, **kwargs)
        finally:
            _mlflow_seconds[0] += time.perf_counter() - start

    return timed


def _stage() -> str | None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name if spec else ""
    return name.split(".", 1)[1] if name.startswith("stages.") else None


def _log() -> None:
    stage = _stage()
    if _written[0] or stage is None:
        return
    _written[0] = True
    import resource

    import psutil

    argv = sys.argv
    task = argv[argv.index("--task") + 1] if "--task" in argv[:-1] else None
    now = time.time()
    line = {"stage": stage, "task": task, "seconds": round(now - psutil.Process().create_time(), 3), "ended": now,
            "mlflow_seconds": round(_mlflow_seconds[0], 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    with open(os.environ[LOG_ENV], "a") as f:  # one short line per write: O_APPEND keeps lines whole
        f.write(json.dumps(line) + "\n")


def _exit_after_logging(exit_):  # noqa: ANN001, ANN202
    @functools.wraps(exit_)
    def exit_now(code: int) -> None:
        _log()
        exit_(code)

    return exit_now


if os.environ.get(LOG_ENV):
    wrap_after_import("workflow.tracking", "retry", _timed)
    atexit.register(_log)
    os._exit = _exit_after_logging(os._exit)  # a stage that succeeded skips the interpreter's teardown
