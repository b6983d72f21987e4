"""The Prefect path for real: a server on 127.0.0.1, `xbar serve`, runs triggered through the API as the UI does.

A tiny git + DVC copy of the project (tests/project.py) starts with no task;
two "add task" runs are triggered at once with form parameters, the served
runner starts both, the workspace lock makes the second wait, and each must end with its task in
MLflow (accuracy_at_learn, gate passed) under a FINISHED Prefect parent run.
Then the API must refuse an out-of-range form, and a run for a name already
used must fail without touching params.yaml.
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
from pathlib import Path
from typing import Any, TypeVar

import pytest
from project import TinyProject, make_tiny_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # covers the module fixture's start-up too

DEPLOYMENT = "new-task/add-task"
SERVER_START_S = 240  # the first start migrates a fresh SQLite database
RUN_S = 720  # both tasks on 2 CPU cores, backbone stages included (measured: about 140 s)
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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Tiny project + Prefect server + `xbar serve`, all torn down at the end."""
    tmp = tmp_path_factory.mktemp("prefect")
    project = make_tiny_project(tmp / "project")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    prefect_env = {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": api,
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    env = {**project.env, **prefect_env}
    logs = [tmp / "server.log", tmp / "serve.log"]
    procs: list[subprocess.Popen] = []
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        procs.append(start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                            "--port", str(port), "--no-ui"], tmp, env, logs[0]))
        wait_for("the Prefect server", lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200 or None,
                 SERVER_START_S, logs, procs=procs)
        timings["server_start_s"] = time.monotonic() - t0
        # --limit 2: both runs start at once, so the workspace lock (not the runner) must serialize them.
        procs.append(start([sys.executable, "-m", "xbar.cli", "serve", "--limit", "2"], project.root, env, logs[1]))
        with _settings(prefect_env):
            wait_for(f"deployment {DEPLOYMENT}", lambda: _deployment(DEPLOYMENT), 180, logs, procs=procs)
        timings["serve_ready_s"] = time.monotonic() - t0
        yield {"project": project, "env": prefect_env, "logs": logs, "timings": timings, "procs": procs}
    finally:
        for proc in reversed(procs):
            stop(proc)
        print(f"timings: {timings}")


def _settings(values: dict[str, str]):  # noqa: ANN202
    """This test process talks to the test server, whatever the user's Prefect profile says."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: values["PREFECT_API_URL"],
                                       PREFECT_HOME: values["PREFECT_HOME"]})


def _deployment(name: str):  # noqa: ANN202
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _final_state(flow_run_id):  # noqa: ANN001, ANN202
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state if state is not None and state.is_final() else None


def _mlflow_runs(project: TinyProject, filter_string: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    return client.search_runs([exp.experiment_id], filter_string) if exp else []


def test_two_tasks_added_from_the_api_are_learned_one_after_the_other(stack: dict[str, Any]):
    from prefect.deployments import run_deployment

    project: TinyProject = stack["project"]
    forms = [{"name": "digits", "dataset": "optdigits", "epochs": 1, "spare_ratio": 0.1, "shift_levels": 3},
             {"name": "faces", "dataset": "lfw_faces", "epochs": 1, "method": "xma2", "shift_levels": 1}]
    t0 = time.monotonic()
    with _settings(stack["env"]):
        # What the UI's "Custom run" does: create a run of the deployment with the form's parameters.
        runs = [run_deployment(DEPLOYMENT, parameters=form, timeout=0) for form in forms]
        deadline = time.monotonic() + RUN_S  # one budget for both runs
        states = [wait_for(f"flow run {r.name}", lambda r=r: _final_state(r.id), deadline - time.monotonic(),
                           stack["logs"], every_s=3, procs=stack["procs"])
                  for r in runs]
    stack["timings"]["two_tasks_s"] = time.monotonic() - t0
    assert all(s.is_completed() for s in states), f"{[s.message for s in states]}\n{tails(stack['logs'])}"

    from xbar.params import load_params

    params = load_params(project.params)
    first, second = params.tasks  # whichever run got the lock first was learned first
    assert {first, second} == {"digits", "faces"}
    assert (params.tasks[first].after, params.tasks[second].after) == ("backbone", first)
    assert project.params.read_text().startswith("# tiny test configuration")  # comments kept
    assert "waiting for the workspace lock" in stack["logs"][1].read_text()  # the second run did wait

    for run, form in zip(runs, forms):
        children = _mlflow_runs(project, f"tags.`xbar.kind` = 'task' AND tags.`xbar.task` = '{form['name']}'")
        assert len(children) == 1, children
        child = children[0]
        assert child.data.tags["xbar.gate"] == "passed" and child.info.status == "FINISHED"
        assert "accuracy_at_learn" in child.data.metrics
        parents = _mlflow_runs(project, f"attributes.run_id = '{child.data.tags['mlflow.parentRunId']}'")
        assert len(parents) == 1
        parent = parents[0]
        assert parent.data.tags["xbar.kind"] == "pipeline" and parent.data.tags["xbar.trigger"] == "prefect"
        assert parent.data.tags["prefect.flow_run_id"] == str(run.id)
        assert parent.info.status == "FINISHED"
    later = _mlflow_runs(project, f"tags.`xbar.task` = '{second}'")[0]
    assert f"acc/{first}" in later.data.metrics  # the earlier task was re-checked by the gate


def test_the_api_refuses_an_out_of_range_form(stack: dict[str, Any]):
    from prefect.deployments import run_deployment

    before = stack["project"].params.read_bytes()
    with _settings(stack["env"]), pytest.raises(Exception, match="spare_ratio|less than or equal"):
        run_deployment(DEPLOYMENT, parameters={"name": "later", "dataset": "optdigits", "spare_ratio": 2.0},
                       timeout=0)
    assert stack["project"].params.read_bytes() == before


def test_a_run_for_a_used_name_fails_and_changes_nothing(stack: dict[str, Any]):
    from prefect.deployments import run_deployment

    from xbar.params import load_params

    project: TinyProject = stack["project"]
    learned = list(load_params(project.params).tasks)
    # The form's pattern cannot know which names are taken (or reserved): the flow refuses them.
    name, words = (learned[0], "already exists") if learned else ("backbone", "reserved")
    before = project.params.read_bytes()
    lock_before = (project.root / "dvc.lock").read_bytes() if (project.root / "dvc.lock").exists() else None
    with _settings(stack["env"]):
        run = run_deployment(DEPLOYMENT, parameters={"name": name, "dataset": "mnist5k"}, timeout=0)
        state = wait_for("the refused run", lambda: _final_state(run.id), 300, stack["logs"], every_s=2,
                         procs=stack["procs"])
    assert state.is_failed() and words in (state.message or ""), state
    assert project.params.read_bytes() == before
    assert ((project.root / "dvc.lock").read_bytes() if lock_before is not None else None) == lock_before
