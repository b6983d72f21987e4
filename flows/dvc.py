"""DVC from the flows: the stage order, the `dvc repro` command lines, and one Prefect task that runs them.

DVC stays the only thing that decides whether a stage must run (its hashes in
dvc.lock); Prefect adds the run history, logs, retries and the UI form.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from workflow.tracking import PIPELINE_ENV, tracking_uri
from xbar.errors import UserError

TASKS_FOREACH = "${tasks}"  # dvc.yaml's per-task stages iterate over params.yaml's tasks
EX_TEMPFAIL = 75  # sysexits.h: a stage may exit with this to say "transient, try again"
# DVC's own messages when another DVC process holds the workspace: waiting helps.
DVC_BUSY = re.compile(r"Unable to acquire lock|is busy, it is being blocked by")
FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'")
EXIT_CODE = re.compile(r"exited with (-?\d+)")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")  # a traceback's last line
TAIL_LINES = 200


class StageFailed(Exception):
    """`dvc repro` failed; `str()` is one line naming the stage and its own error line."""

    def __init__(self, message: str, returncode: int, transient: bool = False, stage: str | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.transient = transient
        self.stage = stage  # the stage DVC names as failed, if it names one


def repro_command(*targets: str, single_item: bool = False) -> list[str]:
    """`dvc repro [--single-item] TARGET...` with this interpreter's DVC (no PATH lookup, no shell)."""
    return [sys.executable, "-m", "dvc", "repro", *(["--single-item"] if single_item else []), *targets]


def pipeline_order(dvc_yaml: Path, tasks: list[str]) -> list[str]:
    """Every stage of dvc.yaml in the order the continual flow runs them.

    Stages before the first per-task (foreach) stage are the backbone's; then,
    task by task in params order, each per-task stage as `<stage>@<task>`; then
    any plain stage written after the per-task ones (e.g. a report over all tasks).
    dvc.yaml lists stages in dependency order, which this keeps.
    """
    from ruamel.yaml import YAML, YAMLError  # DVC's own parser: YAML 1.2, unlike PyYAML

    try:
        stages = (YAML(typ="safe", pure=True).load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    except (OSError, YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{dvc_yaml}: not readable as DVC reads it ({first})") from None
    before: list[str] = []
    per_task: list[str] = []
    after: list[str] = []
    for name, stage in stages.items():
        if isinstance(stage, dict) and stage.get("foreach") == TASKS_FOREACH:
            per_task.append(name)
        elif isinstance(stage, dict) and "foreach" in stage:
            raise UserError(f"{dvc_yaml}: stage {name} iterates over {stage['foreach']!r}; "
                            f"the flows only know {TASKS_FOREACH!r}")
        else:
            (after if per_task else before).append(name)
    return before + [f"{stage}@{t}" for t in tasks for stage in per_task] + after


def stage_env(pipeline_run: str | None) -> dict[str, str]:
    """The environment of a `dvc repro` child.

    DVC runs each stage's `python -m stages...` through the shell's PATH: put this
    interpreter's directory first so the stages use the same environment even when
    the venv is not activated. The MLflow store is pinned to the flow's, and the
    flow's parent run (XBAR_PIPELINE_RUN) makes the tasks' runs children of it.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    env["PYTHONUNBUFFERED"] = "1"  # stage output reaches the flow's log as it happens
    if pipeline_run:
        env[PIPELINE_ENV] = pipeline_run
    else:
        env.pop(PIPELINE_ENV, None)
    return env


def error_line(lines: list[str], returncode: int) -> str:
    """The one line that says why DVC failed.

    The stage's own `error: ...` line (its user error or the gate) if it printed one;
    else the exception line of a crashed stage's traceback; else DVC's `ERROR: ...`.
    """
    dvc_at = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("ERROR:")), None)
    dvc = lines[dvc_at] if dvc_at is not None else ""
    stage_match, code_match = FAILED_STAGE.search(dvc), EXIT_CODE.search(dvc)
    before = lines[:dvc_at] if dvc_at is not None else lines
    own = next((ln.removeprefix("error:").strip() for ln in reversed(before) if ln.startswith("error:")), None)
    crash = next((ln.strip() for ln in reversed(before) if EXCEPTION_LINE.match(ln)), None)
    if stage_match and (own or crash):
        code = f" (exit {code_match.group(1)})" if code_match else ""
        return f"stage {stage_match.group(1)} failed{code}: {own or crash}"
    if dvc:
        return f"dvc: {dvc.removeprefix('ERROR:').strip()}"
    return f"dvc exited with {returncode} (no error line; see the log)"


def run_dvc(cmd: list[str], cwd: Path, env: dict[str, str], log: Callable[[str], None],
            timeout_s: float | None = None) -> None:
    """Run one DVC command, stream its output to `log`, raise StageFailed with one line on failure.

    DVC gets its own process group so that a timeout, a Ctrl-C or a Prefect
    cancellation (SIGTERM -> exception here) stops DVC *and* the stage it runs:
    an orphaned stage would keep writing outputs after the lock is released.
    """
    log("$ " + " ".join(["dvc", *cmd[3:]] if cmd[:3] == [sys.executable, "-m", "dvc"] else cmd))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    timed_out = threading.Event()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", process_group=0)
    except OSError as err:  # e.g. too many processes / files: worth a retry
        raise StageFailed(f"could not start dvc: {err}", -1, transient=True) from None
    RUNNING.add(proc)

    def expire() -> None:
        timed_out.set()
        _stop(proc)

    timer = threading.Timer(timeout_s, expire) if timeout_s else None
    try:
        if timer:
            timer.daemon = True
            timer.start()
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            if line.strip():
                log(line)
        returncode = proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            _stop(proc)
        RUNNING.discard(proc)
    if timed_out.is_set():
        raise StageFailed(f"{' '.join(cmd[3:])}: timed out after {timeout_s:.0f} s", returncode)
    if returncode != 0:
        lines = list(tail)
        transient = bool(DVC_BUSY.search("\n".join(lines))) or f"exited with {EX_TEMPFAIL}" in "\n".join(lines)
        failed = next((m.group(1) for ln in reversed(lines) if (m := FAILED_STAGE.search(ln))), None)
        raise StageFailed(error_line(lines, returncode), returncode, transient, failed)


RUNNING: set[subprocess.Popen] = set()  # the `dvc repro` processes of this process, for stop_all


def _stop(proc: subprocess.Popen) -> None:
    """Stop DVC's process group as Ctrl-C would (DVC then releases its lock and the stage's atomic writes
    drop their temp files), then SIGTERM, then SIGKILL: a few seconds at most."""
    for sig, grace_s in ((signal.SIGINT, 6.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_all() -> None:
    """Stop every `dvc repro` this process runs (a signal handler's cleanup: the flow may run them in
    worker threads, which an exception in the main thread does not reach)."""
    for proc in list(RUNNING):
        if proc.poll() is None:
            _stop(proc)


def retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 (Prefect's retry_condition_fn signature)
    """Retry only what waiting can fix (a busy DVC lock, a stage saying EX_TEMPFAIL, a failed start).

    A stage's user error (exit 2), a bug, or a failed no-forgetting gate fail the
    same way every time: retrying them only hides the first error.
    """
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:
        return False
    return False


@task(name="dvc-repro", task_run_name="dvc repro {label}", retries=2, retry_delay_seconds=[15, 60],
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def dvc_repro(label: str, cmd: list[str], root: str, pipeline_run: str | None = None,
              timeout_s: float | None = None) -> None:
    """One `dvc repro` as a Prefect task run (`label` names it in the UI)."""
    logger = get_run_logger()
    run_dvc(cmd, Path(root), stage_env(pipeline_run), logger.info, timeout_s)
