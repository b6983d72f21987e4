"""Reliability (issue #8), 2: `kill -9` half-way through writing a stage output, then `dvc repro` again.

The killed task completes, the earlier task and the backbone stay byte-identical, a torn temp
file never becomes the output and is cleaned up, the deployment state is consistent.

The write is stopped half-way from the test side: pause_write/sitecustomize.py, on the PYTHONPATH
of `dvc repro` and so of every stage process it starts, wraps `workflow.io.atomic_write_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from project import ROOT, TinyProject, make_tiny_project, tree_digest

PAUSE_WRITE = Path(__file__).resolve().parent / "pause_write"  # holds the sitecustomize.py that pauses a write
PAUSE_WRITE_ENV = "XBAR_TEST_PAUSE_WRITE"  # the output (path as the stage writes it) whose write pauses


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def _kill_while_writing(project: TinyProject, target: str, log: Path, timeout_s: float = 400) -> None:
    """`dvc repro` with the write of `target` stopped half-way (pause_write/); kill -9 its process group."""
    path = os.pathsep.join(filter(None, [str(PAUSE_WRITE), str(ROOT), project.env.get("PYTHONPATH")]))
    env = {**project.env, "PYTHONPATH": path, PAUSE_WRITE_ENV: target}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project.root, stdout=out,
                                stderr=subprocess.STDOUT, env=env, process_group=0)
    try:
        deadline = time.monotonic() + timeout_s
        while f"paused writing {target}" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dvc repro never reached the write of {target}:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)  # reaped: DVC's rwlock sees a dead pid, not a zombie


@pytest.mark.slow
def test_kill_9_mid_write_then_rerun_completes_the_task_and_keeps_earlier_bytes(tmp_path: Path):
    project = make_tiny_project(tmp_path / "project", {"t1": {}, "t2": {"method": "xma2", "shift_levels": 1}})
    project.dvc("repro", "evaluate@t1")
    root = project.root
    earlier = ("artifacts/backbone", "artifacts/mapping", "artifacts/tasks/backbone", "artifacts/tasks/t1",
               "metrics/tasks/t1")

    def earlier_bytes() -> dict[str, str]:
        return {f"{d}/{k}": v for d in earlier for k, v in tree_digest(root / d).items()}

    before = earlier_bytes()
    t2 = root / "artifacts/tasks/t2"
    # train_masks@t2 killed half-way through task.pt; program_spares@t2 killed after deployment.pt,
    # half-way through deployment.json (the deployment state's two files out of step).
    for target in ("artifacts/tasks/t2/task.pt", "artifacts/tasks/t2/deployment.json"):
        _kill_while_writing(project, target, tmp_path / "killed.log")
        assert not (root / target).exists()  # the torn bytes never reached the real name
        torn = [p for p in _temps(t2) if p.name.startswith(f".{Path(target).name}.")]
        assert torn and 0 < torn[0].stat().st_size, _temps(t2)
        assert earlier_bytes() == before

    out = project.dvc("repro")  # run again
    assert "Running stage 'evaluate@t2'" in out.stdout
    assert earlier_bytes() == before
    assert _temps(root / "artifacts") == [] and _temps(root / "metrics") == []  # the killed writers' temp files
    evaluation = json.loads((root / "metrics/tasks/t2/evaluate.json").read_text())
    at_learn_t1 = json.loads((root / "metrics/tasks/t1/evaluate.json").read_text())["accuracy_at_learn"]
    assert evaluation["gate"] == "passed" and evaluation["accuracy"]["t1"] == at_learn_t1
    meta = json.loads((t2 / "deployment.json").read_text())  # the two files of the state belong together
    assert meta["tensors_sha256"] == hashlib.sha256((t2 / meta["tensors"]).read_bytes()).hexdigest()
    held = {s["task"] for s in meta["slots"] if s}  # spare PEs are placed to save writes (HA3M): t2's may reuse t1's
    assert meta["serving"] == "t2" and "t2" in held and held <= {"t1", "t2"}
    assert "up to date" in project.dvc("status").stdout
    # MLflow: each killed attempt of t2 ended KILLED (by the next stage of t2 that ran), the last one learned it
    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    t2_runs = client.search_runs([exp.experiment_id], "tags.`xbar.task` = 't2'", order_by=["attributes.start_time"])
    assert [(r.info.status, r.data.tags.get("xbar.stopped_at")) for r in t2_runs] == [
        ("KILLED", "train_masks@t2"), ("KILLED", "program_spares@t2"), ("FINISHED", None)]
    assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
