"""The checkpoint a task keeps, chosen on held-out training images (xbar.methods.recipe, step 6).

`held_out` picks VAL_SHARE of each class; `Validation` scores the model as deployed on them at the start
of a run and CHECKPOINTS times over it, and keeps the state with the lowest held-out loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from xbar.methods.layers import TaskModel
from xbar.runtime import batches, model_device
from xbar.training import as_input

VAL_SHARE = 0.1  # of each class's training images, held out to choose the checkpoint (module doc, step 6)
MIN_VAL_IMAGES = 32  # fewer held-out images than this choose by noise (a mean loss over 32: ~18% std error)
MAX_VAL_IMAGES = 1024  # enough to tell checkpoints apart; more only costs evaluation time
CHECKPOINTS = 4  # validation checks over a run, evenly spaced, besides its start


@torch.no_grad()
def image_losses(model: TaskModel, data, idx: torch.Tensor, batch_size: int = 512,  # noqa: ANN001
                 workers: int | None = None) -> torch.Tensor:
    """Cross-entropy of each image `idx` of `data` under the model in eval mode (as deployed), on the CPU."""
    return image_scores(model, data, idx, batch_size, workers)[0]


@torch.no_grad()
def image_scores(model: TaskModel, data, idx: torch.Tensor, batch_size: int = 512,  # noqa: ANN001
                 workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, correct) of each image `idx` under the model in eval mode (as deployed), on the CPU."""
    net = model.net
    was_training = net.training
    net.eval()
    chunks = [chunk.tolist() for chunk in idx.split(batch_size)]
    losses, correct = [], []
    for x, y in batches(data, chunks, model_device(net), workers):
        logits = net(as_input(x))
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        correct.append((logits.argmax(1) == y).cpu())
    net.train(was_training)
    return torch.cat(losses), torch.cat(correct)


def held_out(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the held-out images: VAL_SHARE of each class (rounded down, so a class of fewer than
    1 / VAL_SHARE images keeps all of them for training), seeded, at most MAX_VAL_IMAGES in all."""
    rng = np.random.default_rng(seed + 2)
    out = [rng.permutation(np.flatnonzero(labels == c))[: int(VAL_SHARE * np.sum(labels == c))]
           for c in np.unique(labels)]
    picked = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if len(picked) > MAX_VAL_IMAGES:
        picked = rng.permutation(picked)[:MAX_VAL_IMAGES]
    return np.sort(picked)


@dataclass
class Validation:
    """Held-out training images and the best checkpoint on them (module doc, step 6)."""

    model: TaskModel
    data: object  # the task's whole training Dataset
    train: list[int]
    val: torch.Tensor
    workers: int | None = None
    best_loss: float = math.inf
    best_step: int = -1
    best_state: dict = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # each check: step, held-out loss and accuracy (%)

    @classmethod
    def of(cls, model: TaskModel, data, labels: np.ndarray | None, seed: int,  # noqa: ANN001 (Dataset)
           workers: int | None = None) -> Validation | None:
        """The split of `data` (None when fewer than MIN_VAL_IMAGES would be held out)."""
        if labels is None:
            labels = np.asarray([int(data[i][1]) for i in range(len(data))])
        val = held_out(np.asarray(labels), seed)
        if len(val) < MIN_VAL_IMAGES:
            return None
        train = np.setdiff1d(np.arange(len(data)), val)
        return cls(model, data, train.tolist(), torch.as_tensor(val, dtype=torch.int64), workers)

    @staticmethod
    def at(steps: int) -> set[int]:
        """The optimizer steps after which the run is checked: CHECKPOINTS of them, the last one last."""
        return {math.ceil(steps * (k + 1) / CHECKPOINTS) for k in range(CHECKPOINTS)}

    def check(self, step: int, mode) -> None:  # noqa: ANN001 (train_mode's callable)
        """Score the model as deployed on the held-out images; keep its state if it is the best yet.
        `mode` puts the network back in training mode as `fit` runs it (frozen BN stays frozen)."""
        losses, correct = image_scores(self.model, self.data, self.val, workers=self.workers)
        loss = float(losses.mean())
        self.curve.append({"step": step, "held_out_loss": round(loss, 4),
                           "held_out_accuracy": round(100 * float(correct.float().mean()), 2)})
        mode(self.model.net)
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self.best_state = {k: v.detach().clone() for k, v in self.model.net.state_dict().items()}

    def restore_best(self) -> None:
        self.model.net.load_state_dict(self.best_state)
