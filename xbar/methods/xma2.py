"""XMA2, the 2-tier mask: the top-P% ranked PEs become spare PEs with re-trained 4-bit weights
(tier 1), a column shift mask on every other PE (tier 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xbar.methods.column import ColumnMaskMethod
from xbar.methods.registry import register

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams


class XMA2(ColumnMaskMethod):
    name = "xma2"
    trains = "spare PEs' weights (4-bit QAT from the backbone's levels), column shift masks on every other PE, " \
             "head (BN: train.bn)"
    spare_pes = True

    def attach(self, model: TaskModel, spec: TaskSpec, train: TrainParams) -> None:
        layers, spare = model.layers(), model.spare_pes
        for lm in model.mapping.layers:  # only layers that hold a spare PE get trainable weights
            if bool(((spare >= lm.first_pe) & (spare < lm.first_pe + lm.n_pes)).any()):
                layers[lm.name].train_weights(spare)
        super().attach(model, spec, train)


register(XMA2())
