"""Piggyback (Mallya et al., 2018): a binary mask per weight on every mapped layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xbar.methods.registry import Method, register

if TYPE_CHECKING:
    from xbar.methods.layers import TaskModel
    from xbar.params import TaskSpec, TrainParams


class Piggyback(Method):
    name = "piggyback"
    trains = "element-wise binary mask on every mapped layer, head (BN: train.bn)"
    element_masks = True

    def attach(self, model: TaskModel, spec: TaskSpec, train: TrainParams) -> None:
        for layer in model.layers().values():
            layer.add_element_mask()

    def mask_lr(self, train: TrainParams) -> None:
        return None  # the recipe's reach rule (train.mask_lr is the column masks'), or the paper preset's 1e-4

    def mask_distance(self) -> float:
        from xbar.masks import ElementBinaryMask

        return ElementBinaryMask.INIT - ElementBinaryMask.THRESHOLD

    def export_masks(self, model: TaskModel, task: dict) -> None:
        task["element_masks"] = {n: l.element_mask.binary().clone() for n, l in model.layers().items()}

    def backbone_image(self, name: str, tasks: dict[str, dict], backbone: dict) -> tuple[str, dict]:
        """The backbone with every masked-out weight written to the zero weight's level."""
        import torch

        keep = tasks[name]["element_masks"]
        return name, {layer: w if layer not in keep else torch.where(keep[layer].bool(), w, torch.zeros_like(w))
                      for layer, w in backbone.items()}


    def from_chip(self, task: dict, read: dict, backbone: dict) -> dict:
        """A masked-out weight reads as the zero weight's level: the mask is where the cells read 0 and the
        backbone's do not (where the backbone's weight is 0 the mask changes nothing). Cells that read
        neither the backbone's level nor 0 stay as read: the backbone check then refuses them."""
        import torch

        levels = {k: torch.where(v == 0, backbone[k].to(v.dtype), v) for k, v in read.items()}
        masks = {k: (read[k] != 0) | (backbone[k] == 0) for k in task["element_masks"]}
        return task | {"levels": levels, "element_masks": masks}


register(Piggyback())
