"""The `continual` flow: the whole pipeline, one Prefect task per DVC stage.

Backbone stages first, then each task's stages, task after task in params.yaml
order (each task is learned on the deployment state the one before it left),
then any stage written after the per-task ones. Every stage is
`dvc repro --single-item <stage>`: DVC still skips what is up to date, and the
order here guarantees each stage's upstream has just been brought up to date.
The whole run holds the workspace lock and one MLflow parent run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.dvc import dvc_repro, pipeline_order, repro_command
from flows.lock import DEFAULT_TIMEOUT_S, workspace_lock
from stages.tracking import git_commit, tracker
from xbar.params import load_params


@contextmanager
def pipeline_run(name: str, tags: dict[str, str]) -> Iterator[str]:
    """An MLflow parent run (xbar.kind=pipeline, xbar.trigger=prefect) that is always closed.

    Yields its id for XBAR_PARENT_RUN_ID; ends FINISHED when the block completes,
    FAILED on any exception (including a cancellation).
    """
    with tracker() as t:
        run_id = t.create(name, {"xbar.kind": "pipeline", "xbar.trigger": "prefect",
                                 "xbar.git_commit": git_commit(), **_prefect_tags(), **tags})
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            t.finish(run_id, status)


def _prefect_tags() -> dict[str, str]:
    """Link the MLflow run back to the Prefect flow run (empty outside a flow run)."""
    run_id = flow_run.get_id()
    return {"prefect.flow_run_id": run_id, "prefect.flow_run_name": flow_run.get_name() or ""} if run_id else {}


def run_stages(root: Path, parent_run_id: str, timeout_s: float | None = None) -> list[str]:
    """Run every stage in pipeline order (caller holds the lock); return the stage names."""
    params = load_params(root / "params.yaml")
    stages = pipeline_order(root / "dvc.yaml", list(params.tasks))
    for stage in stages:
        dvc_repro(stage, repro_command(stage, single_item=True), str(root), parent_run_id, timeout_s)
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
        with pipeline_run("continual", {"xbar.flow": "continual"}) as parent:
            logger.info(f"MLflow parent run {parent}")
            return run_stages(root, parent, stage_timeout_s)


if __name__ == "__main__":
    continual()
