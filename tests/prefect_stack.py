"""A real Prefect stack for the slow tests (import: `from prefect_stack import ...`).

`running_stack(tmp)` makes a tiny git + DVC copy of the project (tests/project.py), starts
`prefect server start --host 127.0.0.1` on a free port with a temporary PREFECT_HOME (the UI
too, unless `ui=False`), then `xbar serve` in the project, and waits until the `new-task/add-task`
deployment is registered. Everything is stopped (process groups) when the block ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from project import TinyProject, make_tiny_project

DEPLOYMENT = "new-task/add-task"
SERVER_START_S = 240  # the first start migrates a fresh SQLite database
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, logs: list[Path], every_s: float = 1.0,
             procs: list[subprocess.Popen] = ()) -> T:
    """Poll `check` until it returns something; fail with the processes' log tails after `timeout_s`
    or as soon as one of `procs` (the server, the runner) has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a background process died while waiting for {what}\n{tails(logs)}")
        try:
            result = check()
        except Exception:  # noqa: BLE001 (not up yet)
            result = None
        if result is not None:
            return result
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails(logs)}")


def tails(logs: list[Path], n: int = 6000) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-n:]}" for p in logs if p.exists())


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A background process in its own process group (stopping it stops its children too)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0)


def stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@contextmanager
def running_stack(tmp: Path, serve_limit: int = 1, ui: bool = True,
                  prepare: Callable[[TinyProject], None] | None = None) -> Iterator[dict[str, Any]]:
    """Tiny project + Prefect server + `xbar serve --limit serve_limit`; `prepare` runs on the project first."""
    project = make_tiny_project(tmp / "project")
    if prepare is not None:
        prepare(project)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # PREFECT_API_URL in the server's environment also tells the UI where the API is
    prefect_env = {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"{url}/api",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    env = {**project.env, **prefect_env}
    logs = [tmp / "server.log", tmp / "serve.log"]
    procs: list[subprocess.Popen] = []
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        procs.append(start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                            "--port", str(port), *([] if ui else ["--no-ui"])], tmp, env, logs[0]))
        wait_for("the Prefect server", lambda: urllib.request.urlopen(f"{url}/api/health", timeout=5).status == 200
                 or None, SERVER_START_S, logs, procs=procs)
        timings["server_start_s"] = time.monotonic() - t0
        procs.append(start([sys.executable, "-m", "xbar.cli", "serve", "--limit", str(serve_limit)], project.root,
                           env, logs[1]))
        with settings(prefect_env):
            wait_for(f"deployment {DEPLOYMENT}", lambda: deployment(DEPLOYMENT), 180, logs, procs=procs)
        timings["serve_ready_s"] = time.monotonic() - t0
        yield {"project": project, "env": prefect_env, "url": url, "logs": logs, "timings": timings,
               "procs": procs, "cli_env": env}
    finally:
        for proc in reversed(procs):
            stop(proc)
        print(f"timings: {timings}")


def settings(values: dict[str, str]):  # noqa: ANN201
    """This test process talks to the test server, whatever the user's Prefect profile says."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: values["PREFECT_API_URL"],
                                       PREFECT_HOME: values["PREFECT_HOME"]})


def deployment(name: str):  # noqa: ANN201
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def final_state(flow_run_id):  # noqa: ANN001, ANN201
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state if state is not None and state.is_final() else None


def wait_final(stack: dict[str, Any], flow_run_id, timeout_s: float,  # noqa: ANN001, ANN201
               what: str = "the flow run"):
    with settings(stack["env"]):
        return wait_for(what, lambda: final_state(flow_run_id), timeout_s, stack["logs"], every_s=2,
                        procs=stack["procs"])


def mlflow_runs(project: TinyProject, filter_string: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    return client.search_runs([exp.experiment_id], filter_string) if exp else []


def learned_task(project: TinyProject, name: str):  # noqa: ANN201
    """The MLflow run of task `name`, which must have passed its gate under a FINISHED parent run."""
    children = mlflow_runs(project, f"tags.`xbar.kind` = 'task' AND tags.`xbar.task` = '{name}'")
    assert len(children) == 1, children
    child = children[0]
    assert child.data.tags["xbar.gate"] == "passed" and child.info.status == "FINISHED"
    assert "accuracy_at_learn" in child.data.metrics
    parents = mlflow_runs(project, f"attributes.run_id = '{child.data.tags['mlflow.parentRunId']}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return child, parents[0]
