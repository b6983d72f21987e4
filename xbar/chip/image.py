"""What a task needs on the chip: its `TaskImage`, built from its task.pt."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xbar.chip.layout import ChipLayout
from xbar.errors import UserError
from xbar.memory import mask_bits_for

BACKBONE = "backbone"  # the image key of the backbone's own levels
FINETUNE = ("finetune_shared", "finetune_separate")
COLUMN_MASKS = ("xbm", "xma", "xma2")


@dataclass(frozen=True)
class TaskImage:
    """What the chip must hold to run one task."""

    task: str
    method: str
    backbone_key: str  # which image the backbone PEs must hold: BACKBONE or a task's name
    backbone: torch.Tensor | None  # that image (uint8 [n_pes, cells_per_pe]); None: the backbone's own
    spares: dict[int, torch.Tensor] = field(default_factory=dict)  # backbone PE -> its spare PE's cells
    mask_bits: int = 0  # column mask bits to load into the mask buffers


def task_image(name: str, task: dict, layout: ChipLayout, backbone_levels: dict[str, torch.Tensor],
               shared_from: tuple[str, dict] | None = None) -> TaskImage:
    """The TaskImage of a task.pt (docs/artifacts.md).

    `backbone_levels`: levels.pt's levels by layer. `shared_from`: for a finetune_shared task evaluated
    after later shared tasks, (name, task.pt) of the latest one: its weights are what the task runs on.
    """
    method = task.get("method")
    mapping = layout.mapping
    if method in FINETUNE:
        key, source = (name, task) if shared_from is None else shared_from
        return TaskImage(name, method, key, layout.image(source["levels"]))
    if method == "piggyback":
        masked = {}
        for lm in mapping.layers:
            keep = task["element_masks"].get(lm.name)
            w = backbone_levels[lm.name]
            masked[lm.name] = w if keep is None else torch.where(keep.bool(), w, torch.zeros_like(w))
        return TaskImage(name, method, name, layout.image(masked))
    if method not in COLUMN_MASKS:
        raise UserError(f"task {name}: task.pt has unknown method {method!r}")
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
    return TaskImage(name, method, BACKBONE, None, spares, frozen_columns * bits)
