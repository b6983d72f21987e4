"""Stage evaluate (per task): the no-forgetting gate.

Evaluates every task learned so far on the chip as it stands after this task
(its test split, the model rebuilt from what the chip's cells and mask
buffers hold once switched to it: xbar.chip.readback), writes the
accuracy-matrix row, and hands the record to the tracking
service (workflow/tracking.py: the task's MLflow run). It
FAILS, naming the task and both accuracies, if an earlier task's accuracy
differs from its `accuracy_at_learn` recorded in MLflow. `finetune_shared`
tasks are exempt: their forgetting is the baseline's point, so it is recorded,
not gated. A failed gate writes no metrics and touches no earlier artifact.
"""

from __future__ import annotations

import io
import json
import sys

from workflow.attempts import stage_attempt
from workflow.io import (BACKBONE, METRICS, atomic_write_bytes, load_torch, read_json, stage_main, task_dir, task_metrics,
                         write_json)
from workflow.tracking import TaskRecord, accuracy_at_learn, file_digest, log_task, tracker
from xbar import step
from xbar.chip.deployment import load_chip
from xbar.chip.layout import ChipLayout
from xbar.data import TaskData, load_task_data
from xbar.energy.presets import energy_preset
from xbar.errors import UserError
from xbar.methods import get
from xbar.params import Params
from xbar.plots import accuracy_matrix, png
from xbar.training import seed_everything


class GateFailed(Exception):
    """An earlier task's accuracy changed: the no-forgetting invariant is broken."""


def accuracies_now(params: Params, upto: str) -> tuple[dict[str, float], TaskData]:
    """Accuracy of every task up to `upto` on the chip as it stands after `upto`, and `upto`'s data."""
    names = list(params.tasks)[: list(params.tasks).index(upto) + 1]
    backbone = step.Backbone({}, load_torch(BACKBONE / "levels.pt"))
    layout = ChipLayout(backbone.mapping(params))
    chip = load_chip(task_dir(upto) / "deployment.json", layout, backbone.cells)
    tasks = {name: load_torch(task_dir(name) / "task.pt") for name in names}
    data = {name: load_task_data(params.tasks[name].dataset, params.seed) for name in names}
    preset = energy_preset(params)
    return step.evaluate_chip(params, chip, layout, tasks, backbone, data, preset), data[upto]


def evaluate(params: Params, task: str) -> None:
    seed_everything(params.seed, params.train.threads)
    names = list(params.tasks)
    order = names.index(task) + 1
    train = read_json(task_metrics(task, "train"))
    program = read_json(task_metrics(task, "program"))
    energy = read_json(task_metrics(task, "energy"))
    now, data = accuracies_now(params, task)
    digests = {n: file_digest(task_dir(n) / "task.pt") for n in now}
    earlier = {n: task_metrics(n, "evaluate") for n in names[: order - 1]}  # rows of the matrix so far
    matrix_rows = {**{n: json.loads(p.read_text())["accuracy"] for n, p in earlier.items() if p.exists()}, task: now}
    matrix_png = png(accuracy_matrix(matrix_rows))  # rendered once: MLflow artifact and DVC plot

    with tracker() as t:
        at_learn = {n: accuracy_at_learn(t, n, digests[n]) for n in names[: order - 1]}
        at_learn[task] = now[task]
        failures = []
        if abs(now[task] - train["test_accuracy"]) > 0.01:  # deployed != trained: a deployment bug
            failures.append(f"task {task}: deployed accuracy {now[task]:.2f}% != trained {train['test_accuracy']:.2f}%")
        for n in names[: order - 1]:
            if at_learn[n] is None:  # MLflow lost the record: fall back to the task's own DVC metrics
                at_learn[n] = read_json(task_metrics(n, "evaluate"))["accuracy_at_learn"]
            if get(params.tasks[n].method).gated and now[n] != at_learn[n]:
                failures.append(f"task {n}: accuracy {now[n]:.2f}% after adding {task}, "
                                f"{at_learn[n]:.2f}% when learned")
        forgetting = {n: at_learn[n] - now[n] for n in now}
        logged = log_task(t, params, TaskRecord(  # the task's MLflow run, gate result included
            task=task, order=order, task_digest=digests[task], accuracy=now, forgetting=forgetting, train=train,
            program=program, energy=energy, train_digest=data.train_digest, test_digest=data.test_digest,
            matrix_png=matrix_png, failures=tuple(failures)))

    if failures:
        raise GateFailed("no-forgetting gate failed: " + "; ".join(failures))
    write_json(task_metrics(task, "evaluate"), {
        "accuracy_at_learn": now[task], "accuracy": now, "forgetting": forgetting, "order": order,
        "gate": "passed", "mlflow_run_id": logged.run_id,
        "mlflow_parent_run_id": logged.parent_id, "pipeline_key": logged.pipeline_key})
    rows = io.StringIO()
    rows.write("task,accuracy\n" + "".join(f"{n},{a:.2f}\n" for n, a in now.items()))
    atomic_write_bytes(METRICS / "tasks" / task / "accuracy_row.csv", rows.getvalue().encode())
    atomic_write_bytes(METRICS / "tasks" / task / "accuracy_matrix.png", matrix_png)
    print(f"evaluate {task}: " + ", ".join(f"{n} {a:.2f}%" for n, a in now.items()) + " -- gate passed")


def main() -> None:
    try:
        stage_main(evaluate, task_arg=True, around=stage_attempt)
    except GateFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
