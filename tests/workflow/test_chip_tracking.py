"""`xbar chip` puts its numbers on each task's MLflow run (issue #15): the same numbers as its --json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from project import CLI, TinyProject, stage
from workflow.tracking import chip_setting


def test_chip_setting_names_what_is_off_the_defaults():
    head = {"adc_bits": 5, "device": "paper", "time_s": 0.0, "signed": "offset", "adc_range": "per_column",
            "adc_clip": 100.0}
    assert chip_setting(head) == "paper-adc5"
    assert chip_setting(head, 8) == "paper-adc8"
    assert chip_setting({**head, "time_s": 86400.0, "signed": "differential", "adc_range": "full"}) == \
        "paper-adc5-t86400s-differential-full"
    assert chip_setting({**head, "adc_clip": "mse"}) == "paper-adc5-clipmse"
    assert chip_setting({**head, "adc_range": "per_crossbar", "adc_clip": 99.9}) == "paper-adc5-per_crossbar-clip99.9"


@pytest.mark.slow
def test_xbar_chip_logs_to_the_task_run(built: TinyProject, tmp_path: Path):
    from mlflow import MlflowClient

    root = tmp_path / "project"
    shutil.copytree(built.root, root, symlinks=True)
    project = TinyProject(root, {**built.env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    project.run(*stage("evaluate", "t1"))  # the gate, in ideal mode: the task's run
    out = project.run(*CLI, "chip", "--instances", "2", "--adc-bits", "4", "--json")
    result = json.loads(out.stdout)
    assert result["adc_bits"] == 4 and result["instances"] == 2 and set(result["tasks"]) == {"t1"}
    evaluate = json.loads((root / "metrics/tasks/t1/evaluate.json").read_text())
    client = MlflowClient(project.mlflow_uri)
    run = client.get_run(evaluate["mlflow_run_id"])
    numbers = result["tasks"]["t1"]
    setting = f"{result['device']}-adc4"
    for key in ("ideal", "chip_mean", "chip_ci", "chip_std", "chip_min"):
        assert run.data.metrics[f"chip/{setting}/{key}"] == pytest.approx(numbers[key])
    assert numbers["ideal"] == pytest.approx(evaluate["accuracy_at_learn"], abs=0.01)  # chip mode left it ideal
    logged = Path(client.download_artifacts(run.info.run_id, f"chip/{setting}.json", str(tmp_path)))
    assert json.loads(logged.read_text())["instances"] == 2
    # a store that never saw the task: stdout stays one JSON object, stderr says the numbers were not logged
    project.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'other.db'}"
    other = project.run(*CLI, "chip", "--instances", "2", "--json")
    assert json.loads(other.stdout)["tasks"]["t1"]["ideal"] == numbers["ideal"]
    assert "no MLflow run of t1" in other.stderr
