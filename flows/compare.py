"""The `compare` flow: every method -- XMA2 at each spare-PE ratio P -- on every task of params.yaml.

Each configuration (`xbar.compare.Configuration`: a method, and P for XMA2)
is one Prefect task that learns the tasks in order in-process and returns its
rows; the flow's task runner fans them out: a thread pool by default, a Dask
cluster through prefect-dask when asked (`task_runner(dask=True)` starts a
local one, `dask_address` joins a running scheduler). Every configuration
seeds itself and draws its training noise from its own generators, so the
results are the same whatever runs beside it, on threads or on Dask workers.

Needs the backbone (artifacts/backbone/quant.pt and levels.pt: `make run` or
`dvc repro quantize`); touches no DVC output. Writes artifacts/comparison/:
table.csv (one row per configuration and task), table.md (accuracy per task
and mean, forgetting, mask memory, energy), accuracy.csv, matrix.csv (the
accuracy of every task after each new one), accuracy_vs_ratio.png and
energy.png; and one MLflow run (tag xbar.kind=comparison) with those files and
metrics acc/<label>/<task> (accuracy after the last task; label "xma2-p10" for
XMA2 at P = 10%), which `xbar report --json` reads back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.continual import prefect_tags
from flows.lock import workspace_lock
from workflow.io import ARTIFACTS, BACKBONE, atomic_write_bytes, load_torch
from workflow.tracking import comparison_key, git_commit, tracker
from xbar.compare import (RATIOS, Configuration, ConfigurationResult, accuracy_table, comparison_table,
                          configuration_params, configurations, energy_table, report_markdown, run_configuration)
from xbar.errors import UserError
from xbar.params import Params, load_params
from xbar.plots import accuracy_vs_ratio, energy_by_method, png
from xbar.step import Backbone

COMPARISON = ARTIFACTS / "comparison"


def default_workers(threads: int) -> int:
    """Configurations at once: each trains with `threads` torch threads (train.threads)."""
    return max(1, (os.cpu_count() or 1) // threads)


def task_runner(dask: bool = False, dask_address: str | None = None, workers: int = 1) -> TaskRunner:
    """Threads (`workers` at once); or Dask: the scheduler at `dask_address`, or with `dask` a local
    cluster of `workers` single-threaded worker processes."""
    if dask_address or dask:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=workers)


def plan_comparison(root: Path, methods: list[str] | None = None,
                    ratios: list[float] | None = None) -> tuple[Params, list[Configuration]]:
    """params.yaml and the configurations, every one validated, and the backbone present; else UserError."""
    params = load_params(root / "params.yaml")
    configs = configurations(methods or None, RATIOS if ratios is None else ratios)
    for config in configs:
        configuration_params(params, config)  # e.g. an XMA2 ratio above crossbar.spare_pe_ratio
    for name in ("quant.pt", "levels.pt"):
        if not (root / BACKBONE / name).exists():
            raise UserError(f"{BACKBONE / name}: missing (the backbone: run `make run` or `dvc repro quantize` first)")
    return params, configs


@task(name="configuration", task_run_name="{config.label}", cache_policy=NO_CACHE, persist_result=False)
def learn_configuration(params: Params, config: Configuration, backbone: Backbone) -> ConfigurationResult:
    return run_configuration(params, config, backbone)


def write_comparison(folder: Path, table: pl.DataFrame, matrix: pl.DataFrame) -> list[Path]:
    """The comparison's files in `folder`; returns their paths."""
    files = {
        "table.csv": table.write_csv().encode(),
        "table.md": report_markdown(table).encode(),
        "accuracy.csv": accuracy_table(table).write_csv().encode(),
        "matrix.csv": matrix.write_csv().encode(),
        "accuracy_vs_ratio.png": png(accuracy_vs_ratio(table)),
        "energy.png": png(energy_by_method(table)),
    }
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return [folder / name for name in files]


def comparison_metrics(table: pl.DataFrame) -> dict[str, float]:
    """acc/<label>/<task> (after the last task), acc_at_learn/..., forgetting/..., acc/<label>/mean, and per
    label mask_bytes (mean per task) and inference_j / reprogram_j / energy_j (summed over the tasks)."""
    out: dict[str, float] = {}
    for row in table.iter_rows(named=True):
        key = comparison_key(row["label"])
        for metric, column in (("acc", "accuracy_final"), ("acc_at_learn", "accuracy_at_learn"),
                               ("forgetting", "forgetting")):
            out[f"{metric}/{key}/{row['task']}"] = row[column]
    for row in accuracy_table(table).iter_rows(named=True):
        out[f"acc/{comparison_key(row['label'])}/mean"] = row["mean"]
    for row in energy_table(table).iter_rows(named=True):
        key = comparison_key(row["label"])
        out |= {f"mask_bytes/{key}": row["mask_bytes"], f"inference_j/{key}": row["inference_j"],
                f"reprogram_j/{key}": row["reprogram_j"], f"energy_j/{key}": row["total_j"]}
    return out


@contextmanager
def closed_run(name: str, tags: dict[str, str]) -> Iterator[str]:
    """An MLflow run logged from this process; ends FINISHED, or FAILED on any exception."""
    with tracker() as t:
        run_id = t.create(name, tags)
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            t.finish(run_id, status)


# run_comparison picks the runner; this default (threads, train.threads' default of 2 each) serves a plain call
@flow(name="compare", task_runner=ThreadPoolTaskRunner(max_workers=default_workers(2)))
def compare(methods: list[str] | None = None, ratios: list[float] | None = None) -> dict[str, Any]:
    """Every method on every task of params.yaml, one Prefect task per configuration.

    Args:
        methods: Methods to compare (default: all six).
        ratios: XMA2's spare-PE ratios P, as shares (default: 0.05, 0.1, 0.2, 0.4).
    """
    root = Path.cwd()
    logger = get_run_logger()
    # params.yaml and the two backbone files are read as one consistent set: under the workspace lock, so no
    # `xbar add-task` or flow rewrites them half-way (a plain `dvc repro` does not take this lock)
    with workspace_lock(root, holder="xbar compare (reading params and backbone)", on_wait=logger.info):
        params, configs = plan_comparison(root, methods, ratios)
        backbone = Backbone(load_torch(root / BACKBONE / "quant.pt"), load_torch(root / BACKBONE / "levels.pt"))
    labels = [c.label for c in configs]
    tags = {"xbar.kind": "comparison", "xbar.trigger": "prefect", "xbar.flow": "compare", "xbar.git_commit": git_commit(),
            "xbar.labels": ",".join(labels), "xbar.tasks": ",".join(params.tasks), **prefect_tags()}
    with closed_run("comparison", tags) as run_id:
        logger.info(f"MLflow run {run_id}: {len(configs)} configurations x {len(params.tasks)} tasks")
        futures = [learn_configuration.submit(params, c, backbone) for c in configs]
        table, matrix = comparison_table([f.result() for f in futures])
        files = write_comparison(root / COMPARISON, table, matrix)
        with tracker() as t:
            t.log(run_id, params={"methods": ",".join(dict.fromkeys(c.method for c in configs)),
                                  "ratios": ",".join(f"{c.spare_ratio:g}" for c in configs if c.spare_ratio),
                                  "seed": params.seed, "model": params.model.name, "preset": params.energy.preset,
                                  **{f"epochs.{n}": s.epochs for n, s in params.tasks.items()}},
                  metrics=comparison_metrics(table))
            for path in files:
                t.log_artifact(run_id, path, "comparison")
    logger.info(f"wrote {root / COMPARISON}")
    accuracy = {r["label"]: {n: r[n] for n in params.tasks} | {"mean": r["mean"]}
                for r in accuracy_table(table).iter_rows(named=True)}
    return {"mlflow_run_id": run_id, "folder": str(COMPARISON), "accuracy": accuracy}


def run_comparison(methods: list[str] | None = None, ratios: list[float] | None = None, dask: bool = False,
                   dask_address: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """The flow on the chosen task runner (what `xbar compare` runs)."""
    params, _ = plan_comparison(Path.cwd(), methods, ratios)
    runner = task_runner(dask, dask_address, workers or default_workers(params.train.threads))
    return compare.with_options(task_runner=runner)(methods=methods, ratios=ratios)


if __name__ == "__main__":
    compare()
