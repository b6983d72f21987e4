"""Fine-tuning one shared network task after task: each task starts from the previous shared task's
network. A learned task runs on the latest shared weights with its own head, so it forgets (catastrophic
forgetting is this baseline's point: the gate records it, it does not fail on it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xbar.methods.registry import Method, register

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams


class FinetuneShared(Method):
    name = "finetune_shared"
    trains = "every weight (4-bit QAT), activation clips, BN, head; from the previous shared task"
    trains_all = True
    bn_rules = ("per_task",)  # its BN belongs to the network it rewrites (folded into its own weights' deployment)
    continues_previous = True
    gated = False

    def attach(self, model: TaskModel, spec: TaskSpec, train: TrainParams) -> None:
        for layer in model.layers().values():
            layer.train_weights()

    def chip_view(self, tasks: dict[str, dict], name: str) -> dict:
        return shared_view(tasks[name], tasks[self._latest(tasks)])

    def backbone_image(self, name: str, tasks: dict[str, dict], backbone: dict) -> tuple[str, dict]:
        """The latest shared network: every shared task runs on it (one image, no writes between them)."""
        latest = self._latest(tasks)
        return latest, tasks[latest]["levels"]

    def _latest(self, tasks: dict[str, dict]) -> str:
        return [n for n, t in tasks.items() if t["method"] == self.name][-1]


def shared_view(earlier: dict, latest: dict) -> dict:
    """What a finetune_shared task computes after later shared tasks: the latest network, its own head.

    (This is where catastrophic forgetting shows: the shared weights moved on.)
    """
    view = dict(earlier)
    view["levels"], view["scales"] = latest["levels"], latest["scales"]
    state = {k: v for k, v in latest["model_state"].items() if not k.startswith("head.")}
    state.update({k: v for k, v in earlier["model_state"].items() if k.startswith("head.")})
    view["model_state"] = state
    return view


register(FinetuneShared())
