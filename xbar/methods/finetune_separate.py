"""Fine-tuning, a separate copy per task: every weight (4-bit QAT), BN, activation clips and head,
from the backbone. The accuracy upper bound of the 4-bit chip, and the full re-programming energy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xbar.methods.registry import Method, register

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams


class FinetuneSeparate(Method):
    name = "finetune_separate"
    trains = "every weight (4-bit QAT), activation clips, BN, head; from the backbone"
    trains_all = True
    bn_rules = ("per_task",)  # its BN belongs to the network it rewrites (folded into its own weights' deployment)

    def attach(self, model: TaskModel, spec: TaskSpec, train: TrainParams) -> None:
        for layer in model.layers().values():
            layer.train_weights()


register(FinetuneSeparate())
