"""Head only: the task's head on the untouched backbone, trained by the recipe's head procedure.

The comparison's reference row (not a method of params.yaml): each method's gain over it is what its masks
or weights add beyond the head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xbar.methods.registry import Method, register

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams


class HeadOnly(Method):
    name = "head_only"
    trains = "the head only (BN: train.bn), on the untouched backbone"
    listed = False

    def attach(self, model: TaskModel, spec: TaskSpec, train: TrainParams) -> None:
        """Nothing but the head (set_trainable makes it trainable for every method)."""


register(HeadOnly())
