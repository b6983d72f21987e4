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
XMA2 at P = 10%), which `xbar report --json` reads back. The chip column
(xbar.chip.sweep: every task on `chip_instances` chips after the last task, the
paper's 5-bit ADC, params.yaml's device, `chip_images` test images per task) adds
chip.csv, a section of table.md and metrics chip/<label>/<task>; `chip_sweeps`
adds accuracy on the chip against ADC bits, device noise and time
(chip_sweeps.csv, chip_sweeps.png).

`compare` is the entry point (`xbar compare`, and the deployment `compare/compare`
that `xbar serve` serves with a typed form): it validates the form, picks the task
runner, runs the `configurations` flow on it as a subflow, and attaches the
comparison table (a markdown artifact) and a link to the MLflow run to its own run
page. Every configuration runs once per seed (default: 3 seeds from params.yaml's);
the tables then hold the mean over the seeds, and table.md adds each seed's mean,
the mean ± 95% CI per configuration and task, the paired differences (XMA2 -
Piggyback, XMA2 - XMA, each - head only) and one line per configuration that failed
(xbar.comparison_stats).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.continual import prefect_tags
from flows.lock import workspace_lock
from flows.signals import track_flow_run
from workflow.backbone import load_backbone
from workflow.io import ARTIFACTS, BACKBONE, atomic_write_bytes
from workflow.tracking import comparison_key, git_commit, tracker
from xbar.chip.sweep import ChipPlan
from xbar.compare import (ENERGY_SCENARIO, FP32_CEILING, RATIOS, Configuration, ConfigurationResult, accuracy_table,
                          chip_sweep_table, chip_table, comparison_table, configuration_params, configurations,
                          energy_table, markdown, report_markdown, run_configuration)
from xbar.comparison_stats import statistics_markdown
from xbar.stats import check_seeds
from xbar.errors import UserError
from xbar.methods import names as method_names
from xbar.params import Params, ShiftLevels, SpareRatio, load_params
from xbar.plots import accuracy_vs_ratio, chip_sweeps, energy_by_method, png
from xbar.step import Backbone

COMPARISON = ARTIFACTS / "comparison"
DEFAULT_SEEDS = 3  # runs per configuration when no seeds are given: a mean with its 95% CI
CHIP_FILES = {"chip.csv", "chip_sweeps.csv", "chip_sweeps.png"}
MLFLOW_UI_ENV = "XBAR_MLFLOW_UI"  # where the MLflow UI is, for the run's link (default: `mlflow ui`'s address)
MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"

# The form's fields (the served deployment's parameters)
Methods = Annotated[list[Literal[method_names()]], Field(  # type: ignore[valid-type]
    min_length=1, description="Methods to compare (XMA2 once per spare ratio)")]
Ratios = Annotated[list[SpareRatio], Field(
    description="XMA2's spare-PE ratios P, as shares in (0, 1]; at most params.yaml's crossbar.spare_pe_ratio")]
Seeds = Annotated[list[Annotated[int, Field(ge=0)]] | None, Field(
    description="Seeds: every configuration runs once per seed; empty: 3 seeds from params.yaml's")]
DaskAddress = Annotated[str | None, Field(pattern=r"^(tcp|tls|ucx|inproc)://\S+$", description=(
    "A running Dask scheduler to fan out over, e.g. tcp://10.0.0.5:8786; empty: threads of the served process"))]
BnAblation = Annotated[Literal["frozen", "per_task"] | None, Field(
    description="Also run every mask method with this BN rule (the ablation); empty: only params.yaml's train.bn")]
ShiftSweep = Annotated[list[ShiftLevels] | None, Field(
    description="The paper's Table 2: run XMA and XMA2 once per number of shift levels N (0..3); empty: each task's own")]
Workers = Annotated[int | None, Field(gt=0, description="Configurations at once on threads "
                                                         "(default: CPU cores / train.threads)")]
ChipInstances = Annotated[int, Field(ge=0, description="Chip instances per configuration for the chip column "
                                                       "(5-bit ADC, params.yaml's device); 0: no chip column")]
ChipImages = Annotated[int | None, Field(gt=0, description="Test images per task on the chip (a seeded subset); "
                                                           "empty: the whole test split")]


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


def plan_comparison(root: Path, methods: list[str] | None = None, ratios: list[float] | None = None,
                    bn_ablation: str | None = None,
                    shift_levels: list[int] | None = None) -> tuple[Params, list[Configuration]]:
    """params.yaml and the configurations, every one validated, and the backbone present; else UserError."""
    params = load_params(root / "params.yaml")
    if bn_ablation == params.train.bn:
        bn_ablation = None  # the ablation is the other rule; the same one adds nothing
    configs = configurations(methods or None, RATIOS if ratios is None else ratios, bn_ablation, shift_levels or (),
                             recipe=params.train.recipe)
    for config in configs:
        configuration_params(params, config)  # e.g. an XMA2 ratio above crossbar.spare_pe_ratio
    for name in ("quant.pt", "levels.pt"):
        if not (root / BACKBONE / name).exists():
            raise UserError(f"{BACKBONE / name}: missing (the backbone: run `make run` or `dvc repro quantize` first)")
    return params, configs


@task(name="configuration", task_run_name="{config.label} seed {seed}", cache_policy=NO_CACHE,
      persist_result=False)
def learn_configuration(params: Params, config: Configuration, backbone: Backbone, seed: int,
                        chip: ChipPlan | None = None) -> ConfigurationResult:
    return run_configuration(params.model_copy(update={"seed": seed}), config, backbone, chip_plan=chip)


def seed_mean(tables: list[pl.DataFrame]) -> pl.DataFrame:
    """Per configuration and task, every number averaged over the seeds' tables (strings: the first seed's)."""
    keys = ["label", "method", "spare_ratio", "task", "order", "dataset"]
    numbers = [c for c, t in tables[0].schema.items() if c not in keys and t.is_numeric()]
    rest = [c for c in tables[0].columns if c not in keys and c not in numbers]
    return (pl.concat(tables).group_by(keys, maintain_order=True)
            .agg(*(pl.col(c).mean() for c in numbers), *(pl.col(c).first() for c in rest))
            .select(tables[0].columns))


def seeds_markdown(tables: list[pl.DataFrame], seeds: list[int]) -> str:
    """Each seed's mean accuracy after the last task, per configuration, with the mean and spread."""
    wide = accuracy_table(tables[0]).select("label")
    for table, seed in zip(tables, seeds):
        wide = wide.join(accuracy_table(table).select("label", pl.col("mean").alias(f"seed {seed}")), on="label",
                         maintain_order="left")
    columns = [f"seed {s}" for s in seeds]
    wide = wide.with_columns(mean=pl.mean_horizontal(*columns), std=pl.concat_list(*columns).list.std())
    return ("## Mean test accuracy (%) after the last task, per seed\n\n"
            + markdown(wide.with_columns(pl.col(pl.Float64).round(2)), digits=6) + "\n")


def write_comparison(folder: Path, table: pl.DataFrame, matrix: pl.DataFrame, extra_markdown: str = "",
                     rows: pl.DataFrame | None = None, chip: pl.DataFrame | None = None) -> list[Path]:
    """The comparison's files in `folder` (table.csv: `rows` where given, e.g. every seed's); their paths.
    `chip`: the chip rows (xbar.chip.sweep): chip.csv, and with sweeps chip_sweeps.csv and .png."""
    files = {
        "table.csv": (table if rows is None else rows).write_csv().encode(),
        "table.md": (report_markdown(table, chip) + extra_markdown).encode(),
        "accuracy.csv": accuracy_table(table).write_csv().encode(),
        "matrix.csv": matrix.write_csv().encode(),
        "accuracy_vs_ratio.png": png(accuracy_vs_ratio(table)),
        "energy.png": png(energy_by_method(table)),
    }
    if chip is not None and chip.height:
        files["chip.csv"] = chip.write_csv().encode()
        sweep = chip_sweep_table(chip)
        if sweep.height:
            files["chip_sweeps.csv"] = sweep.write_csv().encode()
            files["chip_sweeps.png"] = png(chip_sweeps(sweep))
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    for name in CHIP_FILES - set(files):  # an earlier comparison's chip files would pass for this one's
        (folder / name).unlink(missing_ok=True)
    return [folder / name for name in files]


def chip_means(table: pl.DataFrame) -> dict[str, float]:
    """label -> the chip column's mean over the tasks ({} when the chip was not measured)."""
    measured = table.filter(pl.col("chip_mean").is_not_null())
    return {r["label"]: r["mean"] for r in accuracy_table(measured, "chip_mean").iter_rows(named=True)} \
        if measured.height else {}


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
    for row in table.filter(pl.col("chip_mean").is_not_null()).iter_rows(named=True):
        out[f"chip/{comparison_key(row['label'])}/{row['task']}"] = row["chip_mean"]
    out |= {f"chip/{comparison_key(label)}/mean": mean for label, mean in chip_means(table).items()}
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


def mlflow_run_url(experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run: XBAR_MLFLOW_UI, else an http(s) tracking server, else `mlflow ui`'s address."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = os.environ.get(MLFLOW_UI_ENV) or (uri if uri.startswith(("http://", "https://")) else MLFLOW_UI_DEFAULT)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# `compare` picks the runner; this default (threads, train.threads' default of 2 each) serves a plain call
@flow(name="configurations", task_runner=ThreadPoolTaskRunner(max_workers=default_workers(2)))
def learn_configurations(methods: list[str] | None = None, ratios: list[float] | None = None,
                         seeds: list[int] | None = None, bn_ablation: str | None = None,
                         shift_levels: list[int] | None = None, chip: ChipPlan | None = None) -> dict[str, Any]:
    """Every method on every task of params.yaml, one Prefect task per configuration (and seed)."""
    root = Path.cwd()
    logger = get_run_logger()
    # params.yaml and the two backbone files are read as one consistent set: under the workspace lock, so no
    # `xbar add-task` or flow rewrites them half-way (a plain `dvc repro` does not take this lock)
    with workspace_lock(root, holder="xbar compare (reading params and backbone)", on_wait=logger.info):
        params, configs = plan_comparison(root, methods, ratios, bn_ablation, shift_levels)
        backbone = load_backbone(root, fp32=True)  # fp32.pt: the fp32 ceiling's start
    if backbone.fp32 is None and any(c.method == FP32_CEILING for c in configs):
        logger.warning(f"{FP32_CEILING} (the fp32 ceiling) is left out: {BACKBONE / 'fp32.pt'} is missing")
        configs = [c for c in configs if c.method != FP32_CEILING]
    # default: DEFAULT_SEEDS seeds from params.yaml's (a mean with a CI); a seed given twice is refused
    seeds = list(check_seeds(seeds if seeds is not None else [params.seed + k for k in range(DEFAULT_SEEDS)]))
    labels = [c.label for c in configs]
    tags = {"xbar.kind": "comparison", "xbar.trigger": "prefect", "xbar.flow": "compare",
            "xbar.git_commit": git_commit(), "xbar.labels": ",".join(labels), "xbar.tasks": ",".join(params.tasks), **prefect_tags()}
    with closed_run("comparison", tags) as run_id:
        logger.info(f"MLflow run {run_id}: {len(configs)} configurations x {len(params.tasks)} tasks x "
                    f"{len(seeds)} seed(s)")
        futures = [[learn_configuration.submit(params, c, backbone, seed, chip) for c in configs] for seed in seeds]
        results = [[f.result() for f in row] for row in futures]
        failures = [r.failure for row in results for r in row if r.failure]
        for line in failures:  # one line each; the other configurations' results are still written
            logger.warning(line)
        per_seed = [comparison_table(row) for row in results]
        chip_rows = pl.concat([chip_table(row).with_columns(seed=pl.lit(s)) for row, s in zip(results, seeds)])
        tables = [t for t, _ in per_seed]
        rows = pl.concat([t.with_columns(seed=pl.lit(s)) for t, s in zip(tables, seeds)])
        matrix = pl.concat([m.with_columns(seed=pl.lit(s)) for (_, m), s in zip(per_seed, seeds)])
        table = tables[0] if len(seeds) == 1 else seed_mean(tables)
        extra = ("" if len(seeds) == 1 else "\n" + seeds_markdown(tables, seeds)) + "\n" + statistics_markdown(rows, failures)
        files = write_comparison(root / COMPARISON, table, matrix, extra, rows, chip_rows)
        with tracker() as t:
            t.log(run_id, params={"methods": ",".join(dict.fromkeys(c.method for c in configs)),
                                  "ratios": ",".join(f"{c.spare_ratio:g}" for c in configs if c.spare_ratio),
                                  "seeds": ",".join(map(str, seeds)), "model": params.model.name,
                                  "preset": params.energy.preset, "energy_scenario": ENERGY_SCENARIO,
                                  "bn": params.train.bn,
                                  "bn_ablation": bn_ablation or "",
                                  "shift_levels": ",".join(map(str, shift_levels or [])),
                                  "chip_instances": chip.instances if chip else 0,
                                  "chip_images": (chip.images or "all") if chip else "",
                                  "chip_sweeps": bool(chip and chip.sweeps),
                                  **{f"epochs.{n}": s.epochs for n, s in params.tasks.items()}},
                  metrics=comparison_metrics(table))
            for path in files:
                t.log_artifact(run_id, path, "comparison")
            experiment_id = t.experiment_id
    logger.info(f"wrote {root / COMPARISON}")
    accuracy = {r["label"]: {n: r[n] for n in params.tasks} | {"mean": r["mean"]}
                for r in accuracy_table(table).iter_rows(named=True)}
    return {"mlflow_run_id": run_id, "mlflow_experiment_id": experiment_id, "folder": str(COMPARISON),
            "accuracy": accuracy, "seeds": seeds, "failures": failures, "markdown": (report_markdown(table, chip_rows) + extra),
            "chip": chip_means(table)}


@flow(name="compare", validate_parameters=True)
def compare(methods: Methods = list(method_names()), ratios: Ratios = list(RATIOS), seeds: Seeds = None,  # noqa: B006
            dask_address: DaskAddress = None, workers: Workers = None,
            dask: bool = False, bn_ablation: BnAblation = None, shift_levels: ShiftSweep = None,
            chip_instances: ChipInstances = 2, chip_images: ChipImages = 200,
            chip_sweeps: bool = False) -> dict[str, Any] | State:
    """Compare the methods on every task of params.yaml (the paper's Tables 2-3); needs the backbone.

    Args:
        methods: Methods to compare; XMA2 runs once per spare-PE ratio.
        ratios: XMA2's spare-PE ratios P, as shares (0.05 = 5% of the PEs).
        seeds: Seeds; every configuration runs once per seed (empty: 3 seeds from params.yaml's).
        dask_address: A running Dask scheduler (tcp://host:8786) to fan the configurations out over.
        workers: Configurations at once on threads (or local Dask workers).
        dask: Start a local Dask cluster of `workers` processes (when no address is given).
        bn_ablation: Also run every mask method with this BN rule (frozen or per_task).
        shift_levels: Run XMA and XMA2 once per number of shift levels N (the paper's Table 2).
        chip_instances: Chip instances per configuration for the chip column; 0: none.
        chip_images: Test images per task on the chip (a seeded subset); empty: all.
        chip_sweeps: Also accuracy on the chip against ADC bits 4..8, device noise and time (plots).
    """
    track_flow_run()  # the run a Ctrl-C marks CANCELLED (flows/signals.py)
    try:
        params, _ = plan_comparison(Path.cwd(), methods, ratios, bn_ablation, shift_levels)
    except UserError as err:  # the run's state is the one line, its log has no traceback
        return Failed(message=str(err))
    runner = task_runner(dask, dask_address, workers or default_workers(params.train.threads))
    chip = ChipPlan(chip_instances, chip_images, chip_sweeps) if chip_instances else None
    result = learn_configurations.with_options(task_runner=runner)(methods=methods, ratios=ratios, seeds=seeds,
                                                                   bn_ablation=bn_ablation,
                                                                   shift_levels=shift_levels, chip=chip)
    publish(result)
    return {k: v for k, v in result.items() if k != "markdown"}


def publish(result: dict[str, Any]) -> None:
    """The comparison on the run's page in the Prefect UI: the tables (markdown) and a link to the MLflow run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    url = mlflow_run_url(result["mlflow_experiment_id"], result["mlflow_run_id"])
    create_link_artifact(url, link_text=f"MLflow run {result['mlflow_run_id']}", key="comparison-mlflow-run",
                         description="The comparison's MLflow run: metrics acc/<label>/<task>, tables, plots")
    create_markdown_artifact(result["markdown"] + f"\n[MLflow run {result['mlflow_run_id']}]({url}) "
                             f"(files: `{result['folder']}/`)\n", key="comparison",
                             description=f"Method comparison, seeds {', '.join(map(str, result['seeds']))}")


def run_comparison(methods: list[str] | None = None, ratios: list[float] | None = None, dask: bool = False,
                   dask_address: str | None = None, workers: int | None = None,
                   seeds: list[int] | None = None, bn_ablation: str | None = None,
                   shift_levels: list[int] | None = None, chip_instances: int = 2, chip_images: int | None = 200,
                   chip_sweeps: bool = False) -> dict[str, Any]:
    """The `compare` flow in this process (what `xbar compare` runs)."""
    return compare(methods=methods or list(method_names()), ratios=list(RATIOS) if ratios is None else ratios,
                   seeds=seeds, dask_address=dask_address, workers=workers, dask=dask, bn_ablation=bn_ablation,
                   shift_levels=shift_levels, chip_instances=chip_instances, chip_images=chip_images,
                   chip_sweeps=chip_sweeps)


if __name__ == "__main__":
    compare()
