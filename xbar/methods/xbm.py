"""XBM: a binary mask per column (the column shift mask with no shift level)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xbar.methods.column import ColumnMaskMethod
from xbar.methods.registry import register

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams


class XBM(ColumnMaskMethod):
    name = "xbm"
    trains = "column binary mask, head, per-task BN"

    def shift_levels(self, spec: TaskSpec) -> int:
        return 0


register(XBM())
