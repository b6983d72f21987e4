"""XMA: a column shift mask (N shift levels) on every PE."""

from xbar.methods.column import ColumnMaskMethod
from xbar.methods.registry import register


class XMA(ColumnMaskMethod):
    name = "xma"
    trains = "column shift mask, head (BN: train.bn)"


register(XMA())
