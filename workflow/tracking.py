"""MLflow, the system of record, behind one small context manager.

Runs, all in one experiment (`xbar`):

* one **backbone** run per quantized backbone (tag `xbar.kind=backbone`, keyed by
  the digest of `levels.pt`): source-data input with its digest, fp32/4-bit accuracy;
* one **pipeline** parent run per flow run or per `dvc repro` (`dvc-pipeline`, keyed by the DVC
  process; stages run by hand: `stages`, one per backbone). A flow does not open MLflow itself
  (importing it costs seconds): it passes the run's name and tags, with a unique
  `xbar.pipeline_key`, in `XBAR_PIPELINE_RUN`; the first `evaluate` creates the run, later ones
  find it by its key, and the `evaluate` of the flow's last task closes it (else the flow does:
  flows/continual.py). Under `dvc repro` every `evaluate` closes it (FAILED if a stage failed);
* one **task** child run per task attempt, from its first stage's start to its `evaluate`
  (workflow/attempts.py; `log_task`, or `close_attempt` for one that failed or was stopped):
  params (the spec, the crossbar, the recipe), `accuracy_at_learn`, `acc/<task>` of every task
  learned so far at step k (the forgetting matrix), forgetting, spare PEs, mask bytes, energy,
  train.json's numbers and training curve, the dataset inputs, the git commit and DVC stage
  hashes as tags, and the task's artifacts; with its **logged model** (the task's image,
  workflow/model.py loads it) registered as a version of `xbar-chip` (aliases `chip`, `task-<name>`);
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

from workflow.attempts import dvc_invocation, process_start
from xbar.errors import UserError

if TYPE_CHECKING:
    from xbar.params import Params

EXPERIMENT = "xbar"
# MLflow 3's UI opens an experiment by this tag: a model-training experiment, not a GenAI one (which it
# would guess from runs without models; docs/decisions.md "MLflow as its users read it").
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: MODEL_TRAINING,
                   "mlflow.note.content": "xbar: continual learning on ReRAM crossbars (XMA2). One run per task "
                                          "(its stages), each with a logged model: the task's image on the chip."}
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
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())  # the registry resolves `models:/<id>` through the default client
    return MlflowClient(tracking_uri())


class Tracker:
    """The few MLflow operations xbar needs, each retried on a locked store."""

    def __init__(self) -> None:
        self.client = retry(_client, "opening the store")  # it connects at once
        self.experiment_id = retry(self._experiment, "opening the experiment")

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return self.client.create_experiment(EXPERIMENT, tags=EXPERIMENT_TAGS)
        if exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:  # a store made before the tag: set it once
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return exp.experiment_id

    def find(self, filter_string: str, newest_first: bool = True) -> list:
        order = ["attributes.start_time DESC" if newest_first else "attributes.start_time ASC"]
        return retry(lambda: self.client.search_runs([self.experiment_id], filter_string, order_by=order,
                                                     max_results=1000), "searching runs")

    def create(self, name: str, tags: dict[str, str], start_ms: int | None = None) -> str:
        run = retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags, start_time=start_ms),
                    "creating a run")
        return run.info.run_id

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None,
            tags: dict | None = None, step: int = 0, model_id: str | None = None) -> None:
        """One batch; `model_id`: the metrics are the logged model's too (its page in the UI shows them)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        batch = dict(
            metrics=[Metric(k, float(v), now, step, model_id=model_id) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )
        retry(lambda: self.client.log_batch(run_id, **batch), "logging")

    def log_steps(self, run_id: str, points: list[tuple[str, float, int]]) -> None:
        """Metrics by step (a training curve): (key, value, step), in batches of MLflow's 1000."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in points]
        for i in range(0, len(metrics), 1000):
            retry(lambda: self.client.log_batch(run_id, metrics=metrics[i:i + 1000]), "logging a curve")

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

    def reopen(self, run_id: str) -> None:
        """A closed parent run runs again (the next task of the same `dvc repro`)."""
        retry(lambda: self.client.update_run(run_id, status="RUNNING"), "re-opening a run")


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
    """A flow's parent run (`spec` as in XBAR_PIPELINE_RUN): found by its key, or created now (started when
    the flow started)."""
    runs = t.find(f"tags.`xbar.pipeline_key` = '{spec['tags']['xbar.pipeline_key']}'")
    return runs[0].info.run_id if runs else t.create(spec["name"], spec["tags"], spec.get("start_ms"))


def parent_run(t: Tracker, backbone_run_id: str) -> str:
    """The flow's parent run (XBAR_PIPELINE_RUN) or, for `dvc repro`, that invocation's `dvc-pipeline` run
    (re-opened if an earlier task of it closed it); stages run by hand: one `stages` run per backbone."""
    if os.environ.get(PIPELINE_ENV):
        return pipeline_parent(t, json.loads(os.environ[PIPELINE_ENV]))
    invocation = dvc_invocation()
    close_dead_invocations(t)
    trigger = "dvc" if invocation else "hand"
    query = (f"tags.`xbar.kind` = 'pipeline' AND tags.`xbar.backbone_run_id` = '{backbone_run_id}' "
             f"AND tags.`xbar.trigger` = '{trigger}'")
    query += f" AND tags.`xbar.dvc_invocation` = '{invocation[0]}'" if invocation else ""
    runs = t.find(query)
    if runs:
        if runs[0].info.status != "RUNNING":
            t.reopen(runs[0].info.run_id)
        return runs[0].info.run_id
    return t.create("dvc-pipeline" if invocation else "stages", {
        "xbar.kind": "pipeline", "xbar.trigger": trigger, "xbar.backbone_run_id": backbone_run_id,
        "xbar.git_commit": git_commit(), **({"xbar.dvc_invocation": invocation[0]} if invocation else {})},
        invocation[1] if invocation else None)


def close_dead_invocations(t: Tracker) -> None:
    """`dvc-pipeline` runs still RUNNING whose `dvc repro` is gone (killed before its last `evaluate`): KILLED."""
    for run in t.find("tags.`xbar.trigger` = 'dvc' AND attributes.status = 'RUNNING'"):
        pid, _, start = run.data.tags.get("xbar.dvc_invocation", "").partition("-")
        if pid.isdigit() and process_start(int(pid)) != start:
            t.finish(run.info.run_id, "KILLED")


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
    model_id: str | None = None


REGISTERED_MODEL = "xbar-chip"  # the deployed backbone; version 1 the backbone alone, each later one a task's image
CHIP_ALIAS = "chip"  # the version the chip serves now (the task learned last)


def task_alias(task: str) -> str:
    """A task's own alias: `task-<name>` (an alias may not look like a version, e.g. `v1`)."""
    return f"task-{task}"


def log_task(t: Tracker, params: Params, record: TaskRecord) -> TaskRun:
    """Log `record` as the task's child run (backbone run and parent run found or created first).

    The run starts when the task's first stage started (its attempt, workflow/attempts.py) and ends now.
    It carries `xbar.gate` "pending" until everything is logged -- the curve, the logged model and, if the
    gate passed, its registered version -- then "passed" or "failed": a store failing mid-way leaves no
    half-registered task. The parent run is closed here when this task is its last stage (the flow's
    `closed_by`, or under `dvc repro` every task: the last one leaves it closed) and the gate passed.
    """
    from workflow.attempts import read_attempt, remove_attempt
    from workflow.io import BACKBONE  # workflow.io imports torch; `xbar report` needs none of this

    attempt = read_attempt(record.task) or {}
    backbone_id = backbone_run(t, file_digest(BACKBONE / "levels.pt"), lambda rid: _log_backbone(t, params, rid))
    backbone_model = backbone_model_id(t, params, backbone_id)
    parent_id = parent_run(t, backbone_id)
    for stale in t.find(f"tags.`xbar.kind` = 'task' AND tags.`xbar.task` = '{record.task}' "
                        "AND attributes.status = 'RUNNING'"):  # cut off mid-way (we hold DVC's lock on this task)
        t.finish(stale.info.run_id, "KILLED")
    spec = params.tasks[record.task]
    lineage = {"xbar.task": record.task, "xbar.order": str(record.order), "xbar.task_digest": record.task_digest,
               "xbar.backbone_run_id": backbone_id, "xbar.backbone_model_id": backbone_model,
               "xbar.method": spec.method, "xbar.dataset": spec.dataset.source, "xbar.git_commit": git_commit(),
               "xbar.train_digest": record.train_digest, "xbar.test_digest": record.test_digest,
               **dvc_stage_hashes(record.task)}
    run_id = t.create(record.task, {"mlflow.parentRunId": parent_id, "xbar.kind": "task", "xbar.gate": "pending",
                                    **lineage, **({"xbar.stages": ",".join(attempt["stages"])}
                                                  if attempt.get("stages") else {})},
                      attempt.get("start_ms"))
    model_id = None
    try:
        _log_task_run(t, run_id, params, record)
        log_curve(t, run_id, record.train)
        model_id = log_task_model(t, params, record, run_id, lineage)
        if not record.failures:
            register_task_model(t, record.task, model_id, run_id)
    except BaseException:
        try:  # the run stays "pending" (never counted as learned); close it if the store still answers
            t.finish(run_id, "FAILED")
            if model_id:
                retry(lambda: t.client.finalize_logged_model(model_id, "FAILED"), "closing a logged model")
        except UserError:
            pass
        raise
    t.log(run_id, tags={"xbar.gate": "failed" if record.failures else "passed"})
    t.finish(run_id, "FAILED" if record.failures else "FINISHED")
    remove_attempt(record.task)
    pipeline = json.loads(os.environ.get(PIPELINE_ENV) or "{}")
    if record.failures:
        if not pipeline:  # the flow closes its own parent run FAILED
            t.log(parent_id, tags={"xbar.failed_stage": f"evaluate@{record.task}"})
            t.finish(parent_id, "FAILED")
    elif not pipeline or pipeline.get("closed_by") == record.task:  # the last stage: it spares the flow
        t.finish(parent_id)                                          # opening MLflow to close it
    return TaskRun(run_id, parent_id, pipeline.get("tags", {}).get("xbar.pipeline_key"), model_id)


def close_attempt(task: str, status: str, message: str) -> str | None:
    """End `task`'s open attempt (workflow/attempts.py) as a run: `status` KILLED (a stage was stopped) or
    FAILED (a stage failed; its flow or `dvc-pipeline` parent run FAILED too, naming the stage). Returns
    the run's id (None: no attempt was open)."""
    from workflow.attempts import now_ms, read_attempt, remove_attempt

    attempt = read_attempt(task)
    if attempt is None:
        return None
    pipeline = json.loads(attempt["pipeline"]) if attempt.get("pipeline") else None
    with tracker() as t:
        parent_id = pipeline_parent(t, pipeline) if pipeline else _dvc_parent_if_any(t, attempt.get("invocation"))
        stage = attempt.get("stage") or "?"
        run_id = t.create(task, {"xbar.kind": "task", "xbar.task": task, "xbar.gate": "not-reached",
                                 "xbar.git_commit": git_commit(), "xbar.stopped_at": f"{stage}@{task}",
                                 "mlflow.note.content": message,
                                 **({"mlflow.parentRunId": parent_id} if parent_id else {})}, attempt["start_ms"])
        retry(lambda: t.client.set_terminated(run_id, status, now_ms()), "closing a run")
        if parent_id and status == "FAILED" and not pipeline:  # a flow closes its own parent run
            t.log(parent_id, tags={"xbar.failed_stage": f"{stage}@{task}"})
            t.finish(parent_id, "FAILED")
    remove_attempt(task)
    return run_id


def _dvc_parent_if_any(t: Tracker, invocation: str | None) -> str | None:
    """The parent run of the `dvc repro` that ran the attempt (`invocation`): made now if that is this one and
    no task of it logged yet; None if the attempt ran outside `dvc repro`, under a `dvc repro` that made
    none, or before the backbone exists (a backbone stage's failure: no task to record)."""
    from workflow.io import BACKBONE, METRICS
    from xbar.params import load_params

    now = dvc_invocation()
    if invocation is None:
        return None
    if now is None or now[0] != invocation:  # an earlier, stopped `dvc repro`
        runs = t.find(f"tags.`xbar.dvc_invocation` = '{invocation}'")
        return runs[0].info.run_id if runs else None
    if not (BACKBONE / "levels.pt").exists() or not (METRICS / "quantize.json").exists():
        return None
    params = load_params(Path("params.yaml"))
    backbone_id = backbone_run(t, file_digest(BACKBONE / "levels.pt"), lambda rid: _log_backbone(t, params, rid))
    return parent_run(t, backbone_id)


def close_flow_runs(pipeline_key: str, status: str, parent_spec: dict | None = None) -> None:
    """A stopped flow's task runs: open attempts and runs still RUNNING under its parent end as `status`;
    with `parent_spec` (XBAR_PIPELINE_RUN's), the parent run too (created if no stage made it yet)."""
    from workflow.attempts import ending, open_attempts

    for attempt in open_attempts(pipeline_key):
        failed, message = ending(attempt)
        close_attempt(attempt["task"], failed if failed == "FAILED" else status, message)
    with tracker() as t:
        for parent in t.find(f"tags.`xbar.pipeline_key` = '{pipeline_key}'"):
            for run in t.find(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' AND attributes.status = 'RUNNING'"):
                t.finish(run.info.run_id, status)
        if parent_spec is not None:
            t.finish(pipeline_parent(t, parent_spec), status)


def log_curve(t: Tracker, run_id: str, train: dict) -> None:
    """The training curve as step metrics, from train.json's `curve` (or `history`): a list of points, each
    {"step": optimizer step, name: number, ...}, a nested {name: number} (e.g. a mask's level shares)
    logged as `<key>/<name>`. Absent (an older train.json): nothing; the final numbers are logged anyway."""
    points = train.get("curve") or train.get("history") or []
    out: list[tuple[str, float, int]] = []
    for point in points if isinstance(points, list) else []:
        if not isinstance(point, dict) or not isinstance(point.get("step"), int | float):
            continue
        for key, value in point.items():
            if key == "step":
                continue
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                out.append((f"curve/{key}", value, point["step"]))
            elif isinstance(value, dict):
                out += [(f"curve/{key}/{k}", v, point["step"]) for k, v in value.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)]
    if out:
        t.log_steps(run_id, out)


def backbone_model_id(t: Tracker, params: Params, backbone_run_id: str) -> str:
    """The deployed backbone's logged model (its levels.pt), made once per backbone run and registered as
    version 1 of REGISTERED_MODEL's line for it; its id is the backbone run's tag `xbar.model_id`."""
    from workflow.io import BACKBONE

    tags = retry(lambda: t.client.get_run(backbone_run_id), "reading the backbone run").data.tags
    if tags.get("xbar.model_id"):
        return tags["xbar.model_id"]
    digest = tags.get("xbar.backbone_digest", "")
    model = retry(lambda: t.client.create_logged_model(
        t.experiment_id, name="backbone", source_run_id=backbone_run_id, model_type="xbar-backbone",
        tags={"xbar.kind": "backbone", "xbar.backbone_digest": digest, "xbar.git_commit": git_commit(),
              **dvc_stage_hashes("")},
        params={"model": params.model.name, "width": str(params.model.width), "blocks": str(params.model.blocks),
                "weight_bits": str(params.crossbar.weight_bits)}), "creating the backbone's logged model")
    retry(lambda: t.client.log_model_artifact(model.model_id, str(BACKBONE / "levels.pt")), "logging the backbone")
    retry(lambda: t.client.finalize_logged_model(model.model_id, "READY"), "finalizing the backbone's model")
    _ensure_registered_model(t)
    version = retry(lambda: t.client.create_model_version(
        REGISTERED_MODEL, f"models:/{model.model_id}", run_id=backbone_run_id, model_id=model.model_id,
        tags={"xbar.kind": "backbone", "xbar.backbone_digest": digest}), "registering the backbone")
    retry(lambda: t.client.set_registered_model_alias(REGISTERED_MODEL, "backbone", version.version), "aliasing")
    _mark_registered(t, model.model_id, version.version)
    t.log(backbone_run_id, tags={"xbar.model_id": model.model_id})
    return model.model_id


def _ensure_registered_model(t: Tracker) -> None:
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: t.client.get_registered_model(REGISTERED_MODEL), "reading the registered model")
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST
        retry(lambda: t.client.create_registered_model(
            REGISTERED_MODEL, description="The deployed backbone on the chip. Each version after the backbone's "
            "is a task's image (masks, spare-PE weights, head) on it; alias `chip`: what the chip serves now, "
            "`task-<name>`: a task's image, `backbone`: the backbone alone."), "registering the model")


def _mark_registered(t: Tracker, model_id: str, version: str) -> None:
    """The logged model's tag naming its registered version, as `mlflow.register_model` sets it: the UI's
    model page shows "registered" from it."""
    tag = json.dumps([{"name": REGISTERED_MODEL, "version": str(version)}])
    retry(lambda: t.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": tag}), "tagging a model")


def log_task_model(t: Tracker, params: Params, record: TaskRecord, run_id: str, lineage: dict[str, str]) -> str:
    """The task's image as an MLflow 3 logged model (workflow/model.py loads it and predicts), with its
    lineage as tags and the run's accuracy as its metric; READY when complete."""
    import shutil

    import yaml
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    from workflow.io import BACKBONE, task_dir
    from workflow.model import FILES

    spec = params.tasks[record.task]
    model = retry(lambda: t.client.create_logged_model(
        t.experiment_id, name=record.task, source_run_id=run_id, model_type="xbar-task",
        tags={"xbar.kind": "task", **lineage},
        params={"method": spec.method, "dataset": spec.dataset.source, "spare_ratio": str(spec.spare_ratio),
                "shift_levels": str(spec.shift_levels), "epochs": str(spec.epochs)}), "creating a logged model")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        shutil.copyfile(task_dir(record.task) / "task.pt", data / FILES[0])
        shutil.copyfile(BACKBONE / "levels.pt", data / FILES[1])
        (data / FILES[2]).write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        meta = Model(artifact_path=record.task, run_id=run_id, model_id=model.model_id)
        add_to_model(meta, loader_module="workflow.model", data="data")
        meta.save(str(Path(tmp) / "MLmodel"))
        retry(lambda: t.client.log_model_artifacts(model.model_id, tmp), "logging a model's files")
    from mlflow.entities import Metric

    # the model's metric, on its test split: the model's page shows it, with the dataset it was measured on
    at_learn = Metric("accuracy_at_learn", float(record.accuracy[record.task]), int(time.time() * 1000), 0,
                      model_id=model.model_id, dataset_name=spec.dataset.source, dataset_digest=record.test_digest)
    retry(lambda: t.client.log_batch(run_id, metrics=[at_learn]), "logging a model's metric")
    retry(lambda: t.client.finalize_logged_model(model.model_id, "READY"), "finalizing a logged model")
    return model.model_id


def register_task_model(t: Tracker, task: str, model_id: str, run_id: str) -> None:
    """A learned task's image: a version of REGISTERED_MODEL, aliased `task-<name>` and `chip` (served now).
    A version whose aliases could not be set is deleted: nothing half-registered."""
    _ensure_registered_model(t)
    version = retry(lambda: t.client.create_model_version(
        REGISTERED_MODEL, f"models:/{model_id}", run_id=run_id, model_id=model_id,
        tags={"xbar.kind": "task", "xbar.task": task}), "registering a task's model")
    try:
        for alias in (task_alias(task), CHIP_ALIAS):
            retry(lambda a=alias: t.client.set_registered_model_alias(REGISTERED_MODEL, a, version.version),
                  "aliasing a task's model")
        _mark_registered(t, model_id, version.version)
    except BaseException:
        try:
            retry(lambda: t.client.delete_model_version(REGISTERED_MODEL, version.version), "unregistering")
        except UserError:
            pass
        raise


def dvc_stage_hashes(task: str) -> dict[str, str]:
    """md5 of each output of this task's earlier stages, from dvc.lock (lineage)."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.exists():
        return {}
    # libyaml's loader: dvc.lock grows by ~300 lines a task, too slow for the pure-Python one
    stages = (yaml.load(lock.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages", {})
    tags = {}
    names = ("pretrain", "quantize", "deploy_backbone")
    for name in names + ((f"rank_pes@{task}", f"train_masks@{task}", f"program_spares@{task}",
                          f"simulate_energy@{task}") if task else ()):
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
                          **{f"crossbar.{k}": v for k, v in params.crossbar.model_dump().items()},
                          **{f"train.{k}": v for k, v in params.train.model_dump().items()}},  # the recipe
          metrics={"forgetting": max(record.forgetting[n] for n in now),  # accuracy_at_learn: log_task_model
                   "spare_pes": train["spare_pes_used"], "mask_bytes": train["mask_bytes_packed"],
                   "mask_bytes_unpacked": train["mask_bytes_unpacked"],
                   "energy_j": energy["total_j"], "inference_j": energy["inference_j"],
                   "reprogram_j": energy["reprogram_j"], "switch_j": energy["switch_j"],
                   "cells_written": program["cells_written"], "task_bytes": train["task_bytes"]})
    t.log(run_id, metrics={f"acc/{n}": a for n, a in now.items()}, step=record.order)
    t.log(run_id, metrics=numbers(train, "train"), step=int(train.get("optimizer_steps") or 0))
    t.log_dataset(run_id, spec.dataset.source, record.train_digest, task, "train")
    t.log_dataset(run_id, spec.dataset.source, record.test_digest, task, "test")
    for path in [task_dir(task) / f for f in ("ranking.parquet", "ranking.png", "mask_levels.png", "program.parquet",
                                              "energy.png", "energy_layers.parquet", "energy_pes.parquet", "task.pt")]:
        t.log_artifact(run_id, path, "artifacts")
    t.log_bytes(run_id, record.matrix_png, "plots/accuracy_matrix.png")
    for stage in ("rank", "train", "program", "energy"):
        t.log_artifact(run_id, task_metrics(task, stage), "metrics")


def numbers(obj: dict, prefix: str) -> dict[str, float]:
    """The numbers of a stage's JSON as metrics `<prefix>/<key>` (a nested {name: number}: `<prefix>/<key>/<name>`;
    lists and text left out): whatever train_masks records, e.g. a mask's level shares, reaches MLflow."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
        elif isinstance(value, dict):
            out |= {f"{prefix}/{key}/{k}": v for k, v in value.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)}
    return out


def chip_setting(result: dict, adc_bits: int | None = None) -> str:
    """The metric prefix of one chip setting: "paper-adc5", "+ -t86400s" after drift, "+ -differential" /
    "-full" / "-clipmse" off the defaults (crossbar.signed offset, chip.adc_range per_column, chip.adc_clip 100)."""
    bits = result["adc_bits"] if adc_bits is None else adc_bits
    parts = [result["device"], f"adc{bits}"]
    if result.get("time_s"):
        parts.append(f"t{result['time_s']:g}s")
    parts += [v for v, default in ((result.get("signed"), "offset"), (result.get("adc_range"), "per_column"))
              if v not in (None, default)]
    if result.get("adc_clip") not in (None, 100, 100.0):
        parts.append(f"clip{result['adc_clip']:g}" if result["adc_clip"] != "mse" else "clipmse")
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
    runs = [r for r in t.find("tags.`xbar.kind` = 'task'") if r.data.tags.get("xbar.gate") in ("passed", "failed")]
    # newest first; a run whose gate failed only if no other; "pending": cut off while logging (MLflow failed
    # mid-way); "not-reached": a stage before the gate failed or was stopped (close_attempt)
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


if __name__ == "__main__":  # `python -m workflow.tracking close-attempt TASK STATUS MESSAGE` (workflow/attempts.py)
    import sys

    if len(sys.argv) != 5 or sys.argv[1] != "close-attempt":
        sys.exit("usage: python -m workflow.tracking close-attempt TASK STATUS MESSAGE")
    try:
        close_attempt(*sys.argv[2:])
    except UserError as err:
        sys.exit(f"error: {err}")
