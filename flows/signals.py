"""Ctrl-C (SIGINT) and SIGTERM for the commands that run flows: `xbar add-task`, `xbar compare`, `xbar serve`.

`with stoppable("add-task"):` around the flow call. The first signal raises KeyboardInterrupt in the main
thread (the flow's own `finally` blocks run: params.yaml and dvc.lock restored, MLflow runs closed KILLED)
and silences Prefect's console log; then, within seconds:

1. every `dvc repro` this process started is stopped as Ctrl-C would (DVC releases its lock; flows/dvc.py);
2. flow parent runs still open in MLflow are closed KILLED, with their task runs (workflow/tracking.py);
3. the Prefect flow runs this process started end CANCELLED;
4. every process this one started is stopped -- the temporary Prefect server (run in its own process group,
   so that the terminal's Ctrl-C does not kill it before step 3), Dask workers, a served flow run --
5. one line on stderr, and the process exits 130 (SIGINT) or 143 (SIGTERM).

A second signal during these steps is ignored; they take at most STOP_S.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STOP_S = 20.0  # the cleanup's bound: then the process exits anyway
FLOW_RUNS: set[str] = set()  # Prefect flow runs started in this process (track_flow_run)
STOPPED_AT: list[float] = []  # when the signal came
HANDLER: list = []  # stoppable's signal handler while it is active
OPEN_PIPELINES: dict[str, dict] = {}  # pipeline key -> its XBAR_PIPELINE_RUN spec while the flow's parent run is open


def track_flow_run() -> None:
    """Called at a flow's start: the flow run to mark CANCELLED if this process is stopped. Under `stoppable`,
    SIGTERM is ours again: Prefect's engine takes it over for the flow (to crash the run), which would
    bypass the one-line stop."""
    from prefect.runtime import flow_run

    if flow_run.get_id():
        FLOW_RUNS.add(str(flow_run.get_id()))
    if HANDLER:
        try:
            signal.signal(signal.SIGTERM, HANDLER[0])
        except ValueError:  # not the main thread: Prefect's handler stays, the stop still happens
            pass


def server_in_own_group() -> None:
    """Start Prefect's temporary server in its own process group: the terminal's Ctrl-C reaches this process
    (which then records the cancellation through that server) but not the server, stopped last."""
    from prefect.server.api import server

    if getattr(server.SubprocessASGIServer._run_uvicorn_command, "xbar_own_group", False):
        return
    original = server.SubprocessASGIServer._run_uvicorn_command

    @functools.wraps(original)
    def run(self):  # noqa: ANN001, ANN202
        popen = subprocess.Popen
        subprocess.Popen = functools.partial(popen, process_group=0)  # type: ignore[misc]
        try:
            return original(self)
        finally:
            subprocess.Popen = popen  # type: ignore[misc]

    run.xbar_own_group = True  # type: ignore[attr-defined]
    server.SubprocessASGIServer._run_uvicorn_command = run


def _quiet_console() -> None:
    """Prefect's console handlers stop printing (its API log keeps everything): the user sees one line."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler):  # the console; Prefect's API handlers are not streams
                handler.setLevel(logging.CRITICAL + 1)


@contextmanager
def stoppable(what: str) -> Iterator[None]:
    """Run the block so that SIGINT or SIGTERM stops it within seconds, leaving nothing running."""
    received: list[int] = []

    def handler(signum: int, frame) -> None:  # noqa: ANN001
        if received:
            return  # cleanup is under way, bounded by STOP_S
        received.append(signum)
        STOPPED_AT.append(time.monotonic())
        _quiet_console()
        threading.Thread(target=_open_mlflow, daemon=True).start()  # while DVC stops: MLflow's 3-4 s overlap it
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    HANDLER.append(handler)
    server_in_own_group()
    try:
        yield
    except BaseException:
        if not received:
            raise
    finally:
        HANDLER.remove(handler)
        for sig, old in previous.items():
            signal.signal(sig, old if not received else signal.SIG_IGN)  # a second signal: cleanup goes on
    if received:  # raised, or swallowed by the block (Prefect's `serve` returns on KeyboardInterrupt)
        _stop_everything(what, received[0])


def _open_mlflow() -> None:
    """Import MLflow and open its store (cached per URI) for the runs the flow closes KILLED."""
    try:
        from workflow.tracking import tracker

        with tracker():
            pass
    except Exception:  # noqa: BLE001 (the flow's own close reports a store that is down)
        pass


def _stop_everything(what: str, signum: int) -> None:
    watchdog = threading.Timer(STOP_S, lambda: os._exit(128 + signum))
    watchdog.daemon = True
    watchdog.start()
    started = time.monotonic()
    from flows.dvc import stop_all

    stop_all()
    for key, spec in list(OPEN_PIPELINES.items()):  # a flow whose own `finally` did not run (a worker thread's)
        try:
            from workflow.tracking import close_flow_runs

            close_flow_runs(key, "KILLED", spec)
        except Exception:  # noqa: BLE001 (the store is down: the line below still says what happened)
            pass
    FLOW_RUNS.update(_stop_flow_run_processes())  # `serve`'s: each ends its own runs KILLED, then CANCELLED here
    _cancel_flow_runs(signal.Signals(signum).name)
    _stop_children()
    name, took = signal.Signals(signum).name, time.monotonic() - (STOPPED_AT[0] if STOPPED_AT else started)
    print(f"{what}: stopped by {name} in {took:.1f} s" + ("; the task was not added (params.yaml and dvc.lock as "
          "before; run the same command again to learn it)" if what == "add-task" else "; nothing left running"),
          file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(128 + signum)


def _cancel_flow_runs(name: str) -> None:
    if not FLOW_RUNS:
        return
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            for run_id in FLOW_RUNS:
                client.set_flow_run_state(run_id, Cancelled(message=f"stopped by {name}"), force=True)
    except Exception:  # noqa: BLE001 (no server: nothing to record it in)
        pass


def _stop_flow_run_processes(grace_s: float = 12.0) -> set[str]:
    """SIGTERM the flow-run processes this one started (a served run: Prefect's engine then unwinds it, its
    `finally` blocks stopping DVC and closing its MLflow runs); their flow run ids (PREFECT__FLOW_RUN_ID)."""
    import psutil

    runs, procs = set(), []
    for child in psutil.Process().children(recursive=True):
        try:  # `python -m prefect.engine` (its DVC inherits the variable: DVC is the engine's to stop)
            run_id = child.environ().get("PREFECT__FLOW_RUN_ID") if "prefect.engine" in child.cmdline() else None
        except psutil.Error:
            continue
        if run_id:
            runs.add(run_id)
            procs.append(child)
            try:
                child.terminate()
            except psutil.Error:
                pass
    psutil.wait_procs(procs, timeout=grace_s)
    return runs


def _stop_children() -> None:
    """Stop every descendant of this process (the temporary server last: it was needed until now)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception:  # noqa: BLE001
        pass
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def stopped_serving() -> None:
    """After `serve` returned: Prefect's runner takes SIGINT/SIGTERM over while it serves, cancels the runs it
    executes (each closes its MLflow runs KILLED) and returns; what it left running is stopped here, and
    the user reads one line."""
    _stop_children()
    print("serve: stopped (runs in progress cancelled); nothing left running", file=sys.stderr)
    sys.stderr.flush()
