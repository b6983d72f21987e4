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
