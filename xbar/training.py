"""Training and evaluation loops shared by pretraining, QAT and every method."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xbar.errors import UserError


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> float in [0, 1] (what the first layer's DACs see)."""
    return images.float().div_(255.0)


def seed_everything(seed: int, threads: int | None = None) -> torch.Generator:
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def loader(data: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())


def fit(model: nn.Module, data: Dataset, optimizers: Iterable[torch.optim.Optimizer], epochs: int,
        batch_size: int, seed: int, desc: str, before_step: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None, train_mode: Callable[[nn.Module], None] | None = None) -> float:
    """Cross-entropy training; returns the last epoch's mean loss.

    Stops with a UserError (and leaves saving to the caller, so nothing is
    written) as soon as the loss is NaN or infinite. `before_step` runs between
    backward and the optimizer step (e.g. to zero frozen gradients), `after_step`
    after it (e.g. an LR schedule). `train_mode` sets which submodules train
    (e.g. frozen BN); default `model.train()`.
    """
    optimizers = list(optimizers)
    dl = loader(data, batch_size, shuffle=True, seed=seed)
    mean = float("nan")
    with progress() as bar:
        job = bar.add_task(desc, total=epochs * len(dl), loss=float("nan"))
        for epoch in range(epochs):
            (train_mode or nn.Module.train)(model)
            total, count = 0.0, 0
            for step, (x, y) in enumerate(dl):
                loss = F.cross_entropy(model(as_input(x)), y)
                if not math.isfinite(loss.item()):
                    raise UserError(f"{desc}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                                    "(lower the learning rate); nothing was written")
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                if before_step:
                    before_step()
                try:
                    for opt in optimizers:
                        opt.step()
                except RuntimeError as err:  # e.g. lr 1e300: "value cannot be converted to type float without overflow"
                    if "overflow" not in str(err):
                        raise
                    raise UserError(f"{desc}: the optimizer step overflowed at epoch {epoch + 1}, step {step + 1} "
                                    "(lower the learning rate); nothing was written") from None
                if after_step:
                    after_step()
                total, count = total + loss.item() * len(y), count + len(y)
                bar.update(job, advance=1, loss=total / count)
            mean = total / count
    # the last step can still blow a parameter up after a finite loss: never export such a task
    if any(not bool(torch.isfinite(p).all()) for opt in optimizers for g in opt.param_groups for p in g["params"]):
        raise UserError(f"{desc}: a trained parameter is NaN or infinite after the last step "
                        "(lower the learning rate); nothing was written")
    return mean


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) in dataset order, in eval mode."""
    model.eval()
    preds, labels = [], []
    for x, y in loader(data, batch_size, shuffle=False):
        preds.append(model(as_input(x)).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    preds, labels = predict(model, data, batch_size)
    return float((preds == labels).float().mean() * 100)
