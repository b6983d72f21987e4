"""Training and evaluation loops shared by pretraining, QAT and every method.

Each loop runs on the device of the model it is given and moves its batches there (xbar.runtime: the
device, DataLoader workers of lazy sources, mixed precision).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import Dataset, Sampler

from xbar.errors import Diverged, UserError
from xbar.runtime import autocast, batches, model_device

GUARD_WINDOW = 8  # steps whose mean loss the divergence guard checks (all of a shorter run's)
HEAD_INIT_IMAGES = 4096  # images whose features fit the head in closed form before training
# the ridge penalties `ridge_head` chooses from, relative to the features' mean variance (leave-one-out)
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# label smoothing of the head's logit-scale search: Szegedy et al.'s 0.1; bounds the head's logit gap (module doc)
HEAD_LABEL_SMOOTHING = 0.1


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> float in [0, 1] (what the first layer's DACs see), on the images' device
    (move the uint8 batch: a quarter of the float's bytes)."""
    return images.float().div_(255.0)


def ridge_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) of the ridge regression of one-hot labels (float64, deterministic), its
    penalty the one of RIDGE_GRID with the least leave-one-out error (`loo_penalty`)."""
    f = features.detach().double()
    mean = f.mean(0)
    fc = f - mean
    target = F.one_hot(labels, num_classes).double()
    centred = target - target.mean(0)
    gram = fc.T @ fc
    scale = gram.diagonal().mean() + 1e-12
    penalty = loo_penalty(fc, centred) * scale
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram + penalty * eye, fc.T @ centred)
    b = target.mean(0) - mean @ w
    return w.T.to(features.dtype), b.to(features.dtype)


def loo_penalty(fc: torch.Tensor, centred: torch.Tensor) -> float:
    """The relative penalty of RIDGE_GRID whose ridge fit of `centred` targets on centred features `fc`
    has the least leave-one-out squared error (Allen's PRESS, exact for ridge: residual / (1 - leverage)).

    A fixed penalty suits one ratio of images to feature width only (docs/decisions.md, "Recipes").
    """
    n = fc.shape[0]
    if n < 3:
        return RIDGE_GRID[len(RIDGE_GRID) // 2]  # nothing to hold out
    u, s, _ = torch.linalg.svd(fc, full_matrices=False)
    s2 = s.square()
    projected = u.T @ centred
    scale = float(s2.sum()) / fc.shape[1] + 1e-12  # the gram's mean diagonal, as in ridge_head
    best, best_error = RIDGE_GRID[0], math.inf
    for relative in RIDGE_GRID:
        shrink = s2 / (s2 + relative * scale)
        fitted = u @ (shrink[:, None] * projected)
        leverage = (u.square() @ shrink + 1.0 / n).clamp(max=1 - 1e-9)  # + 1/n: the intercept
        error = float((((centred - fitted) / (1 - leverage)[:, None]) ** 2).sum())
        if error < best_error:
            best, best_error = relative, error
    return best


def closed_form_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge head, its logits scaled to the least label-smoothed cross-entropy on the fit images."""
    w, b = ridge_head(features, labels, num_classes)
    logits = features @ w.T + b
    scales = torch.logspace(-1, 3, 41)
    best = min(scales.tolist(),
               key=lambda s: float(F.cross_entropy(logits * s, labels, label_smoothing=HEAD_LABEL_SMOOTHING)))
    return w * best, b * best


def head_images(n: int, seed: int) -> torch.Tensor:
    """The seeded training images (up to HEAD_INIT_IMAGES) a head is fit on (and the guard compares losses on)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:HEAD_INIT_IMAGES]


@torch.no_grad()
def head_features(net: nn.Module, data: Dataset, idx: torch.Tensor, batch_size: int = 512,
                  workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of images `idx` of `data`, as the network computes them in its current mode."""
    feats, labels = [], []
    chunks = [chunk.tolist() for chunk in idx.split(batch_size)]
    for x, y in batches(data, chunks, model_device(net), workers):
        feats.append(net.features(as_input(x)))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def fit_head(net: nn.Module, data: Dataset, idx: torch.Tensor, batch_size: int = 512,
             workers: int | None = None) -> None:
    """`net.head` in closed form (`closed_form_head`) on the features of images `idx` of `data`, as the
    network computes them in its current mode (on its device)."""
    feats, labels = head_features(net, data, idx, batch_size, workers)
    w, b = closed_form_head(feats, labels, net.head.out_features)
    net.head.weight.copy_(w)
    net.head.bias.copy_(b)


def seed_everything(seed: int, threads: int | None = None) -> torch.Generator:
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def in_order(n: int, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 in batches of `batch_size` (the last one smaller): evaluation's order."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def progress() -> Progress:
    """The training progress bar: on stderr, as stdout is for results (`--json` prints one object there);
    transient, and only on a terminal, so it leaves nothing in a log (an error stays one line; the stages
    print their results)."""
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


class BalancedBatches(Sampler[list[int]]):
    """Every epoch a fresh seeded permutation, cut into ceil(n / batch_size) batches of nearly equal size.

    A plain loader's last batch can hold a single image: in training mode BN then normalizes with
    that image's statistics alone (or fails where a feature map is 1x1), and the step weighs as much
    as a full batch's. Here batch sizes differ by at most one, with the same number of steps per epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batches = n, math.ceil(n / batch_size)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=self.generator)
        yield from (chunk.tolist() for chunk in perm.tensor_split(self.batches))


def batch_images(n: int, batch_size: int) -> int:
    """Images in the smallest training batch of `BalancedBatches` (n < batch_size: all n)."""
    return n // max(1, math.ceil(n / batch_size))


def optimizer_steps(n: int, epochs: int, batch_size: int, min_steps: int = 0) -> int:
    """Optimizer steps of a run: `epochs` passes of ceil(n / batch_size) steps, and at least `min_steps`
    (the data is then cycled for more passes); 0 without training images."""
    return max(epochs * math.ceil(n / batch_size), min_steps) if n > 0 else 0


def divergence_limit(start: float, num_classes: int) -> float:
    """The loss above which a run has diverged: where it started plus log(num_classes).

    log C is the cross-entropy of a uniform guess over C classes, i.e. of a model that knows
    nothing. A run whose loss rose by more than that above its start has lost more than a
    chance-level model knows: the steps are too large for where it started. (Healthy runs rise
    far less: a noisy batch is averaged with its neighbours over the guard's window; the blow-ups
    this guards against reached losses of tens to hundreds.)
    """
    return start + math.log(max(num_classes, 2))


@torch.no_grad()
def starting_loss(model: nn.Module, data: Dataset, batch_size: int, seed: int, steps: int,
                  train_mode: Callable[[nn.Module], None] | None = None, workers: int | None = None,
                  mixed_precision: bool = False) -> float:
    """Mean loss of the untrained model over `steps` seeded training batches, in training mode."""
    (train_mode or nn.Module.train)(model)
    sampler = BalancedBatches(len(data), batch_size, seed + 1)
    device, losses = model_device(model), []
    while len(losses) < steps:
        for x, y in batches(data, sampler, device, workers):
            with autocast(model, mixed_precision):
                logits = model(as_input(x))
            losses.append(F.cross_entropy(logits.float(), y).item())
            if len(losses) == steps:
                break
    return sum(losses) / len(losses)


def fit(model: nn.Module, data: Dataset, optimizers: Iterable[torch.optim.Optimizer], epochs: int,
        batch_size: int, seed: int, desc: str, after_step: Callable[[], None] | None = None,
        train_mode: Callable[[nn.Module], None] | None = None, min_steps: int = 0,
        hint: str = "lower the learning rate", workers: int | None = None, mixed_precision: bool = False) -> float:
    """Cross-entropy training; returns the mean loss over the last epoch's worth of steps.

    Batches come from `BalancedBatches`, `optimizer_steps` of them (`min_steps`: cycle the data
    for at least that many). `after_step` runs after each optimizer step (e.g. an lr schedule);
    `train_mode` sets which submodules train (e.g. frozen BN), default `model.train()`. The steps run on
    the model's device; `workers` read a lazy source, and `mixed_precision` asks for bf16 autocast where
    xbar.runtime allows it (CUDA, a network without quantizers).

    The divergence guard stops the run with a one-line UserError that names `desc` and what to
    change (`hint`), before the caller writes anything, when the loss is NaN or infinite, when
    the mean loss of the last GUARD_WINDOW steps (a shorter run: of all its steps) exceeds
    `divergence_limit` of the starting loss, or when a parameter is not finite after the last
    step. The starting loss is measured, not assumed: the mean loss of the untrained model over
    that many batches, in training mode (Gumbel-sampled masks and batch-statistics BN make it
    higher than the eval loss). The window lets a run recover from a brief excursion.
    """
    optimizers = list(optimizers)
    n = len(data)
    total = optimizer_steps(n, epochs, batch_size, min_steps)
    if total == 0:
        raise UserError(f"{desc}: {epochs} epoch(s) over {n} training images at batch size {batch_size} make no "
                        "optimizer step (the task needs training images); nothing was written")
    sampler = BalancedBatches(n, batch_size, seed)
    device = model_device(model)
    per_epoch = len(sampler)
    window = min(total, GUARD_WINDOW)
    recent: deque[float] = deque(maxlen=window)
    last_epoch: deque[tuple[float, int]] = deque(maxlen=per_epoch)
    start = starting_loss(model, data, batch_size, seed, window, train_mode, workers, mixed_precision)
    step = 0
    with progress() as bar:
        job = bar.add_task(desc, total=total, loss=float("nan"))
        while step < total:
            (train_mode or nn.Module.train)(model)
            for x, y in batches(data, sampler, device, workers):
                if step == total:
                    break
                with autocast(model, mixed_precision):
                    logits = model(as_input(x))
                loss = F.cross_entropy(logits.float(), y)
                value = loss.item()
                where = f"epoch {step // per_epoch + 1}, step {step % per_epoch + 1}"
                if not math.isfinite(value):
                    raise Diverged(f"{desc}: loss is {value} at {where} ({hint}); nothing was written")
                recent.append(value)
                mean = sum(recent) / len(recent)
                limit = divergence_limit(start, logits.shape[1])
                if len(recent) == window and mean > limit:
                    raise Diverged(f"{desc}: training diverged at {where}, the loss rose from {start:.3g} to "
                                    f"{mean:.3g} (over start + log {logits.shape[1]} classes = {limit:.3g}; {hint}); "
                                    "nothing was written")
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                try:
                    for opt in optimizers:
                        opt.step()
                except RuntimeError as err:  # e.g. lr 1e300: "value cannot be converted to type float without overflow"
                    if "overflow" not in str(err):
                        raise
                    raise Diverged(f"{desc}: the optimizer step overflowed at {where} ({hint}); "
                                    "nothing was written") from None
                if after_step:
                    after_step()
                step += 1
                last_epoch.append((value * len(y), len(y)))
                bar.update(job, advance=1, loss=mean)
    # the last step can still blow a parameter up after a finite loss: never export such a task
    if any(not bool(torch.isfinite(p).all()) for opt in optimizers for g in opt.param_groups for p in g["params"]):
        raise Diverged(f"{desc}: a trained parameter is NaN or infinite after the last step ({hint}); "
                        "nothing was written")
    return sum(v for v, _ in last_epoch) / sum(c for _, c in last_epoch)


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, batch_size: int = 512,
            workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) in dataset order, in eval mode, on the CPU (computed on the model's device)."""
    model.eval()
    preds, labels = [], []
    for x, y in batches(data, in_order(len(data), batch_size), model_device(model), workers):
        preds.append(model(as_input(x)).argmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512, workers: int | None = None) -> float:
    preds, labels = predict(model, data, batch_size, workers)
    return float((preds == labels).float().mean() * 100)
