"""What the column-mask methods (XBM, XMA, XMA2) share: a real-valued mask per column of the frozen PEs.

Each column (one output channel within one row tile: the shift-adder's unit)
gets one mask value from {0, 1/2**N .. 1/2, 1} (N shift levels; N = 0 is a
binary mask). task.pt stores the code of each column's value; a spare PE's
columns are not masked (code of 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xbar.methods.registry import Method

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams


class ColumnMaskMethod(Method):
    column_masks = True

    def attach(self, model: TaskModel, spec: TaskSpec, train: TrainParams) -> None:
        model.shift_levels = self.mask_shift_levels(spec.shift_levels)
        for layer in model.layers().values():
            layer.add_column_mask(model.shift_levels, train.temperature)

    def mask_distance(self) -> float:
        from xbar.masks import START_LOGIT

        return START_LOGIT  # eval's threshold is a logit of 0

    def export_masks(self, model: TaskModel, task: dict) -> None:
        import torch

        from xbar.masks import mask_values

        values = mask_values(model.shift_levels)
        task["mask_values"] = values
        one = len(values) - 1
        for name, layer in model.layers().items():
            codes = layer.column_mask.codes()
            if layer.spare_columns is not None:  # a spare PE's columns are not masked
                codes = torch.where(layer.spare_columns, one, codes.long()).to(torch.uint8)
            task["column_masks"][name] = codes.contiguous()
