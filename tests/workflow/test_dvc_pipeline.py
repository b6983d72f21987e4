"""The real `dvc` CLI on a tiny configuration in a temporary git repository.

From a fresh copy `dvc repro` runs everything; a second `dvc repro` runs
nothing; a task appended to params.yaml runs only that task's stages; the
evaluate gate fails, naming the task and both accuracies, when an earlier
task's accuracy changes; MLflow holds the lineage data digest -> backbone run
-> task run.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from mlflow import MlflowClient

from project import make_tiny_project

pytestmark = pytest.mark.slow

TASK_STAGES = ("rank_pes", "train_masks", "program_spares", "simulate_energy", "evaluate")


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def digests(root, task: str) -> dict[str, str]:
    folder = root / "artifacts" / "tasks" / task
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    project = make_tiny_project(tmp_path_factory.mktemp("dvc") / "project", {"first": {"method": "xma2"}})
    first = project.dvc("repro")
    return project, first.stdout


def test_fresh_repro_runs_every_stage(pipeline):
    project, output = pipeline
    expected = {"pretrain", "quantize", "deploy_backbone"} | {f"{s}@first" for s in TASK_STAGES}
    assert ran(output) == expected
    evaluation = json.loads((project.root / "metrics/tasks/first/evaluate.json").read_text())
    assert evaluation["gate"] == "passed" and evaluation["accuracy"]["first"] > 10  # 10 classes: beats chance
    shown = project.dvc("metrics", "show", "--json").stdout
    assert "accuracy_at_learn" in shown and "test_accuracy" in shown


def runs(project, query: str = "") -> list:
    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    return client.search_runs([exp.experiment_id], query, max_results=1000)


def mtime_ms(path) -> float:
    return path.stat().st_mtime * 1000


def test_the_task_run_spans_its_stages_and_the_pipeline_run_ends_with_repro(pipeline):
    project, _ = pipeline
    root = project.root
    (task,) = runs(project, "tags.`xbar.task` = 'first'")
    info = task.info
    assert info.status == "FINISHED" and task.data.tags["xbar.gate"] == "passed"
    assert task.data.tags["xbar.stages"] == "rank_pes,train_masks,program_spares,simulate_energy"
    # it opened before rank_pes wrote its output and closed after the last stage before evaluate wrote its own
    assert info.start_time <= mtime_ms(root / "artifacts/tasks/first/ranking.parquet")
    assert info.end_time >= mtime_ms(root / "artifacts/tasks/first/energy_pes.parquet")
    parent = MlflowClient(project.mlflow_uri).get_run(task.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "dvc-pipeline" and parent.info.status == "FINISHED"
    assert parent.info.start_time <= mtime_ms(root / "artifacts/backbone/fp32.pt")  # started with `dvc repro`
    assert parent.info.end_time >= info.end_time
    assert [r.info.run_name for r in runs(project, "attributes.status = 'RUNNING'")] == []
    exp = MlflowClient(project.mlflow_uri).get_experiment_by_name("xbar")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # a model-training experiment
    # the training curve: every held-out check of train.json as step metrics of the task's run
    curve = json.loads((root / "metrics/tasks/first/train.json").read_text())["curve"]
    assert len(curve) >= 2 and curve[0]["step"] == 0
    history = MlflowClient(project.mlflow_uri).get_metric_history(info.run_id, "curve/held_out_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(p["step"], p["held_out_accuracy"]) for p in curve]


def test_a_logged_model_per_task_loads_and_predicts_as_the_task_did(pipeline):
    import mlflow
    import torch

    from xbar.data import load_task_data
    from xbar.params import load_params

    project, _ = pipeline
    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert set(models) == {"backbone", "first"} and {m.status.to_proto() for m in models.values()} == {2}  # READY
    (task,) = runs(project, "tags.`xbar.task` = 'first'")
    model = models["first"]
    tags = model.tags
    assert model.source_run_id == task.info.run_id
    assert tags["xbar.backbone_model_id"] == models["backbone"].model_id  # lineage: the backbone's model
    assert tags["xbar.task_digest"] == task.data.tags["xbar.task_digest"] and len(tags["xbar.train_digest"]) == 16
    assert tags["xbar.git_commit"] != "unknown" and tags["dvc.train_masks@first.task.pt"]
    registered = client.get_registered_model("xbar-chip")
    chip = client.get_model_version_by_alias("xbar-chip", "chip")
    assert chip.source == f"models:/{model.model_id}" and registered.aliases["task-first"] == int(chip.version)
    assert client.get_model_version_by_alias("xbar-chip", "backbone").source == f"models:/{models['backbone'].model_id}"

    params = load_params(project.params)
    data = load_task_data(params.tasks["first"].dataset, params.seed)
    images = torch.stack([data.test[i][0] for i in range(len(data.test))]).numpy()
    labels = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
    mlflow.set_tracking_uri(project.mlflow_uri)  # as in the project directory, whose mlflow.db is MLflow's default
    predicted = mlflow.pyfunc.load_model("models:/xbar-chip@chip").predict(images)  # the documented call
    accuracy = float((torch.as_tensor(predicted) == labels).float().mean() * 100)
    assert abs(accuracy - task.data.metrics["accuracy_at_learn"]) <= 0.01  # the gate's own tolerance


def test_second_repro_runs_nothing(pipeline):
    project, _ = pipeline
    out = project.dvc("repro")
    assert ran(out.stdout) == set()


def test_mlflow_lineage_from_data_digest_to_task_run(pipeline):
    project, _ = pipeline
    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    task_run = client.search_runs([exp.experiment_id], "tags.`xbar.task` = 'first'")[0]
    backbone = client.get_run(task_run.data.tags["xbar.backbone_run_id"])
    assert backbone.data.tags["xbar.kind"] == "backbone"
    pretrain = json.loads((project.root / "metrics/pretrain.json").read_text())
    assert [d.dataset.digest for d in backbone.inputs.dataset_inputs] == [pretrain["data_digest"]]
    parent = client.get_run(task_run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["xbar.kind"] == "pipeline"
    splits = {tag.value: d.dataset.digest for d in task_run.inputs.dataset_inputs for tag in d.tags
              if tag.key == "mlflow.data.context"}
    train = json.loads((project.root / "metrics/tasks/first/train.json").read_text())
    # the two logged split digests are the ones the task was trained on (TaskData.digest combines them)
    assert hashlib.sha256(f"{splits['train']}:{splits['test']}".encode()).hexdigest()[:16] == train["data_digest"]
    metrics = task_run.data.metrics
    assert metrics["accuracy_at_learn"] == metrics["acc/first"]
    assert task_run.data.tags["xbar.git_commit"] != "unknown"
    assert any(k.startswith("dvc.train_masks@first") for k in task_run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(task_run.info.run_id, "artifacts")}
    assert "artifacts/task.pt" in artifacts


def test_added_task_runs_only_its_stages_and_keeps_earlier_bytes(pipeline):
    project, _ = pipeline
    before = digests(project.root, "first")
    params = yaml.safe_load(project.params.read_text())
    params["tasks"]["second"] = {"after": "first", "dataset": "lfw_faces", "method": "xma", "epochs": 1}
    project.params.write_text(yaml.safe_dump(params, sort_keys=False))
    out = project.dvc("repro")
    assert ran(out.stdout) == {f"{s}@second" for s in TASK_STAGES}
    assert digests(project.root, "first") == before
    row = json.loads((project.root / "metrics/tasks/second/evaluate.json").read_text())["accuracy"]
    first = json.loads((project.root / "metrics/tasks/first/evaluate.json").read_text())
    assert row["first"] == first["accuracy_at_learn"]  # no forgetting, exactly


def test_report_json_and_the_forgetting_matrix_in_mlflow(pipeline):
    """After two tasks: `xbar report --json` from MLflow alone, and task 1's accuracy logged by task 2's run
    at step 2 (row 2 of the forgetting matrix)."""
    project, _ = pipeline
    report = json.loads(project.python("-m", "xbar.cli", "report", "--json").stdout)
    first, second = report["tasks"]
    keys = {"name", "order", "dataset", "method", "accuracy_at_learn", "accuracy_now", "forgetting", "spare_pes",
            "mask_bytes", "energy_j"}
    assert keys <= set(first) and (first["name"], first["order"], second["name"], second["order"]) == (
        "first", 1, "second", 2)
    assert (first["method"], second["method"], second["dataset"]) == ("xma2", "xma", "lfw_faces")
    assert first["accuracy_now"] == first["accuracy_at_learn"] and first["forgetting"] == 0
    assert first["spare_pes"] > 0 and second["spare_pes"] == 0 and first["mask_bytes"] > 0 and first["energy_j"] > 0
    assert report["accuracy_matrix"][-1][0] == first["accuracy_at_learn"]
    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    run = client.search_runs([exp.experiment_id], "tags.`xbar.task` = 'second'")[0]
    history = client.get_metric_history(run.info.run_id, "acc/first")
    assert [(m.step, m.value) for m in history] == [(2, first["accuracy_at_learn"])]
    # the chip serves the task learned last; each task keeps its own alias
    assert client.get_model_version_by_alias("xbar-chip", "chip").run_id == run.info.run_id
    assert client.get_model_version_by_alias("xbar-chip", "task-first").run_id == first["run_id"]


def test_gate_fails_when_an_earlier_task_changes(pipeline):
    project, _ = pipeline
    task_pt = project.root / "artifacts/tasks/first/task.pt"
    original = task_pt.read_bytes()
    import torch

    task = torch.load(task_pt, weights_only=True)
    for name, codes in task["column_masks"].items():  # forget: zero every column mask of task 1
        task["column_masks"][name] = torch.zeros_like(codes)
    torch.save(task, task_pt)
    try:
        out = project.python("-m", "stages.evaluate", "--task", "second", check=False)
    finally:
        task_pt.write_bytes(original)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert "no-forgetting gate failed" in line and "task first" in line
    assert len(re.findall(r"\d+\.\d\d%", line)) == 2


def test_a_failed_stage_leaves_its_runs_failed_not_running(pipeline):
    """A stage failing under `dvc repro` closes the task's run FAILED (the stage named) and that invocation's
    pipeline run FAILED with the stage: nothing stays RUNNING."""
    project, _ = pipeline
    before = project.params.read_text()
    params = yaml.safe_load(before)
    from project import image_folder

    image_folder(project.root / "data/one", ["only"])  # one class: rank_pes refuses it
    params["tasks"]["third"] = {"after": "second", "dataset": {"source": "imagefolder", "root": "data/one"},
                                "epochs": 1}
    project.params.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = project.dvc("repro", check=False)
    finally:
        project.params.write_text(before)
    assert out.returncode != 0 and "rank_pes@third" in out.stderr + out.stdout
    (failed,) = runs(project, "tags.`xbar.task` = 'third'")
    assert failed.info.status == "FAILED" and failed.data.tags["xbar.stopped_at"] == "rank_pes@third"
    assert "at least 2 classes" in failed.data.tags["mlflow.note.content"]
    parent = MlflowClient(project.mlflow_uri).get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED" and parent.data.tags["xbar.failed_stage"] == "rank_pes@third"
    assert [r.info.run_name for r in runs(project, "attributes.status = 'RUNNING'")] == []
    assert not (project.root / ".dvc/tmp/xbar-runs/third.json").exists()
    assert [t["name"] for t in json.loads(project.python("-m", "xbar.cli", "report", "--json").stdout)["tasks"]] == [
        "first", "second"]  # a task whose gate was never reached is not a learned task
