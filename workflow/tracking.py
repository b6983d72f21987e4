"""MLflow, the system of record, behind one small context manager.

Runs, all in one experiment (`xbar`):

* one **backbone** run per quantized backbone (tag `xbar.kind=backbone`, keyed by
  the digest of `levels.pt`): source-data input with its digest, fp32/4-bit accuracy;
* one **pipeline** parent run per flow run or, for a plain `dvc repro`, one per backbone.
  A flow does not open MLflow itself (importing it costs seconds): it passes the run's name
  and tags, with a unique `xbar.pipeline_key`, in `XBAR_PIPELINE_RUN`; the first `evaluate`
  creates the run, later ones find it by its key, and the `evaluate` of the flow's last task
  closes it (else the flow does: flows/continual.py);
* one **task** child run per task and parent (`log_task`: `evaluate` hands it a `TaskRecord`):
  params, `accuracy_at_learn`, `acc/<task>` of every task learned so far at step k (the
  forgetting matrix), forgetting, spare PEs, mask bytes, energy, the dataset input, the git
  commit and DVC stage hashes as tags, and the task's artifacts;
* `xbar chip` adds the chip's accuracy to each task's run (`log_chip`: chip/<setting>/...);
* one **comparison** run per `xbar compare` (tag `xbar.kind=comparison`, flows/compare.py):
  `acc/<label>/<task>` after the last task (label `xma2-p10` for XMA2 at P = 10%, see
  `comparison_key`), the comparison's tables and plots as artifacts.

The store defaults to `sqlite:///mlflow.db` in the project (MLflow 3 refuses a
plain file store) and is overridden by `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from xbar.errors import UserError

if TYPE_CHECKING:
    from xbar.params import Params

EXPERIMENT = "xbar"
PIPELINE_ENV = "XBAR_PIPELINE_RUN"  # JSON {"name", "tags", "closed_by"}: the flow's parent run, see pipeline_parent
T = TypeVar("T")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# MLflow error codes of a request the store understood and refused (a bad value, a missing run):
# deterministic, so never retried nor reported as an unavailable store. (Not RESOURCE_ALREADY_EXISTS:
# MLflow's SQL store also answers a concurrent writer's race with it, which a retry resolves.)
REFUSALS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"})


def retry(fn: Callable[[], T], what: str, attempts: int = 5, first_wait: float = 0.5) -> T:
    """Retry I/O on a locked or unreachable store with backoff; then one clear error.

    Every MLflow call goes through here (benchmarks/stage_probe times MLflow by wrapping it).
    """
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            return fn()
        except (MlflowException, OperationalError, OSError) as err:
            if isinstance(err, MlflowException) and err.error_code in REFUSALS:
                raise  # the store answered "no": waiting cannot change that, and it is not an outage
            if attempt == attempts - 1:
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise UserError(f"MLflow store {tracking_uri()} unavailable while {what}: {first}") from None
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


def _client():  # noqa: ANN202 (MlflowClient, imported here: mlflow is slow to import)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


class Tracker:
    """The few MLflow operations xbar needs, each retried on a locked store."""

    def __init__(self) -> None:
        self.client = retry(_client, "opening the store")  # it connects at once
        self.experiment_id = retry(self._experiment, "opening the experiment")

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        return exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT)

    def find(self, filter_string: str, newest_first: bool = True) -> list:
        order = ["attributes.start_time DESC" if newest_first else "attributes.start_time ASC"]
        return retry(lambda: self.client.search_runs([self.experiment_id], filter_string, order_by=order,
                                                     max_results=1000), "searching runs")

    def create(self, name: str, tags: dict[str, str]) -> str:
        run = retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags), "creating a run")
        return run.info.run_id

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None,
            tags: dict | None = None, step: int = 0) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        batch = dict(
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )
        retry(lambda: self.client.log_batch(run_id, **batch), "logging")

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, context: str) -> None:
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(CodeDatasetSource({"xbar.source": source}), name=name, digest=digest)
        entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])
        retry(lambda: self.client.log_inputs(run_id, [entry]), "logging a dataset")

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            retry(lambda: self.client.log_artifact(run_id, str(path), folder), f"logging {path}")

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        """`data` as artifact `artifact_file` ("plots/x.png"): a plot rendered once serves MLflow and DVC."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            self.log_artifact(run_id, path, Path(artifact_file).parent.as_posix() if "/" in artifact_file else None)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        retry(lambda: self.client.set_terminated(run_id, status), "closing a run")


@contextmanager
def tracker() -> Iterator[Tracker]:
    """`with tracker() as t:` -- MLflow opened once, with clear errors and retries."""
    yield Tracker()


def backbone_run(t: Tracker, levels_digest: str, log: Callable[[str], None]) -> str:
    """The run of this quantized backbone; created (and filled by `log`) on first use."""
    runs = t.find(f"tags.`xbar.kind` = 'backbone' AND tags.`xbar.backbone_digest` = '{levels_digest}' "
                  "AND attributes.status = 'FINISHED'")  # one cut off while logging is not reused
    if runs:
        return runs[0].info.run_id
    run_id = t.create("backbone", {"xbar.kind": "backbone", "xbar.backbone_digest": levels_digest,
                                   "xbar.git_commit": git_commit()})
    try:
        log(run_id)
    except BaseException:
        try:
            t.finish(run_id, "FAILED")
        except UserError:  # the store is gone: the run stays RUNNING, equally never reused
            pass
        raise
    t.finish(run_id)
    return run_id


def pipeline_parent(t: Tracker, spec: dict) -> str:
    """A flow's parent run (`spec` as in XBAR_PIPELINE_RUN): found by its key, or created now."""
    runs = t.find(f"tags.`xbar.pipeline_key` = '{spec['tags']['xbar.pipeline_key']}'")
    return runs[0].info.run_id if runs else t.create(spec["name"], spec["tags"])


def parent_run(t: Tracker, backbone_run_id: str) -> str:
    """The flow's parent run (XBAR_PIPELINE_RUN) or, for `dvc repro`, one per backbone."""
    if os.environ.get(PIPELINE_ENV):
        return pipeline_parent(t, json.loads(os.environ[PIPELINE_ENV]))
    runs = t.find(f"tags.`xbar.kind` = 'pipeline' AND tags.`xbar.backbone_run_id` = '{backbone_run_id}' "
                  "AND tags.`xbar.trigger` = 'dvc'")
    if runs:
        return runs[0].info.run_id
    return t.create("dvc-pipeline", {"xbar.kind": "pipeline", "xbar.trigger": "dvc",
                                     "xbar.backbone_run_id": backbone_run_id})


def accuracy_at_learn(t: Tracker, task: str, task_digest: str) -> float | None:
    """The accuracy recorded when this very task artifact (by digest) was learned."""
    runs = t.find(f"tags.`xbar.task` = '{task}' AND tags.`xbar.task_digest` = '{task_digest}' "
                  "AND tags.`xbar.gate` = 'passed'", newest_first=False)
    for run in runs:
        if "accuracy_at_learn" in run.data.metrics:
            return run.data.metrics["accuracy_at_learn"]
    return None


@dataclass(frozen=True)
class TaskRecord:
    """What `evaluate` measured for one task, handed to `log_task`.

    `accuracy`: every task learned so far, on the chip as it stands after this one (a row of the
    accuracy matrix); `train`, `program`, `energy`: the task's stage metrics; `failures`: the
    no-forgetting gate's findings (none: it passed).
    """

    task: str
    order: int
    task_digest: str
    accuracy: dict[str, float]
    forgetting: dict[str, float]
    train: dict
    program: dict
    energy: dict
    train_digest: str
    test_digest: str
    matrix_png: bytes
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskRun:
    """Where `log_task` put the record; `pipeline_key` is the flow's (None under a plain `dvc repro`)."""

    run_id: str
    parent_id: str
    pipeline_key: str | None


def log_task(t: Tracker, params: Params, record: TaskRecord) -> TaskRun:
    """Log `record` as the task's child run (backbone run and parent run found or created first).

    The run carries `xbar.gate` "pending" until everything is logged, then "passed" or "failed":
    a store failing mid-way leaves no half-registered task. The flow's parent run (XBAR_PIPELINE_RUN)
    is closed here when this task is its last stage and the gate passed: the flow need not open MLflow.
    """
    from workflow.io import BACKBONE  # workflow.io imports torch; `xbar report` needs none of this

    backbone_id = backbone_run(t, file_digest(BACKBONE / "levels.pt"), lambda rid: _log_backbone(t, params, rid))
    parent_id = parent_run(t, backbone_id)
    spec = params.tasks[record.task]
    run_id = t.create(record.task, {
        "mlflow.parentRunId": parent_id, "xbar.kind": "task", "xbar.task": record.task,
        "xbar.order": str(record.order), "xbar.task_digest": record.task_digest, "xbar.backbone_run_id": backbone_id,
        "xbar.method": spec.method, "xbar.dataset": spec.dataset.source, "xbar.git_commit": git_commit(),
        "xbar.gate": "pending", **dvc_stage_hashes(record.task)})
    try:
        _log_task_run(t, run_id, params, record)
    except BaseException:
        try:  # the run stays "pending" (never counted as learned); close it if the store still answers
            t.finish(run_id, "FAILED")
        except UserError:
            pass
        raise
    t.log(run_id, tags={"xbar.gate": "failed" if record.failures else "passed"})
    t.finish(run_id, "FAILED" if record.failures else "FINISHED")
    pipeline = json.loads(os.environ.get(PIPELINE_ENV) or "{}")
    if not record.failures and pipeline.get("closed_by") == record.task:  # the flow's last stage: it spares
        t.finish(parent_id)                                                # the flow opening MLflow to close it
    return TaskRun(run_id, parent_id, pipeline.get("tags", {}).get("xbar.pipeline_key"))


def dvc_stage_hashes(task: str) -> dict[str, str]:
    """md5 of each output of this task's earlier stages, from dvc.lock (lineage)."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.exists():
        return {}
    # libyaml's loader: dvc.lock grows by ~300 lines a task, too slow for the pure-Python one
    stages = (yaml.load(lock.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages", {})
    tags = {}
    for name in ("pretrain", "quantize", "deploy_backbone", f"rank_pes@{task}", f"train_masks@{task}",
                 f"program_spares@{task}", f"simulate_energy@{task}"):
        for out in stages.get(name, {}).get("outs", []):
            tags[f"dvc.{name}.{Path(out['path']).name}"] = out.get("md5", "")
    return tags


def _log_backbone(t: Tracker, params: Params, run_id: str) -> None:
    from workflow.io import BACKBONE, METRICS, read_json

    pre, quant = read_json(METRICS / "pretrain.json"), read_json(METRICS / "quantize.json")
    mapping = read_json(METRICS / "map.json") if (METRICS / "map.json").exists() else {}
    t.log(run_id, params={"model": params.model.name, "width": params.model.width, "blocks": params.model.blocks,
                          "source": params.source.dataset.source, "act_bits": params.quant.act_bits,
                          "weight_bits": params.crossbar.weight_bits, "seed": params.seed,
                          # lineage of pretrained weights: which file, and its content
                          **{k: pre[k] for k in ("weights_file", "weights_sha256") if k in pre}},
          metrics={"fp32_accuracy": pre["test_accuracy"],
                   **{f"quantize/{k}": v for k, v in quant.items() if isinstance(v, int | float)},
                   **{f"map/{k}": v for k, v in mapping.items() if isinstance(v, int | float)}})
    t.log_dataset(run_id, params.source.dataset.source, pre["data_digest"], "source", "source")
    for path in (BACKBONE / "levels.pt", METRICS / "pretrain.json", METRICS / "quantize.json"):
        t.log_artifact(run_id, path, "backbone")


def _log_task_run(t: Tracker, run_id: str, params: Params, record: TaskRecord) -> None:
    """The task's child run: params, metrics, the acc/<task> row at step `order`, datasets, artifacts."""
    from workflow.io import task_dir, task_metrics

    task, now, train, program, energy = record.task, record.accuracy, record.train, record.program, record.energy
    spec = params.tasks[task]
    t.log(run_id, params={"method": spec.method, "dataset": spec.dataset.source, "epochs": spec.epochs,
                          "spare_ratio": spec.spare_ratio, "shift_levels": spec.shift_levels,
                          "rank_batch_size": spec.rank_batch_size, "after": spec.after, "seed": params.seed,
                          **{f"crossbar.{k}": v for k, v in params.crossbar.model_dump().items()}},
          metrics={"accuracy_at_learn": now[task], "forgetting": max(record.forgetting[n] for n in now),
                   "spare_pes": train["spare_pes_used"], "mask_bytes": train["mask_bytes_packed"],
                   "mask_bytes_unpacked": train["mask_bytes_unpacked"],
                   "energy_j": energy["total_j"], "inference_j": energy["inference_j"],
                   "reprogram_j": energy["reprogram_j"], "switch_j": energy["switch_j"],
                   "cells_written": program["cells_written"], "task_bytes": train["task_bytes"]})
    t.log(run_id, metrics={f"acc/{n}": a for n, a in now.items()}, step=record.order)
    t.log_dataset(run_id, spec.dataset.source, record.train_digest, task, "train")
    t.log_dataset(run_id, spec.dataset.source, record.test_digest, task, "test")
    for path in [task_dir(task) / f for f in ("ranking.parquet", "ranking.png", "mask_levels.png", "program.parquet",
                                              "energy.png", "energy_layers.parquet", "energy_pes.parquet", "task.pt")]:
        t.log_artifact(run_id, path, "artifacts")
    t.log_bytes(run_id, record.matrix_png, "plots/accuracy_matrix.png")
    for stage in ("rank", "train", "program", "energy"):
        t.log_artifact(run_id, task_metrics(task, stage), "metrics")


def chip_setting(result: dict, adc_bits: int | None = None) -> str:
    """The metric prefix of one chip setting: "paper-adc5", "+ -t86400s" after drift, "+ -differential" /
    "-full" off the defaults (crossbar.signed offset, chip.adc_range calibrated)."""
    bits = result["adc_bits"] if adc_bits is None else adc_bits
    parts = [result["device"], f"adc{bits}"]
    if result.get("time_s"):
        parts.append(f"t{result['time_s']:g}s")
    parts += [v for v, default in ((result.get("signed"), "offset"), (result.get("adc_range"), "calibrated"))
              if v not in (None, default)]
    return "-".join(parts)


def log_chip(t: Tracker, result: dict, digests: dict[str, str]) -> dict[str, str | None]:
    """`xbar chip`'s numbers (its --json object) on each task's run: the newest run whose gate passed for
    this very task.pt (by digest), which `xbar report` reads too. Per setting (`chip_setting`) metrics
    chip/<setting>/{ideal, chip_mean, chip_std, chip_min} (and device_forgetting with --switches), and the
    object as artifact chip/<setting>.json (adc_bits, device, instances, time, range, scheme). Returns
    task -> run id (None: the task has no such run, e.g. MLflow was reset since it was learned)."""
    sweep = result.get("sweep") or {str(result["adc_bits"]): result["tasks"]}
    out: dict[str, str | None] = {}
    for task, digest in digests.items():
        runs = t.find(f"tags.`xbar.task` = '{task}' AND tags.`xbar.task_digest` = '{digest}' "
                      "AND tags.`xbar.gate` = 'passed'")
        out[task] = run_id = runs[0].info.run_id if runs else None
        if run_id is None:
            continue
        for bits, tasks in sweep.items():
            key = chip_setting(result, int(bits))
            numbers = {k: v for k, v in tasks[task].items() if isinstance(v, int | float)}
            head = {k: v for k, v in result.items() if k not in ("tasks", "sweep")} | {"adc_bits": int(bits)}
            t.log(run_id, metrics={f"chip/{key}/{k}": v for k, v in numbers.items()})
            t.log_bytes(run_id, json.dumps({**head, "tasks": {task: tasks[task]}}, indent=2).encode(),
                        f"chip/{key}.json")
    return out


def report(t: Tracker) -> dict:
    """Tasks, accuracy now / at learn, forgetting and the accuracy matrix, from MLflow alone.

    Each task's newest run whose gate passed counts; "now" is what the newest run of the last task
    measured for every earlier task (row k of the matrix is task k's `acc/*`).
    """
    latest: dict[str, object] = {}
    runs = t.find("tags.`xbar.kind` = 'task' AND tags.`xbar.gate` != 'pending'")  # newest first; a run whose
    # gate failed only if no other; a "pending" run was cut off while logging (MLflow failed mid-way)
    for run in sorted(runs, key=lambda r: r.data.tags.get("xbar.gate") != "passed"):
        latest.setdefault(run.data.tags["xbar.task"], run)
    ordered = sorted(latest.values(), key=lambda r: (int(r.data.tags["xbar.order"]), r.info.start_time))
    names = [r.data.tags["xbar.task"] for r in ordered]
    last = ordered[-1].data.metrics if ordered else {}
    tasks = []
    for run in ordered:
        name, m = run.data.tags["xbar.task"], run.data.metrics
        now = last.get(f"acc/{name}")
        tasks.append({"name": name, "order": int(run.data.tags["xbar.order"]), "dataset": run.data.tags["xbar.dataset"],
                      "method": run.data.tags["xbar.method"], "accuracy_at_learn": m.get("accuracy_at_learn"),
                      "accuracy_now": now, "forgetting": None if now is None else m["accuracy_at_learn"] - now,
                      "spare_pes": m.get("spare_pes"), "mask_bytes": m.get("mask_bytes"), "task_bytes": m.get("task_bytes"),
                      "energy_j": m.get("energy_j"), "reprogram_j": m.get("reprogram_j"), "switch_j": m.get("switch_j"),
                      "gate": run.data.tags.get("xbar.gate"), "run_id": run.info.run_id})
    matrix = [[run.data.metrics.get(f"acc/{n}") for n in names] for run in ordered]
    return {"tasks": tasks, "accuracy_matrix": matrix, "comparison": comparison(t)}


def comparison_key(label: str) -> str:
    """A comparison label in an MLflow metric name, which may not hold '@': "xma2@10" -> "xma2-p10"."""
    return label.replace("@", "-p")


def comparison(t: Tracker) -> dict[str, dict[str, float]]:
    """{label: {task: accuracy after the last task}} of the newest finished comparison run ({} if none)."""
    runs = t.find("tags.`xbar.kind` = 'comparison' AND attributes.status = 'FINISHED'")
    if not runs:
        return {}
    metrics, tags = runs[0].data.metrics, runs[0].data.tags
    tasks, out = tags.get("xbar.tasks", "").split(","), {}
    for label in filter(None, tags.get("xbar.labels", "").split(",")):
        key = comparison_key(label)
        out[label] = {task: metrics[f"acc/{key}/{task}"] for task in tasks if f"acc/{key}/{task}" in metrics}
    return out
