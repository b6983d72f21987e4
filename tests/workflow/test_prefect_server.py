"""The Prefect path for real: a server on 127.0.0.1, `xbar serve`, runs triggered through the API as the UI does.

A tiny git + DVC copy of the project (tests/project.py) starts with no task;
two "add task" runs are triggered at once with form parameters, the served
runner starts both, the workspace lock makes the second wait, and each must end with its task in
MLflow (accuracy_at_learn, gate passed) under a FINISHED Prefect parent run.
Then the API must refuse an out-of-range form; a run for a name already used,
or with a dataset the server must not or cannot read, must fail with one line
without touching params.yaml; and Prefect's own CLI must work against the server.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prefect_stack import (DEPLOYMENT, final_state, learned_task, mlflow_runs, running_stack, settings, tails, wait_final,
                           wait_for)
from project import TinyProject, image_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # covers the module fixture's start-up too

RUN_S = 720  # both tasks on 2 CPU cores, backbone stages included (measured: about 140 s)


def _datasets(project: TinyProject) -> None:
    image_folder(project.root / "data" / "one", ["cat"])
    image_folder(project.root / "data" / "colour", ["cat", "dog"], mode="RGB")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Tiny project + Prefect server (no UI) + `xbar serve`, all torn down at the end."""
    # --limit 2: both runs start at once, so the workspace lock (not the runner) must serialize them.
    with running_stack(tmp_path_factory.mktemp("prefect"), serve_limit=2, ui=False, prepare=_datasets) as s:
        yield s


def test_two_tasks_added_from_the_api_are_learned_one_after_the_other(stack: dict[str, Any]):
    from prefect.deployments import run_deployment

    project: TinyProject = stack["project"]
    forms = [{"name": "digits", "dataset": "optdigits", "epochs": 1, "spare_ratio": 0.1, "shift_levels": 3},
             {"name": "faces", "dataset": "lfw_faces", "epochs": 1, "method": "xma2", "shift_levels": 1}]
    t0 = time.monotonic()
    with settings(stack["env"]):
        # What the UI's "Custom run" does: create a run of the deployment with the form's parameters.
        runs = [run_deployment(DEPLOYMENT, parameters=form, timeout=0) for form in forms]
    deadline = time.monotonic() + RUN_S  # one budget for both runs
    states = [wait_final(stack, r.id, deadline - time.monotonic(), f"flow run {r.name}") for r in runs]
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
        child, parent = learned_task(project, form["name"])
        assert parent.data.tags["xbar.kind"] == "pipeline" and parent.data.tags["xbar.trigger"] == "prefect"
        assert parent.data.tags["prefect.flow_run_id"] == str(run.id)
    later, _ = learned_task(project, second)
    assert f"acc/{first}" in later.data.metrics  # the earlier task was re-checked by the gate


def test_the_api_refuses_an_out_of_range_form(stack: dict[str, Any]):
    from prefect.deployments import run_deployment

    before = stack["project"].params.read_bytes()
    with settings(stack["env"]), pytest.raises(Exception, match="spare_ratio|less than or equal"):
        run_deployment(DEPLOYMENT, parameters={"name": "later", "dataset": "optdigits", "spare_ratio": 2.0},
                       timeout=0)
    assert stack["project"].params.read_bytes() == before


REFUSED = [  # (the form's dataset, what the run's state must say)
    ({"root": "data/missing"}, "data/missing is not a directory"),
    ({"root": "/etc"}, "outside the directories the server may read"),
    ({"root": "data/one"}, "has 1 class folder(s) with images"),
    ({"root": "data/colour"}, "has 3 channel(s) (RGB), but the dataset declares 1"),
    ({"name": "NoSuchSet", "root": "data"}, "'NoSuchSet' is not a torchvision.datasets class"),
]


def test_a_run_for_a_used_name_or_an_unreadable_dataset_fails_with_one_line_and_changes_nothing(
        stack: dict[str, Any]):
    from prefect.deployments import run_deployment

    from xbar.params import load_params

    project: TinyProject = stack["project"]
    learned = list(load_params(project.params).tasks)
    # The form's pattern cannot know which names are taken (or reserved): the flow refuses them.
    name, words = (learned[0], "already exists") if learned else ("backbone", "reserved")
    cases = [({"name": name, "dataset": "mnist5k"}, words)]
    cases += [({"name": "later", "dataset": dataset}, words) for dataset, words in REFUSED]
    before = project.params.read_bytes()
    lock_before = (project.root / "dvc.lock").read_bytes() if (project.root / "dvc.lock").exists() else None
    with settings(stack["env"]):
        runs = [run_deployment(DEPLOYMENT, parameters=form, timeout=0) for form, _ in cases]
    for run, (form, words) in zip(runs, cases):
        state = wait_final(stack, run.id, 300, f"the refused run {form}")
        message = state.message or ""
        assert state.is_failed() and words in message and "\n" not in message, (form, state)
    assert project.params.read_bytes() == before
    assert ((project.root / "dvc.lock").read_bytes() if lock_before is not None else None) == lock_before


def test_a_comparison_from_the_compare_form_shows_its_table_and_mlflow_link(stack: dict[str, Any]):
    """The `compare` deployment's form (methods, ratios, seeds) on the tasks learned above: the run's
    artifacts hold the comparison table (mean over the seeds, and each seed's) and the MLflow run's link."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    project: TinyProject = stack["project"]
    form = {"methods": ["piggyback", "xma2"], "ratios": [0.1], "seeds": [0, 1]}
    with settings(stack["env"]):
        with pytest.raises(Exception, match="dask_address|pattern"):  # the form checks what it can
            run_deployment("compare/compare", parameters={**form, "dask_address": "10.0.0.5"}, timeout=0)
        run = run_deployment("compare/compare", parameters=form, timeout=0)
    state = wait_final(stack, run.id, 600, "the comparison")
    assert state.is_completed(), f"{state.message}\n{tails(stack['logs'])}"
    with settings(stack["env"]), get_client(sync_client=True) as client:
        artifacts = {a.key: a.data for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}
    runs = mlflow_runs(project, "tags.`xbar.kind` = 'comparison'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["seeds"] == "0,1"
    run_id = runs[0].info.run_id
    assert "| xma2@10 " in artifacts["comparison"] and "| seed 1 |" in artifacts["comparison"]
    assert f"/#/experiments/{runs[0].info.experiment_id}/runs/{run_id})" in artifacts["comparison-mlflow-run"]


def _prefect(stack: dict[str, Any], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "prefect", *args], env={**stack["cli_env"], "COLUMNS": "200"},
                         cwd=stack["project"].root, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"prefect {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_prefects_own_cli_works_against_the_server(stack: dict[str, Any]):
    """`prefect deployment ls / run` and `prefect flow-run ls` (they send `limit: null`, which some
    fastapi versions refuse with 422: constraints.txt pins a set that accepts it)."""
    listed = _prefect(stack, "deployment", "ls")
    assert "new-task/add-task" in listed and "compare/compare" in listed
    created = _prefect(stack, "deployment", "run", DEPLOYMENT, "--param", "name=backbone", "--param",
                       "dataset=optdigits")  # a reserved name: the run is created, then refused at once
    run_id = created.split("UUID:")[1].split()[0]
    state = wait_final(stack, run_id, 300, "the run made by `prefect deployment run`")
    assert state.is_failed() and "reserved" in (state.message or "")
    assert run_id in _prefect(stack, "flow-run", "ls")


def test_sigterm_stops_serve_and_its_running_flow_with_one_line_and_nothing_left(stack: dict[str, Any]):
    """Last in this module (it stops the runner): SIGTERM to `xbar serve` while a served add-task run is in
    DVC: serve exits within a minute with its one line, its run ends CANCELLED with its MLflow parent run
    KILLED, params.yaml is as before, and no process it started is left."""
    import os
    import signal

    import psutil
    from prefect.deployments import run_deployment

    project: TinyProject = stack["project"]
    serve = stack["procs"][1]
    before = project.params.read_bytes()
    with settings(stack["env"]):
        run = run_deployment(DEPLOYMENT, parameters={"name": "stopped", "dataset": "optdigits", "epochs": 30},
                             timeout=0)
    log = stack["logs"][1]
    deadline = time.monotonic() + 300
    while "Running stage 'train_masks@stopped'" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and serve.poll() is None, tails(stack["logs"])
        time.sleep(0.5)
    started = psutil.Process(serve.pid).children(recursive=True)
    shown = len(log.read_text(errors="replace"))
    t0 = time.monotonic()
    os.kill(serve.pid, signal.SIGTERM)
    assert serve.wait(60) in (0, 143), tails(stack["logs"])  # Prefect's runner shuts down on its own: 0
    print(f"serve stopped in {time.monotonic() - t0:.1f} s")
    own = [ln for ln in log.read_text(errors="replace")[shown:].splitlines() if ln.startswith("serve: ")]
    assert len(own) == 1 and own[0].startswith("serve: stopped"), tails(stack["logs"])
    time.sleep(1)
    assert [c.pid for c in started if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
    with settings(stack["env"]):  # the server only: the runner is gone on purpose
        state = wait_for("the stopped run", lambda: final_state(run.id), 60, stack["logs"], procs=stack["procs"][:1])
    assert state.is_cancelled(), state
    (parent,) = mlflow_runs(project, f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert parent.info.status == "KILLED"
    assert project.params.read_bytes() == before
