"""Proof of the method registry: a toy method defined in this file alone -- no other file edited --
learns tasks through the comparison (in memory) and through the real DVC stages (params.yaml's
`plugins:` names this module, so every stage process imports it and it registers itself)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from xbar.methods import Method, get, names, register, unregister

TOY_ENV = "XBAR_TEST_TOY_METHOD"  # set for the stage processes: importing this module there registers the toy


class LinearProbe(Method):
    """A linear probe: only the task head trains; the backbone, its BN and every cell stay as deployed."""

    name = "linear_probe"
    trains = "the task head only"
    bn_rules = ("frozen",)

    def attach(self, model, spec, train) -> None:  # noqa: ANN001
        pass  # every task model gets a fresh head; nothing else trains


if os.environ.get(TOY_ENV) == "1":
    register(LinearProbe())


@pytest.fixture
def toy():
    register(LinearProbe())
    yield get("linear_probe")
    unregister("linear_probe")


def test_the_toy_method_is_a_registered_method_everywhere(toy):
    from xbar.compare import configurations
    from xbar.params import parse_params
    from project import tiny_params

    assert "linear_probe" in names() and toy.keeps_backbone and toy.gated and not toy.spare_pes
    params = parse_params(tiny_params({"t1": {"method": "linear_probe"}}))
    assert params.tasks["t1"].method == "linear_probe"
    assert [c.label for c in configurations(["linear_probe", "xma2"], [0.1])] == ["head_only", "linear_probe", "xma2@10"]


def test_the_toy_method_learns_tasks_in_the_comparison(toy, backbone):
    from xbar.compare import Configuration, run_configuration
    from xbar.params import parse_params
    from xbar.step import Backbone
    from project import tiny_params

    params, quant, levels = backbone
    raw = tiny_params({"t1": {"method": "linear_probe"}, "t2": {"method": "linear_probe", "dataset": "lfw_faces"}})
    raw["model"] = params.model.model_dump()
    # the closed-form head is already a probe's optimum here: at the default SGD lr the head's noise ends it
    # a little above its start, which the divergence guard fails (docs/decisions.md, the guard's entry)
    raw["train"] = {**raw.get("train", {}), "lr": 0.005}
    result = run_configuration(parse_params(raw), Configuration("linear_probe"), Backbone(quant, levels))
    assert result.failure is None
    rows = {r["task"]: r for r in result.tasks.iter_rows(named=True)}
    assert set(rows) == {"t1", "t2"}
    assert rows["t1"]["accuracy_at_learn"] > 10.0  # above chance on optdigits' 10 classes
    assert all(r["cells_written"] == 0 and r["mask_bytes"] == 0 and r["spare_pes"] == 0 for r in rows.values())
    after_t2 = result.matrix.filter(result.matrix["after"] == "t2")
    assert dict(zip(after_t2["task"], after_t2["accuracy"]))["t1"] == rows["t1"]["accuracy_at_learn"]


@pytest.mark.slow
def test_the_toy_method_learns_a_task_through_the_dvc_stages(tmp_path: Path):
    from project import ROOT, make_tiny_project

    project = make_tiny_project(tmp_path / "project", {"t1": {"method": "linear_probe"}, "t2": {}}, git=False)
    raw = project.params.read_text()
    project.params.write_text(raw + f"plugins: [{Path(__file__).stem}]\n")
    project.env.update({TOY_ENV: "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                       str(ROOT / "tests")])})
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "tiny project with a toy method")
    project.dvc("repro")
    task = torch.load(project.root / "artifacts/tasks/t1/task.pt", weights_only=True)
    assert task["method"] == "linear_probe" and not task["column_masks"] and not task["element_masks"]
    metrics = project.root / "metrics/tasks"
    program = json.loads((metrics / "t1/program.json").read_text())
    assert program["method"] == "linear_probe" and program["cells_written"] == 0
    gate = json.loads((metrics / "t2/evaluate.json").read_text())  # t1 after t2 (xma2) was learned
    assert gate["gate"] == "passed" and gate["forgetting"]["t1"] == 0
