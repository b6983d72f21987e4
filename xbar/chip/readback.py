"""Reading a learned task back from the chip: what the no-forgetting gate evaluates.

`read_back` reads the task the chip serves as it stands, then switches a copy
of the chip to each other task in turn, as evaluating it does, and decodes what
the chip then holds -- the backbone PEs' cells, the
task's spare PEs' cells and the column masks in the mask buffers -- into the
task.pt form (`levels`, `column_masks`). The gate rebuilds each task's model
from that, not from task.pt, so a bug in programming the chip (a cell written
wrong, a spare PE in the wrong place, stale masks) changes its predictions and
fails the gate. The chip is read in ideal mode: device effects are reported by
xbar.chip.evaluate, not gated.
"""

from __future__ import annotations

import copy

import torch

from xbar.chip.deployment import Chip, load_masks, program
from xbar.chip.image import task_image
from xbar.chip.layout import ChipLayout
from xbar.energy.presets import EnergyPreset
from xbar.errors import UserError
from xbar.methods.registry import get


def read_task(chip: Chip, layout: ChipLayout, name: str, task: dict, backbone_levels: dict[str, torch.Tensor]) -> dict:
    """Task `name` (its task.pt: `task`) as the chip holds it now: weight levels decoded from the cells of
    the backbone PEs, with the PEs it runs on spare PEs taken from those spare PEs (the method turns them
    into its task.pt form, `Method.from_chip`), and its column masks from the mask buffers."""
    cells = chip.levels[: chip.n_pes].clone()
    for slot, held in enumerate(chip.slots):
        if held is not None and held["task"] == name:
            cells[held["pe"]] = chip.levels[chip.n_pes + slot]
    flat, spec = cells.reshape(-1), layout.spec
    levels = {lm.name: spec.weight_from_cells(flat[layout.cells(lm.name).long()]).to(torch.int8)
              for lm in layout.mapping.layers}
    read = get(task["method"]).from_chip(task, levels, backbone_levels)
    if task.get("column_masks"):
        if chip.masks != name:
            raise UserError(f"task {name}: the mask buffers hold {chip.masks!r}'s masks after switching to it")
        read["column_masks"] = dict(chip.buffer)
    return read


def read_back(chip: Chip, layout: ChipLayout, tasks: dict[str, dict], backbone_levels: dict[str, torch.Tensor],
              preset: EnergyPreset) -> dict[str, dict]:
    """Every task of `tasks` (name -> task.pt, in learning order) read from a copy of `chip`: the task it
    serves first, as it stands (the deployment state itself), then each other one after switching to it
    (what programming the chip does). `chip` itself is left as it is."""
    chip = copy.deepcopy(chip)
    used, live = layout.used(), frozenset(tasks)
    out = {}
    for name in sorted(tasks, key=lambda n: n != chip.serving):
        image = task_image(name, tasks, layout, backbone_levels)
        if chip.serving != name:
            program(chip, image, preset, used, "read", live)
        else:  # its cells as they stand; the mask buffers are not saved with the state, so they are loaded
            load_masks(chip, image)
        out[name] = read_task(chip, layout, name, tasks[name], backbone_levels)
    return {name: out[name] for name in tasks}
