"""The `new-task` flow: add one task to params.yaml and learn it through DVC.

Served by `xbar serve` as deployment `new-task/add-task` (the Prefect UI shows
its parameters as a form) and run by `xbar add-task`. One run:

1. validates the task (name, dataset, method, ranges), the dataset's files (the
   root's policy, class folders, channels; see flows/add_task.py) and the whole
   resulting params.yaml before touching anything;
2. takes the workspace lock (a concurrent trigger waits here, then re-validates:
   its `after` is whatever task was learned last);
3. names its MLflow parent run (the gate stage creates and closes it), appends
   the task to params.yaml, and runs `dvc repro evaluate@<name>` (DVC brings its
   upstream up to date; evaluate is the no-forgetting gate);
4. on any failure restores params.yaml and dvc.lock, closes the parent run
   FAILED and fails with the stage's one-line error. A user mistake (bad input,
   a name taken meanwhile) ends the run Failed with that line as its state
   message, and no traceback in its log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed, State

from flows.add_task import Dataset, Epochs, Method, NewTask, ShiftLevels, SpareRatio, TaskName, params_added, \
    plan_new_task
from flows.continual import pipeline_run
from flows.dvc import dvc_repro, repro_command
from flows.lock import DEFAULT_TIMEOUT_S, workspace_lock
from xbar.errors import UserError

DEPLOYMENT = "add-task"  # `new-task/add-task` in the UI and for run_deployment
GATE_STAGE = "evaluate"  # the last stage of a task; its upstream is all of the task's stages


def gate_target(name: str) -> str:
    return f"{GATE_STAGE}@{name}"


@flow(name="new-task", flow_run_name="add {name}", validate_parameters=True)
def new_task(name: TaskName, dataset: Dataset, method: Method = "xma2", epochs: Epochs = 3,
             spare_ratio: SpareRatio = 0.1, shift_levels: ShiftLevels = 3) -> dict[str, Any] | State:
    """Add a task to params.yaml and learn it after the last one, without forgetting the others.

    Args:
        name: The new task's name (a lower-case identifier, not used yet).
        dataset: A built-in offline dataset; or an image folder (one sub-directory of images per class) or a
            torchvision class, each with its root under the project (or XBAR_DATA_DIRS), image size,
            channels (default: the backbone's) and max_train. Checked before the run starts.
        method: xma2 (2-tier mask), xma, xbm, piggyback, finetune_shared or finetune_separate.
        epochs: Training epochs of the task.
        spare_ratio: Share of PEs re-programmed as spare PEs, in (0, 1].
        shift_levels: Column-mask shift levels, 0..3 (0 = binary column mask).
    """
    root = Path.cwd()  # served and CLI runs both start in the project root
    logger = get_run_logger()
    try:
        task = NewTask.parse(name=name, dataset=dataset, method=method, epochs=epochs, spare_ratio=spare_ratio,
                             shift_levels=shift_levels)
        plan_new_task(root / "params.yaml", task)  # refuse early, before waiting for the lock
        with workspace_lock(root, DEFAULT_TIMEOUT_S, holder=f"new-task {name}", on_wait=logger.info):
            with pipeline_run(root, f"add-{name}", {"xbar.flow": "new-task", "xbar.new_task": name},
                              closed_by=name) as pipeline:
                with params_added(root, task) as plan:  # re-checks: a run we waited for may have added `name`
                    logger.info(f"params.yaml: task {name!r} added after {plan.after!r}"
                                + ("" if plan.kept_comments else " (file re-written: comments were lost)"))
                    dvc_repro(gate_target(name), repro_command(gate_target(name)), str(root), pipeline.env)
    except UserError as err:  # the user's mistake: the run's state is its one line, the log has no traceback
        return Failed(message=str(err))
    logger.info(f"task {name!r} learned; the no-forgetting gate passed; MLflow parent run {pipeline.run_id}")
    return {"task": name, "after": plan.after, "mlflow_parent_run_id": pipeline.run_id}


def serve(limit: int = 1) -> None:
    """Serve `new-task` (as `add-task`), `compare` and `continual` until interrupted.

    The runner executes one flow run at a time (`limit`): the workspace lock would
    serialize them anyway, and this way a queued run waits visibly as "Late" /
    scheduled in the UI instead of inside a process.
    """
    from prefect import serve as prefect_serve
    from prefect.settings import get_current_settings
    from prefect.types.entrypoint import EntrypointType

    from flows.compare import compare
    from flows.continual import continual

    if not get_current_settings().api.url:  # else Prefect would serve against a throw-away server: no UI
        raise UserError("PREFECT_API_URL is not set: start `prefect server start --host 127.0.0.1`, then "
                        "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (see docs/prefect.md)")

    # Module entrypoints: runs import flows.* from the project (cwd), not a file path.
    prefect_serve(
        new_task.to_deployment(DEPLOYMENT, entrypoint_type=EntrypointType.MODULE_PATH,
                               description="Add a task to params.yaml and learn it (form: name, dataset, ...)",
                               tags=["xbar"]),
        compare.to_deployment("compare", entrypoint_type=EntrypointType.MODULE_PATH,
                              description="Compare the methods on every task of params.yaml (form: methods, "
                                          "spare ratios, seeds, Dask scheduler); the table and the MLflow link "
                                          "are the run's artifacts", tags=["xbar"]),
        continual.to_deployment("pipeline", entrypoint_type=EntrypointType.MODULE_PATH,
                                description="Bring the whole pipeline up to date (dvc repro, stage by stage)",
                                tags=["xbar"]),
        limit=limit,
    )
