"""The gate reads the chip: tasks decoded from the cells and mask buffers equal their task.pt, and a chip
programmed wrong changes what the gate measures."""

import pytest
import torch

from tiny_backbone import random_task, tiny_backbone
from xbar import step
from xbar.chip.deployment import learn_on_chip, new_chip
from xbar.chip.layout import ChipLayout
from xbar.chip.readback import read_back
from xbar.crossbar import spare_pe_count
from xbar.data import TaskData
from xbar.energy.presets import PRESETS
from xbar.errors import UserError
from xbar.methods import build_task_model, export_task
from xbar.params import TaskSpec
from xbar.training import seed_everything

PAPER = PRESETS["paper"]


def hand_made_task(params, quant, levels, method: str, spare: list[int] | None, seed: int, digest: str) -> dict:
    """A task.pt of `method` with random masks and moved spare-PE weights (no training: fast)."""
    seed_everything(seed)
    spec = TaskSpec(dataset="optdigits", method=method, epochs=1)
    model = build_task_model(params, spec, quant, levels, 3, spare_pes=None if spare is None else torch.tensor(spare))
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers().values():
        if layer.column_mask is not None:
            layer.column_mask.real.data = torch.randn(layer.column_mask.real.shape, generator=g) * 3
        if layer.element_mask is not None:
            layer.element_mask.real.data = torch.rand(layer.element_mask.real.shape, generator=g) * 2e-2
        if layer.latent is not None:
            layer.latent.data += torch.randn(layer.latent.shape, generator=g) * layer.scale * 2
    return export_task(model, 3, 1, digest)


@pytest.fixture(scope="module")
def chip_with_tasks():
    params, quant, levels = tiny_backbone(width=8)
    backbone = step.Backbone(quant, levels)
    data = {n: TaskData(random_task(16, seed=i), random_task(64, seed=10 + i), 3, 1, f"tr{i}", f"te{i}")
            for i, n in enumerate(("t1", "t2", "t3"))}
    layout = ChipLayout(backbone.mapping(params))
    chip = new_chip(layout, backbone.cells, spare_pe_count(params.crossbar.spare_pe_ratio, layout.mapping.n_pes))
    tasks = {}
    for name, method, spare, seed in (("t1", "xma2", [0, 3], 1), ("t2", "piggyback", None, 2),
                                      ("t3", "xma2", [0, 1], 3)):
        tasks[name] = hand_made_task(params, quant, levels, method, spare, seed, data[name].digest)
        learn_on_chip(chip, layout, tasks, backbone.cells, PAPER)
    return params, backbone, layout, chip, tasks, data


def test_every_task_reads_back_exactly(chip_with_tasks):
    params, backbone, layout, chip, tasks, data = chip_with_tasks
    before = chip.levels.clone()
    read = read_back(chip, layout, tasks, backbone.cells, PAPER)
    assert torch.equal(chip.levels, before)  # reading switches a copy, never the deployment state
    for name, task in tasks.items():
        for layer, lv in task["levels"].items():
            assert torch.equal(read[name]["levels"][layer], lv), (name, layer)
        assert read[name]["column_masks"].keys() == task["column_masks"].keys()
        assert all(torch.equal(read[name]["column_masks"][k], v) for k, v in task["column_masks"].items())
        for k, mask in task["element_masks"].items():  # Piggyback's mask, read from the zeroed cells
            matters = backbone.cells[k] != 0  # a zero weight reads the same masked or not
            assert torch.equal(read[name]["element_masks"][k][matters], mask[matters])
    assert step.evaluate_chip(params, chip, layout, tasks, backbone, data, PAPER) == \
        step.evaluate(params, tasks, backbone.levels, data)


def test_a_chip_programmed_wrong_fails_what_the_gate_measures(chip_with_tasks):
    """A spare PE of the served task holding wrong levels: the task reads back other weights there; a
    backbone cell written wrong: a mask task refuses to run on changed backbone cells."""
    params, backbone, layout, chip, tasks, data = chip_with_tasks
    broken = new_chip(layout, backbone.cells, chip.n_slots)
    broken.levels, broken.slots = chip.levels.clone(), [dict(s) if s else None for s in chip.slots]
    broken.serving = chip.serving  # as load_chip leaves it: the mask buffers' contents are not saved
    slot = next(i for i, s in enumerate(broken.slots) if s and s["task"] == "t3")
    broken.levels[broken.n_pes + slot] = 3 - broken.levels[broken.n_pes + slot]  # every cell of it wrong
    read = read_back(broken, layout, tasks, backbone.cells, PAPER)
    pe = broken.slots[slot]["pe"]
    changed = [k for k, v in tasks["t3"]["levels"].items() if not torch.equal(read["t3"]["levels"][k], v)]
    assert changed and all(layout.mapping.layer(k).first_pe <= pe < layout.mapping.layer(k).first_pe
                           + layout.mapping.layer(k).n_pes for k in changed)
    wrong = new_chip(layout, backbone.cells, chip.n_slots)
    wrong.levels[5, layout.used()[5].nonzero()[0]] ^= 1  # one backbone cell of PE 5 (no task's spare PE)
    with pytest.raises(UserError, match="changes backbone cells outside its spare PEs"):
        step.evaluate_chip(params, wrong, layout, {"t1": tasks["t1"]}, backbone, {"t1": data["t1"]}, PAPER)
