"""Stopping `xbar add-task` mid-training (issue #33): SIGTERM to its process, then Ctrl-C to its process group.

Each time: it ends within seconds with one line; no process it started is left (its temporary Prefect
server included); params.yaml, dvc.lock and the earlier task's files are as before; DVC's lock is free;
the Prefect flow run is CANCELLED and its MLflow runs KILLED. Then the same command learns the task.

"Mid-training" is made exact from the test side: pause_write/sitecustomize.py (as test_kill_resume.py)
stops train_masks half-way through writing the task's task.pt, after its training.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from project import CLI, ROOT, make_tiny_project, tree_digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

PAUSE_WRITE = Path(__file__).resolve().parent / "pause_write"
STOP_S = 30  # measured 8-10 s on 2 busy cores: DVC's own Ctrl-C exit, then MLflow closing the runs
ADD = [*CLI, "add-task", "second", "--dataset", "optdigits", "--epochs", "1"]


def _start(project, log: Path, pause: bool) -> subprocess.Popen:
    env = {**project.env, "PREFECT_HOME": str(project.root.parent / "prefect-home")}
    if pause:
        env |= {"PYTHONPATH": os.pathsep.join([str(PAUSE_WRITE), str(ROOT)]),
                "XBAR_TEST_PAUSE_WRITE": "artifacts/tasks/second/task.pt"}
    with open(log, "w") as out:  # its own process group: the group a terminal's Ctrl-C signals
        return subprocess.Popen(ADD, cwd=project.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                process_group=0)


def _flow_runs(project) -> list[tuple[str, str]]:
    db = sqlite3.connect(project.root.parent / "prefect-home" / "prefect.db")
    try:
        return db.execute("SELECT name, state_type FROM flow_run ORDER BY created").fetchall()
    finally:
        db.close()


def test_sigterm_or_ctrl_c_stops_add_task_in_seconds_and_a_rerun_learns_the_task(tmp_path: Path):
    from mlflow import MlflowClient

    project = make_tiny_project(tmp_path / "project", {"first": {}})
    project.dvc("repro")
    root = project.root
    earlier = {d: tree_digest(root / d) for d in ("artifacts/backbone", "artifacts/tasks/first", "metrics/tasks/first")}
    params, lock = project.params.read_bytes(), (root / "dvc.lock").read_bytes()

    for how in ("SIGTERM to the process", "Ctrl-C to the process group"):
        log = tmp_path / "add-task.log"
        proc = _start(project, log, pause=True)
        try:
            deadline = time.monotonic() + 600
            while "paused writing artifacts/tasks/second/task.pt" not in log.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
            started = psutil.Process(proc.pid).children(recursive=True)
            assert any("uvicorn" in " ".join(c.cmdline()) for c in started)  # the temporary Prefect server
            paused_at = len(log.read_text(errors="replace"))
            t0 = time.monotonic()
            if how.startswith("SIGTERM"):
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(STOP_S)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        print(f"{how}: stopped in {took:.1f} s")
        after = log.read_text(errors="replace")[paused_at:].strip().splitlines()
        assert code == (143 if how.startswith("SIGTERM") else 130), after
        assert len(after) == 1 and after[0].startswith("add-task: stopped by SIG"), after
        time.sleep(1)
        assert [c.pid for c in started if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
        assert project.params.read_bytes() == params and (root / "dvc.lock").read_bytes() == lock
        assert {d: tree_digest(root / d) for d in earlier} == earlier
        assert project.dvc("status").returncode == 0  # DVC's lock is free
        assert _flow_runs(project)[-1] == ("add second", "CANCELLED")

    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    stopped = client.search_runs([exp.experiment_id], "tags.`xbar.task` = 'second'")
    assert [(r.info.status, r.data.tags["xbar.stopped_at"]) for r in stopped] == [("KILLED", "train_masks@second")] * 2
    flows = client.search_runs([exp.experiment_id], "tags.`xbar.flow` = 'new-task'")
    assert [r.info.status for r in flows] == ["KILLED", "KILLED"]

    proc = _start(project, tmp_path / "rerun.log", pause=False)  # the same command again
    assert proc.wait(600) == 0, (tmp_path / "rerun.log").read_text()[-4000:]
    learned = client.search_runs([exp.experiment_id], "tags.`xbar.task` = 'second' AND attributes.status = 'FINISHED'")
    assert len(learned) == 1 and learned[0].data.tags["xbar.gate"] == "passed"
    assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
    assert _flow_runs(project)[-1] == ("add second", "COMPLETED")
