"""Stage evaluate (per task): the no-forgetting gate, and the task's MLflow run.

Evaluates every task learned so far on the chip as it stands after this task
(its test split, the model rebuilt from its task.pt over the backbone's
cells), writes the accuracy-matrix row, and logs the task's child run. It
FAILS, naming the task and both accuracies, if an earlier task's accuracy
differs from its `accuracy_at_learn` recorded in MLflow. `finetune_shared`
tasks are exempt: their forgetting is the baseline's point, so it is recorded,
not gated. A failed gate writes no metrics and touches no earlier artifact.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import yaml

from workflow.io import BACKBONE, METRICS, atomic_write_bytes, load_torch, stage_main, task_dir, task_metrics, write_json
from workflow.tracking import (PIPELINE_ENV, Tracker, accuracy_at_learn, backbone_run, file_digest, git_commit, parent_run,
                             tracker)
from xbar import step
from xbar.data import TaskData, load_task_data
from xbar.errors import UserError
from xbar.methods import get
from xbar.params import Params
from xbar.plots import accuracy_matrix, png
from xbar.training import seed_everything


class GateFailed(Exception):
    """An earlier task's accuracy changed: the no-forgetting invariant is broken."""


def read_json(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path}: missing (run the stage that writes it first: dvc repro)")
    return json.loads(path.read_text())


def accuracies_now(params: Params, upto: str) -> tuple[dict[str, float], TaskData]:
    """Accuracy of every task up to `upto` on the chip as it stands after `upto`, and `upto`'s data."""
    names = list(params.tasks)[: list(params.tasks).index(upto) + 1]
    levels = load_torch(BACKBONE / "levels.pt")
    tasks = {name: load_torch(task_dir(name) / "task.pt") for name in names}
    data = {name: load_task_data(params.tasks[name].dataset, params.seed) for name in names}
    return step.evaluate(params, tasks, levels, data), data[upto]


def dvc_stage_hashes(task: str) -> dict[str, str]:
    """md5 of each output of this task's earlier stages, from dvc.lock (lineage)."""
    lock = Path("dvc.lock")
    if not lock.exists():
        return {}
    # libyaml's loader: dvc.lock grows by ~300 lines a task, too slow for the pure-Python one
    stages = (yaml.load(lock.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages", {})
    tags = {}
    for name in ("pretrain", "quantize", "map_crossbars", f"rank_pes@{task}", f"train_masks@{task}",
                 f"program_spares@{task}", f"simulate_energy@{task}"):
        for out in stages.get(name, {}).get("outs", []):
            tags[f"dvc.{name}.{Path(out['path']).name}"] = out.get("md5", "")
    return tags


def log_backbone(t: Tracker, params: Params, run_id: str) -> None:
    pre, quant = read_json(METRICS / "pretrain.json"), read_json(METRICS / "quantize.json")
    mapping = read_json(METRICS / "map.json") if (METRICS / "map.json").exists() else {}
    t.log(run_id, params={"model": params.model.name, "width": params.model.width, "blocks": params.model.blocks,
                          "source": params.source.dataset.source, "act_bits": params.quant.act_bits,
                          "weight_bits": params.crossbar.weight_bits, "seed": params.seed},
          metrics={"fp32_accuracy": pre["test_accuracy"],
                   **{f"quantize/{k}": v for k, v in quant.items() if isinstance(v, int | float)},
                   **{f"map/{k}": v for k, v in mapping.items() if isinstance(v, int | float)}})
    t.log_dataset(run_id, params.source.dataset.source, pre["data_digest"], "source", "source")
    for path in (BACKBONE / "levels.pt", METRICS / "pretrain.json", METRICS / "quantize.json"):
        t.log_artifact(run_id, path, "backbone")


def log_task(t: Tracker, run_id: str, params: Params, task: str, now: dict[str, float], forgetting: dict[str, float],
             train: dict, program: dict, energy: dict, order: int, matrix_png: bytes, data: TaskData) -> None:
    """The task's child run: params, metrics, the acc/<task> row at step `order`, datasets, artifacts."""
    spec = params.tasks[task]
    t.log(run_id, params={"method": spec.method, "dataset": spec.dataset.source, "epochs": spec.epochs,
                          "spare_ratio": spec.spare_ratio, "shift_levels": spec.shift_levels,
                          "rank_batch_size": spec.rank_batch_size, "after": spec.after, "seed": params.seed,
                          **{f"crossbar.{k}": v for k, v in params.crossbar.model_dump().items()}},
          metrics={"accuracy_at_learn": now[task], "forgetting": max(forgetting[n] for n in now),
                   "spare_pes": train["spare_pes_used"], "mask_bytes": train["mask_bytes_packed"],
                   "mask_bytes_unpacked": train["mask_bytes_unpacked"],
                   "energy_j": energy["total_j"], "inference_j": energy["inference_j"],
                   "reprogram_j": energy["reprogram_j"], "cells_written": program["cells_written"]})
    t.log(run_id, metrics={f"acc/{n}": a for n, a in now.items()}, step=order)
    t.log_dataset(run_id, spec.dataset.source, data.train_digest, task, "train")
    t.log_dataset(run_id, spec.dataset.source, data.test_digest, task, "test")
    for path in [task_dir(task) / f for f in ("ranking.parquet", "ranking.png", "mask_levels.png", "program.parquet",
                                              "energy.png", "energy_layers.parquet", "energy_pes.parquet", "task.pt")]:
        t.log_artifact(run_id, path, "artifacts")
    t.log_bytes(run_id, matrix_png, "plots/accuracy_matrix.png")
    for stage in ("rank", "train", "program", "energy"):
        t.log_artifact(run_id, task_metrics(task, stage), "metrics")


def evaluate(params: Params, task: str) -> None:
    seed_everything(params.seed, params.train.threads)
    names = list(params.tasks)
    order = names.index(task) + 1
    spec = params.tasks[task]
    train = read_json(task_metrics(task, "train"))
    program = read_json(task_metrics(task, "program"))
    energy = read_json(task_metrics(task, "energy"))
    now, data = accuracies_now(params, task)
    digests = {n: file_digest(task_dir(n) / "task.pt") for n in now}
    earlier = {n: task_metrics(n, "evaluate") for n in names[: order - 1]}  # rows of the matrix so far
    matrix_rows = {**{n: json.loads(p.read_text())["accuracy"] for n, p in earlier.items() if p.exists()}, task: now}
    matrix_png = png(accuracy_matrix(matrix_rows))  # rendered once: MLflow artifact and DVC plot

    with tracker() as t:
        backbone_id = backbone_run(t, file_digest(BACKBONE / "levels.pt"), lambda rid: log_backbone(t, params, rid))
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

        parent_id = parent_run(t, backbone_id)
        run_id = t.create(task, {
            "mlflow.parentRunId": parent_id, "xbar.kind": "task", "xbar.task": task,
            "xbar.order": str(order), "xbar.task_digest": digests[task], "xbar.backbone_run_id": backbone_id,
            "xbar.method": spec.method, "xbar.dataset": spec.dataset.source, "xbar.git_commit": git_commit(),
            "xbar.gate": "pending", **dvc_stage_hashes(task)})
        try:
            log_task(t, run_id, params, task, now, forgetting, train, program, energy, order, matrix_png, data)
        except BaseException:
            try:  # the run stays "pending" (never counted as learned); close it if the store still answers
                t.finish(run_id, "FAILED")
            except UserError:
                pass
            raise
        # Only a completely logged run says "passed": a store failing mid-way leaves no half-registered task.
        t.log(run_id, tags={"xbar.gate": "failed" if failures else "passed"})
        t.finish(run_id, "FAILED" if failures else "FINISHED")
        pipeline = json.loads(os.environ.get(PIPELINE_ENV) or "{}")
        if not failures and pipeline.get("closed_by") == task:  # the flow's last stage: it spares the flow
            t.finish(parent_id)                                  # opening MLflow just to close its run

    if failures:
        raise GateFailed("no-forgetting gate failed: " + "; ".join(failures))
    write_json(task_metrics(task, "evaluate"), {
        "accuracy_at_learn": now[task], "accuracy": now, "forgetting": forgetting, "order": order,
        "gate": "passed", "mlflow_run_id": run_id,
        "mlflow_parent_run_id": parent_id, "pipeline_key": pipeline.get("tags", {}).get("xbar.pipeline_key")})
    rows = io.StringIO()
    rows.write("task,accuracy\n" + "".join(f"{n},{a:.2f}\n" for n, a in now.items()))
    atomic_write_bytes(METRICS / "tasks" / task / "accuracy_row.csv", rows.getvalue().encode())
    atomic_write_bytes(METRICS / "tasks" / task / "accuracy_matrix.png", matrix_png)
    print(f"evaluate {task}: " + ", ".join(f"{n} {a:.2f}%" for n, a in now.items()) + " -- gate passed")


def main() -> None:
    try:
        stage_main(evaluate, task_arg=True)
    except GateFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
