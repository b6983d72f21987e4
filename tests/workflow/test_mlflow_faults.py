"""Reliability (issue #8), 4: MLflow faults.

Retries with backoff on I/O errors (a locked store is waited for), one clear line when the store
stays unavailable, and never a half-registered backbone or task run; Prefect retries only
`dvc repro` and only on transient failures.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from project import TinyProject, stage


def test_mlflow_retry_backs_off_on_io_errors_then_gives_one_line(monkeypatch: pytest.MonkeyPatch):
    from sqlalchemy.exc import OperationalError

    from workflow import tracking
    from xbar.errors import UserError

    waits: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", waits.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return "ok"

    assert tracking.retry(flaky, "logging") == "ok" and len(calls) == 3
    assert waits == [0.5, 1.0]  # backoff doubles

    waits.clear()

    def down() -> None:
        raise OSError("disk I/O error\nsecond line")

    with pytest.raises(UserError) as info:
        tracking.retry(down, "creating a run", attempts=4)
    assert waits == [0.5, 1.0, 2.0]
    assert "\n" not in str(info.value) and "unavailable while creating a run: disk I/O error" in str(info.value)

    def bug() -> None:  # not I/O: never retried, never hidden
        raise KeyError("accuracy_at_learn")

    waits.clear()
    with pytest.raises(KeyError):
        tracking.retry(bug, "reading")
    assert waits == []

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    def refused() -> None:  # the store answered: a bad value is not an outage
        raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException, match="not allowed"):
        tracking.retry(refused, "logging")
    assert waits == []


def test_prefect_retries_only_what_waiting_can_fix():
    """The one Prefect task that retries is `dvc repro`, and only on transient failures
    (test_flows.py::test_only_transient_failures_are_retried checks which those are); flows never retry."""
    from prefect.states import Failed

    from flows.continual import continual
    from flows.dvc import StageFailed, dvc_repro, retry_transient
    from flows.new_task import new_task
    from xbar.errors import UserError

    assert dvc_repro.retries == 2 and dvc_repro.retry_condition_fn is retry_transient
    assert not new_task.retries and not continual.retries
    assert not retry_transient(None, None, Failed(data=StageFailed("stage x failed (exit 2): bad", 2)))
    assert not retry_transient(None, None, Failed(data=UserError("params.yaml: seed: bad")))
    assert retry_transient(None, None, Failed(data=StageFailed("could not start dvc", -1, transient=True)))


@pytest.mark.slow
def test_mlflow_locked_or_failing_mid_way_leaves_no_half_registered_task(built: TinyProject, tmp_path: Path):
    from mlflow import MlflowClient

    shutil.copytree(built.root, tmp_path / "project", symlinks=True)
    root = tmp_path / "project"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**built.env, "MLFLOW_TRACKING_URI": uri, "PYTHONDONTWRITEBYTECODE": "1"}
    client = MlflowClient(uri)
    blocked = root / "blocked-artifacts"  # a file where the experiment's artifact directory should be
    exp = client.create_experiment("xbar", artifact_location=blocked.as_uri())
    metrics = root / "metrics/tasks/t1/evaluate.json"

    def evaluate() -> subprocess.CompletedProcess:
        return subprocess.run(stage("evaluate", "t1"), cwd=root, env=env, capture_output=True, text=True, timeout=600)

    def runs(kind: str) -> list:
        return client.search_runs([exp], f"tags.`xbar.kind` = '{kind}'")

    def learned() -> list[tuple[str, str]]:
        from workflow.tracking import Tracker, report

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            return [(t["name"], t["gate"], t["run_id"]) for t in report(Tracker())["tasks"]]

    def failed_with_one_line(out: subprocess.CompletedProcess, words: str) -> None:
        assert out.returncode == 2, out.stderr[-3000:]
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: MLflow store"), out.stderr[-3000:]
        assert words in out.stderr and not metrics.exists()

    # (a) the artifact store fails while the backbone run is logged: one line, and that run is never reused
    blocked.write_text("blocked\n")
    failed_with_one_line(evaluate(), "logging")
    assert runs("task") == [] and [r.info.status for r in runs("backbone")] == ["FAILED"]

    # (b) the store is back but held by an exclusive transaction when evaluate reaches it: it waits, then
    # registers the task once, completely
    blocked.unlink()
    holder = sqlite3.connect(root / "mlflow.db", timeout=0, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = subprocess.Popen(stage("evaluate", "t1"), cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not _has_open(proc.pid, "mlflow.db"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        assert proc.poll() is None  # it cannot finish without writing: it is waiting for the store
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(metrics.read_text())["gate"] == "passed"
    (good,) = learned()
    assert good[:2] == ("t1", "passed")

    # (c) it fails again after the task run was created and its metrics logged: the run stays "pending"
    metrics.unlink()
    shutil.rmtree(blocked)  # the artifacts logged in (b)
    blocked.write_text("blocked\n")
    failed_with_one_line(evaluate(), "logging")
    cut = [r for r in runs("task") if r.info.run_id != good[2]]
    assert len(cut) == 1 and cut[0].data.tags["xbar.gate"] == "pending" and cut[0].info.status == "FAILED"
    assert "forgetting" in cut[0].data.metrics  # it did get half-way
    assert learned() == [good]  # ... and is not a learned task
    ready = [m for m in client.search_logged_models([exp]) if m.status.to_proto() == 2]  # READY
    assert sorted(m.name for m in ready) == ["backbone", "t1"]  # (b)'s; none of the cut-off run's
    assert [v.run_id for v in client.search_model_versions("name = 'xbar-chip'") if v.tags.get("xbar.task")] == [good[2]]


def _has_open(pid: int, name: str) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).endswith(name):
                return True
        except OSError:
            continue
    return False
