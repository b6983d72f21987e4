"""The `continual` flow: the whole pipeline, one Prefect task per DVC stage.

Backbone stages first, then each task's stages, task after task in params.yaml
order (each task is learned on the deployment state the one before it left),
then any stage written after the per-task ones. Every stage is
`dvc repro --single-item <stage>`: DVC still skips what is up to date, and the
order here guarantees each stage's upstream has just been brought up to date.
The whole run holds the workspace lock and one MLflow parent run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.dvc import dvc_repro, pipeline_order, repro_command
from flows.lock import DEFAULT_TIMEOUT_S, workspace_lock
from flows.signals import OPEN_PIPELINES, track_flow_run
from workflow.io import task_metrics
from workflow.tracking import close_flow_runs, git_commit, pipeline_parent, tracker
from xbar.params import load_params


@dataclass
class PipelineRun:
    """A flow's MLflow parent run as the stages see it: XBAR_PIPELINE_RUN (workflow/tracking.py)."""

    spec: dict
    run_id: str | None = None  # known once the run is closed

    @property
    def env(self) -> str:
        return json.dumps(self.spec)


@contextmanager
def pipeline_run(root: Path, name: str, tags: dict[str, str], closed_by: str | None = None) -> Iterator[PipelineRun]:
    """The flow's MLflow parent run (xbar.kind=pipeline, xbar.trigger=prefect), always closed.

    The first `evaluate` creates it (so this process never imports MLflow when all goes well).
    It ends FAILED on any exception (including a cancellation), else FINISHED: by the
    `evaluate` of task `closed_by` (the flow's last stage) if that stage did, else here.
    """
    key = uuid.uuid4().hex
    run = PipelineRun({"name": name, "closed_by": closed_by, "start_ms": int(time.time() * 1000), "tags": {
        "xbar.kind": "pipeline", "xbar.trigger": "prefect", "xbar.pipeline_key": key, "xbar.git_commit": git_commit(),
        **prefect_tags(), **tags}})
    status, failed_stage = "FAILED", None
    OPEN_PIPELINES[key] = run.spec
    try:
        yield run
        status = "FINISHED"
    except BaseException as err:
        status = "KILLED" if stopped(err) else "FAILED"
        failed_stage = getattr(err, "stage", None)
        raise
    finally:
        closed = _closed_by_gate(root, closed_by, key) if status == "FINISHED" else None
        if closed:
            run.run_id = closed
        else:
            if status != "FINISHED":  # its task runs first: an attempt cut off, a run left RUNNING
                close_flow_runs(key, status)
            with tracker() as t:
                run.run_id = pipeline_parent(t, run.spec)
                if failed_stage:
                    t.log(run.run_id, tags={"xbar.failed_stage": failed_stage})
                t.finish(run.run_id, status)
        OPEN_PIPELINES.pop(key, None)


def stopped(err: BaseException) -> bool:
    """A Ctrl-C, a SIGTERM (Prefect's TerminationSignal) or a cancellation, not a failure."""
    from prefect.exceptions import TerminationSignal

    return isinstance(err, KeyboardInterrupt | SystemExit | TerminationSignal) or type(err).__name__ == "CancelledError"


def _closed_by_gate(root: Path, task: str | None, key: str) -> str | None:
    """The parent run's id if `task`'s evaluate stage of this flow (its key) closed it, else None."""
    if not task:
        return None
    try:
        record = json.loads((root / task_metrics(task, "evaluate")).read_text())
    except (OSError, ValueError):
        return None
    return record.get("mlflow_parent_run_id") if record.get("pipeline_key") == key else None


def prefect_tags() -> dict[str, str]:
    """Link the MLflow run back to the Prefect flow run (empty outside a flow run)."""
    track_flow_run()  # the run a Ctrl-C marks CANCELLED (flows/signals.py)
    run_id = flow_run.get_id()
    return {"prefect.flow_run_id": run_id, "prefect.flow_run_name": flow_run.get_name() or ""} if run_id else {}


def run_stages(root: Path, pipeline: PipelineRun, timeout_s: float | None = None) -> list[str]:
    """Run every stage in pipeline order (caller holds the lock); return the stage names."""
    params = load_params(root / "params.yaml")
    stages = pipeline_order(root / "dvc.yaml", list(params.tasks))
    for stage in stages:
        dvc_repro(stage, repro_command(stage, single_item=True), str(root), pipeline.env, timeout_s)
    return stages


@flow(name="continual")
def continual(stage_timeout_s: float | None = None, lock_timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Bring the whole pipeline up to date: backbone, then every task of params.yaml in order.

    Run from the project root. Fails on the first failed stage (a stage's user error, a
    failed no-forgetting gate); only transient DVC/I-O failures are retried.
    """
    root = Path.cwd()
    logger = get_run_logger()
    load_params(root / "params.yaml")  # a broken params.yaml fails here, before the lock and MLflow
    with workspace_lock(root, lock_timeout_s, holder="continual flow", on_wait=logger.info):
        with pipeline_run(root, "continual", {"xbar.flow": "continual"}) as pipeline:
            stages = run_stages(root, pipeline, stage_timeout_s)
    logger.info(f"MLflow parent run {pipeline.run_id}")
    return stages


if __name__ == "__main__":
    continual()
