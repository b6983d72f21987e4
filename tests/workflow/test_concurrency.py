"""Reliability (issue #8), 3: two `xbar add-task` at once are serialized by the workspace lock: both tasks learned."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from project import CLI, make_tiny_project


@pytest.mark.slow
def test_two_add_task_commands_at_once_are_serialized_and_both_learned(tmp_path: Path):
    project = make_tiny_project(tmp_path / "project")
    project.dvc("repro")  # the backbone (no task yet): the test's time goes to the two tasks
    env = {**project.env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    forms = {"alpha": ["--dataset", "optdigits", "--epochs", "1"],
             "beta": ["--dataset", "lfw_faces", "--epochs", "1", "--shift-levels", "1"]}
    procs = {name: subprocess.Popen([*CLI, "add-task", name, *args], cwd=project.root, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in forms.items()}
    outputs = {name: proc.communicate(timeout=900)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-6000:]}"
    assert any("waiting for the workspace lock" in o for o in outputs.values()), outputs  # one did wait

    from xbar.params import load_params

    params = load_params(project.params)  # valid, both tasks, chained in the order they were learned
    first, second = params.tasks
    assert {first, second} == set(forms)
    assert (params.tasks[first].after, params.tasks[second].after) == ("backbone", first)
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert {f"evaluate@{first}", f"evaluate@{second}"} <= set(lock["stages"])
    assert "up to date" in project.dvc("status").stdout  # dvc.lock matches the workspace
    t2 = project.root / "artifacts/tasks" / second
    meta = json.loads((t2 / "deployment.json").read_text())
    assert meta["tensors_sha256"] == hashlib.sha256((t2 / meta["tensors"]).read_bytes()).hexdigest()
    held = {s["task"] for s in meta["slots"] if s}
    assert meta["serving"] == second and second in held and held <= {first, second}
    row = json.loads((project.root / f"metrics/tasks/{second}/evaluate.json").read_text())
    assert row["accuracy"][first] == json.loads(
        (project.root / f"metrics/tasks/{first}/evaluate.json").read_text())["accuracy_at_learn"]

    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    for name in forms:
        runs = client.search_runs([exp.experiment_id], f"tags.`xbar.task` = '{name}'")
        assert len(runs) == 1 and runs[0].data.tags["xbar.gate"] == "passed" and runs[0].info.status == "FINISHED"
