"""A task's attempt: from its first stage's start to its `evaluate`, kept on disk between the stage processes.

A task's MLflow run spans its stages, but its stages are separate processes started by DVC, and opening
MLflow costs each of them 3-4 s (import + store). So the stages record the attempt in a small file,
`.dvc/tmp/xbar-runs/<task>.json` (git-ignored, beside DVC's own lock), and the run is written once, when
the attempt ends, with the attempt's start as its start time (workflow/tracking.py `close_attempt`):

* `evaluate` ends it FINISHED (gate passed) or FAILED (gate failed);
* a stage that fails ends it FAILED at once, naming the stage;
* a stage killed mid-way (Ctrl-C, SIGTERM, kill -9) leaves the file naming a stage whose process is gone:
  the next stage of that task, or the flow that stopped it, ends it KILLED.

Nothing here imports MLflow: the file alone costs a stage milliseconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ATTEMPTS = Path(".dvc") / "tmp" / "xbar-runs"
PIPELINE_ENV = "XBAR_PIPELINE_RUN"  # the flow's parent run, see workflow/tracking.py


def attempt_path(task: str) -> Path:
    return ATTEMPTS / f"{task}.json"


def read_attempt(task: str) -> dict | None:
    try:
        return json.loads(attempt_path(task).read_text())
    except (OSError, ValueError):
        return None


def _write(task: str, attempt: dict) -> None:
    from workflow.io import write_json  # workflow.io imports torch; the CLI's readers of attempts need none

    write_json(attempt_path(task), attempt)


def process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (None: no such process): a pid with another start time is
    another process (pids are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            return "alive"
        return "alive"  # no /proc: liveness without the reuse check
    return stat.rsplit(")", 1)[1].split()[19]


def is_dead(attempt: dict) -> bool:
    """The attempt names a running stage whose process is gone: it was killed."""
    if not attempt.get("stage"):
        return False
    return not attempt.get("pid") or process_start(attempt["pid"]) != attempt.get("pid_start")


def ending(attempt: dict) -> tuple[str, str]:
    """(status, message) of an attempt that is over: FAILED with its stage's error, else KILLED."""
    if attempt.get("failed"):
        return "FAILED", attempt["failed"]
    return "KILLED", f"stage {attempt.get('stage') or '(between stages)'}@{attempt.get('task')} was stopped"


def dvc_invocation() -> tuple[str, int] | None:
    """The `dvc repro` process this stage runs under: ("<pid>-<start>", its start in epoch ms); None if
    none (a stage run by hand). Its parent run is that invocation's, ended by its last `evaluate`."""
    pid = os.getppid()
    for _ in range(4):  # dvc -> (sh -c) -> python -m stages...
        try:
            words = [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if "repro" in words and any(w == "dvc" or Path(w).name == "dvc" for w in words):
            start = process_start(pid) or "0"
            try:
                boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                            if ln.startswith("btime"))
                start_ms = int((boot + int(start) / os.sysconf("SC_CLK_TCK")) * 1000)
            except (OSError, ValueError, StopIteration):
                start_ms = int(time.time() * 1000)
            return f"{pid}-{start}", start_ms
        pid = int(stat[1])
        if pid <= 1:
            return None
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def stage_attempt(task: str, stage: str) -> Iterator[dict]:
    """Record `stage` of `task` as running for the duration of the block.

    Opens the attempt if none is open (this is the task's first stage); an attempt left by a killed stage
    is first closed KILLED. A stage that raises ends the attempt by who runs it:

    * under a flow (XBAR_PIPELINE_RUN): the file names the failed stage; the flow closes the run FAILED;
    * under `dvc repro`: the run (and that invocation's `dvc-pipeline` run) is closed FAILED here, naming it;
    * run by hand: the file is put back as it was -- a refused stage writes nothing (nor opens MLflow).

    An interrupt (KeyboardInterrupt, SystemExit) leaves the file as it is: the process is going, and whoever
    stopped it (the flow) or the next stage closes it KILLED.
    """
    path = attempt_path(task)
    before = path.read_bytes() if path.exists() else None
    attempt = read_attempt(task)
    if attempt is not None and is_dead(attempt):
        close_in_mlflow(task, *ending(attempt))
        attempt, before = None, None
    if attempt is None:
        attempt = {"task": task, "start_ms": now_ms(), "stages": [], "pipeline": os.environ.get(PIPELINE_ENV)}
    invocation = dvc_invocation()
    attempt.update(stage=stage, pid=os.getpid(), pid_start=process_start(os.getpid()),
                   invocation=invocation[0] if invocation else None)
    _write(task, attempt)
    try:
        yield attempt
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        _failed(task, stage, attempt, before, err)
        raise
    attempt = read_attempt(task)  # evaluate closed (and removed) it when it logged the task
    if attempt is not None:
        attempt["stages"] = [*attempt.get("stages", []), stage]
        attempt.update(stage=None, pid=None, pid_start=None)
        _write(task, attempt)


def _failed(task: str, stage: str, attempt: dict, before: bytes | None, err: BaseException) -> None:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    message = f"stage {stage}@{task} failed: {first}"
    if os.environ.get(PIPELINE_ENV):
        _write(task, {**attempt, "failed": message, "pid": None, "pid_start": None})
        return
    if dvc_invocation() is not None:
        close_in_mlflow(task, "FAILED", message)
        return
    path = attempt_path(task)
    if before is None:
        path.unlink(missing_ok=True)
    else:
        from workflow.io import atomic_write_bytes

        atomic_write_bytes(path, before)


def close_in_mlflow(task: str, status: str, message: str) -> None:
    """End the attempt as an MLflow run (workflow/tracking.py `close_attempt`), in a process of its own: a stage
    holds no MLflow code (its outputs do not depend on it, so neither do its DVC deps). Best effort: the store
    being down too, the stage's own error is the one to report, and the next stage retries."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "workflow.tracking", "close-attempt", task, status, message],
                   capture_output=True, timeout=300, check=False)


def remove_attempt(task: str) -> None:
    attempt_path(task).unlink(missing_ok=True)


def open_attempts(pipeline_key: str | None = None) -> list[dict]:
    """Every attempt on disk (of the flow whose parent run has `pipeline_key`, if given)."""
    out = []
    for path in sorted(ATTEMPTS.glob("*.json")) if ATTEMPTS.is_dir() else []:
        attempt = read_attempt(path.stem)
        if attempt is None:
            continue
        key = json.loads(attempt["pipeline"])["tags"].get("xbar.pipeline_key") if attempt.get("pipeline") else None
        if pipeline_key is None or key == pipeline_key:
            out.append(attempt)
    return out
