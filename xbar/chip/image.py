"""What a task needs on the chip: its `TaskImage`, built from its task.pt."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xbar.chip.layout import ChipLayout
from xbar.errors import UserError
from xbar.memory import mask_bits_for
from xbar.methods.registry import get

BACKBONE = "backbone"  # the image key of the backbone's own levels


@dataclass(frozen=True)
class TaskImage:
    """What the chip must hold to run one task."""

    task: str
    method: str
    backbone_key: str  # which image the backbone PEs must hold: BACKBONE or a task's name
    backbone: torch.Tensor | None  # that image (uint8 [n_pes, cells_per_pe]); None: the backbone's own
    spares: dict[int, torch.Tensor] = field(default_factory=dict)  # backbone PE -> its spare PE's cells
    mask_bits: int = 0  # column mask bits to load into the mask buffers
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # the column mask codes by layer (the buffers)


def task_image(name: str, tasks: dict[str, dict], layout: ChipLayout,
               backbone_levels: dict[str, torch.Tensor]) -> TaskImage:
    """The TaskImage of task `name` once every task of `tasks` (name -> task.pt, in learning order) is
    learned (docs/artifacts.md).

    What the backbone PEs hold is the method's to say (`Method.backbone_image`); the spare PEs and the
    column masks come from the task.pt itself. `backbone_levels`: levels.pt's levels by layer.
    """
    task = tasks[name]
    try:
        method = get(task.get("method"))
    except UserError:
        raise UserError(f"task {name}: task.pt has unknown method {task.get('method')!r}") from None
    mapping = layout.mapping
    own = method.backbone_image(name, tasks, backbone_levels)
    key, backbone = (BACKBONE, None) if own is None else (own[0], layout.image(own[1]))
    spare = task.get("spare_pes", torch.zeros(0, dtype=torch.int64)).to(torch.int64)
    if spare.numel() and (int(spare.min()) < 0 or int(spare.max()) >= mapping.n_pes):
        raise UserError(f"task {name}: spare PE ids outside 0..{mapping.n_pes - 1} (task.pt made for another mapping)")
    spares = {}
    if spare.numel():
        image = layout.image(task["levels"], spare)
        spares = {int(p): image[int(p)].clone() for p in spare}
    frozen_columns = sum(int((~torch.isin(lm.placement.column_pe, spare)).sum()) for lm in mapping.layers
                         if lm.name in task.get("column_masks", {}))
    bits = mask_bits_for(len(task.get("mask_values", ())))
    return TaskImage(name, method.name, key, backbone, spares, frozen_columns * bits,
                     dict(task.get("column_masks", {})))
