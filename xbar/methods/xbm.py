"""XBM: a binary mask per column (the column shift mask with no shift level)."""

from xbar.methods.column import ColumnMaskMethod
from xbar.methods.registry import register


class XBM(ColumnMaskMethod):
    name = "xbm"
    trains = "column binary mask, head (BN: train.bn)"

    def mask_shift_levels(self, shift_levels: int) -> int:
        return 0


register(XBM())
