"""The training recipe every method shares (`train_task`).

1. a task with per-task BN first re-estimates its statistics on the new task
   (`recalibrate_bn`), so training and the head fit below see the same features;
2. the head is fit in closed form (ridge regression on up to 4096 training
   images' features, `init_head`): SGD from a random head on raw pooled features
   is badly conditioned and cost every mask method tens of points;
3. SGD (train.lr) on head, BN, clips; `TensorAdam` on 4-bit weights (in
   quantization levels) and masks (the method's `mask_lr`); every lr warms up
   over the first tenth of the optimizer steps, then
   follows a cosine to zero (`lr_factor`), at least MIN_STEPS steps;
4. BN statistics are re-estimated once more with the deterministic (eval) masks:
   during training the column masks are Gumbel samples, the deployed ones are not;
5. the divergence guard: the trained model's loss on the images the head was fit
   on must not end above the closed-form head's (`check_converged`; a run that
   does gets its head refit in closed form on the deployed network first,
   `refit_head`); `fit` stops a run whose loss rises far above its start;
6. the checkpoint a task keeps is chosen on held-out images (`Validation`):
   VAL_SHARE of each class's training images (a task with fewer than
   MIN_VAL_IMAGES to spare trains on all of them and keeps its last step) are
   held out, and the model as deployed (eval masks) is scored on them at the
   start (the closed-form head on the untrained masks) and CHECKPOINTS times
   over the run; the lowest validation loss wins. The guard judges the last
   step all the same: a run that diverged fails. A low training loss does not
   say the masks generalize: on 800 RGB photo crops (ResNet-18, the robustness
   suite), XMA2's training loss fell to 0.04 while its test accuracy fell from
   the closed-form head's 93.75% to 86.25%;
7. a run the guard stops (step 5) is retried from the same start at half of
   every lr, down to 1/2**BACKOFFS (`with_backoff`; `model.lr_scale`), and only
   the last retry's failure reaches the user. Where a run diverges depends on the
   task, the backbone and the run's length together (the suite: XBM on 2,327
   textures, Piggyback on 800 RGB photos, each at the lrs that hold everywhere
   else), so no one lr fits every task; halving it until the run holds does;
8. the head that deploys (`deploy_head`): logistic regression, the linear
   probe's model, on the kept network's features replaces the trained head where
   it holds out better; a task with nothing held out keeps its trained head.
   Step 2's ridge head starts training well but is no probe: on the suite's
   tiniest tasks it ends 8 points below logistic regression on the same
   features, and a run that keeps step 0 (training never beat the start on
   held-out images) deployed exactly it.

What keeps it from diverging on any task size, epochs or backbone (measured on
tasks of 100-200 images, where the first recipe ended at losses of 20 to 200):

- the closed-form head's logit scale is the one that minimizes *label-smoothed*
  cross-entropy. Plain cross-entropy is minimized by an infinite scale on any
  training set the ridge head separates (small tasks: the search hit its bound
  of 1000), and the gradient every trainable below the head gets grows with that
  scale: SGD at train.lr then blew up. Label smoothing bounds the logit gap at
  log(1 + (1 - eps) C / eps) (3 for 2 classes, 7 for 100) whatever the task;
- warm-up, and a schedule counted in optimizer steps, not epochs;
- 4-bit weights (fine-tuned, spare PEs) train with `TensorAdam` at
  CELL_STEP_LEVELS of their layer's quantization step per optimizer step (root
  mean square over the layer, each weight in proportion to its gradient): a
  weight changes the network only when it crosses half a level, whatever the
  layer's scale or the size of its gradients. SGD at train.lr flipped 10-20% of
  them in the first four steps of a small task and, under frozen BN (no batch
  statistics to renormalize a spare PE's output), diverged on the default
  benchmark's first task; per-weight Adam moves every weight by the full step
  (a 12-image fine-tune diverged). At a tenth of a level, the weights at the
  root mean square crossed half a level together a few steps after the warm-up
  and XMA2 diverged on both robustness-suite backbones (2,327 textures at step
  13, 800 RGB photos at step 11); at a twentieth both held;
- lr in proportion to the batch (linear scaling) when the training set is
  smaller than train.batch_size; batches of nearly equal size (`BalancedBatches`);
- BN statistics from at least MIN_BN_IMAGES images: a smaller task keeps the
  backbone's statistics, and BN runs on them during training.

The BN rule (`model.bn`, from train.bn or the task's `bn`; the same for every
method that can use it): `frozen` keeps the backbone's BN statistics and affine,
as the paper's chip has no per-task per-channel affine; `per_task` trains and
re-estimates the task's own (stored in `model_state`, charged as a digital
per-channel affine: xbar.memory, xbar.energy). A fine-tune rewrites every
weight, so its BN is always its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from xbar.methods.layers import TaskModel
from xbar.methods.validation import Validation, held_out, image_losses  # noqa: F401 (held_out: re-exported)
from xbar.methods.registry import get
from xbar.params import TaskSpec, TrainParams
from xbar.errors import Diverged, UserError
from xbar.runtime import batches, model_device
from xbar.training import (HEAD_INIT_IMAGES, as_input, batch_images, fit, fit_head, head_features, head_images,
                           logistic_head, optimizer_steps, ridge_head)  # noqa: F401 (ridge_head: re-exported by xbar.methods)

T = TypeVar("T")

WEIGHT_DECAY = 5e-4  # head and fine-tuned / spare-PE weights only
WARMUP_SHARE = 0.1  # of the optimizer steps, lr rising linearly from lr / warm-up steps to lr
MIN_STEPS = 50  # a tiny task still gets this many optimizer steps (the data is cycled)
CELL_STEP_LEVELS = 0.05  # TensorAdam's step on 4-bit weights (rms), in quantization levels of their layer (module doc)
MIN_BN_IMAGES = 32  # BN statistics from fewer images are off by more than sqrt(2 / 31) = 25% (std of a variance)
BACKOFFS = 3  # a run the guard stops is retried at 1/2, 1/4, 1/8 of every lr before it fails (module doc, step 7)
CONVERGED_SE = 2.0  # the trained model's loss may exceed the head's by this many standard errors (noise)


@torch.no_grad()
def init_head(model: TaskModel, data, seed: int, batch_size: int = 512,  # noqa: ANN001 (Dataset)
              workers: int | None = None) -> torch.Tensor:
    """Fit the head in closed form on the untrained task model's features (LP-FT's linear probe);
    returns each fit image's loss under the fitted head (`head_images` order).

    SGD from a random head on the backbone's raw pooled features (large common
    mean) is badly conditioned and leaves every method tens of points short;
    ridge regression of one-hot labels on up to HEAD_INIT_IMAGES seeded training
    images starts the head where a linear probe ends. Its logit scale minimizes
    label-smoothed cross-entropy (HEAD_LABEL_SMOOTHING), which stays finite where
    the ridge head separates the training images (plain cross-entropy would ask
    for an unbounded scale). Same for every method, so the comparison is fair.
    """
    net = model.net
    was_training = net.training
    net.eval()
    idx = head_images(len(data), seed)
    fit_head(net, data, idx, batch_size, workers)
    net.head.weight_quant.ready.fill_(False)  # the 8-bit clips start from the fitted weights / eval features
    net.head.act_quant.ready.fill_(False)
    losses = image_losses(model, data, idx, batch_size, workers)
    net.train(was_training)
    return losses


def set_trainable(model: TaskModel) -> None:
    """requires_grad exactly on the method's trainables (see the module's table)."""
    net, method = model.net, get(model.method)
    for p in net.parameters():
        p.requires_grad_(method.trains_all)  # fine-tuning trains everything (BN, clips too)
    for p in net.head.parameters():
        p.requires_grad_(True)
    if model.bn == "per_task":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(True)
    for layer in model.layers().values():
        for p in (layer.latent, layer.column_mask, layer.element_mask):
            if p is not None:
                (p if isinstance(p, nn.Parameter) else p.real).requires_grad_(True)


@dataclass
class ParameterGroups:
    """The trainables by optimizer role."""

    cells: list[nn.Parameter]  # crossbar weights: fine-tuned or spare-PE weights (Adam, in levels)
    head: list[nn.Parameter]  # the task head (weight decay on its weight)
    digital: list[nn.Parameter]  # BN affine, activation clips (no decay)
    masks: list[nn.Parameter]  # real-valued masks (Adam)


def parameter_groups(model: TaskModel) -> ParameterGroups:
    groups = ParameterGroups([], [], [], [])
    for layer in model.layers().values():
        for mask in (layer.column_mask, layer.element_mask):
            if mask is not None:
                groups.masks.append(mask.real)
        if layer.latent is not None:
            groups.cells.append(layer.latent)
    groups.head = [p for p in model.net.head.parameters() if p.requires_grad]
    taken = {id(p) for p in groups.cells + groups.head + groups.masks}
    groups.digital = [p for p in model.net.parameters() if p.requires_grad and id(p) not in taken]
    return groups


def trainable_names(model: TaskModel) -> set[str]:
    return {n for n, p in model.net.named_parameters() if p.requires_grad}


@torch.no_grad()
def recalibrate_bn(net: nn.Module, data, seed: int, batch_size: int = 128,  # noqa: ANN001 (Dataset)
                   workers: int | None = None) -> None:
    """Re-estimate BN statistics with the deterministic (eval) masks and levels.

    During training the column masks are Gumbel samples, so the running
    statistics describe a noisy network; the deployed one has no noise. One
    pass over up to HEAD_INIT_IMAGES seeded training images with every mask in
    eval mode and BN averaging (momentum None) fixes the mismatch. The caller
    asks for it only with at least MIN_BN_IMAGES training images (`bn_statistics`).
    """
    net.eval()
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the pass
        bn.train()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))[:HEAD_INIT_IMAGES]
    # chunks of nearly equal size: the cumulative average weighs every chunk alike (a last chunk of
    # one image would count as much as a full one)
    chunks = [chunk.tolist() for chunk in idx.tensor_split(math.ceil(len(idx) / batch_size))]
    for x, _ in batches(data, chunks, model_device(net), workers):
        net(as_input(x))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    net.eval()


def bn_statistics(model: TaskModel, n_train: int) -> bool:
    """Whether the task estimates its own BN statistics: per-task BN and at least MIN_BN_IMAGES
    training images (else the backbone's statistics stay, see the module doc)."""
    return model.bn == "per_task" and n_train >= MIN_BN_IMAGES


def train_mode(model: TaskModel, batch: int | None = None):  # noqa: ANN201 (a callable for fit)
    """Training mode, except BN's statistics where they stay fixed: frozen BN (the backbone's), or training
    batches of fewer than MIN_BN_IMAGES images (`batch`), whose batch statistics would be too noisy; the BN
    affine still trains where the method trains it."""
    return bn_mode(model.bn == "per_task" and (batch is None or batch >= MIN_BN_IMAGES))


def bn_mode(batch_statistics: bool):  # noqa: ANN201 (a callable for fit)
    """Training mode; BN normalizes with its batch's statistics only if `batch_statistics`."""

    def apply(net: nn.Module) -> None:
        net.train()
        if not batch_statistics:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    return apply


def optimizers(model: TaskModel, train: TrainParams, batch: int | None = None,
               scale: float = 1.0) -> list[torch.optim.Optimizer]:
    """SGD (momentum) on weights, head, BN and clips; `TensorAdam` on the real-valued masks (the
    method's `mask_lr`: train.mask_lr for column masks, a constant for Piggyback's).

    SGD's lr is train.lr for train.batch_size images per step, in proportion for a smaller
    `batch` (linear scaling: a task smaller than the batch); Adam's lrs by the square root of
    that share (Adam's scaling rule: Malladi et al., NeurIPS 2022). At the full step, a 12-image
    fine-tune whose closed-form head already fit (loss 0.04) jumped to 2.6 within 8 steps.
    4-bit weights (fine-tuned, spare PEs): Adam, CELL_STEP_LEVELS of the layer's quantization
    step per step (module doc). `scale` multiplies every lr (a retried run, `train_task`).
    (Adam on the head and BN was tried: it adapts the head too slowly to the masked features,
    -1 to -4 points for xma / xma2.)
    """
    g = parameter_groups(model)
    head_weight = model.net.head.weight
    share = min(1.0, (batch or train.batch_size) / train.batch_size)
    lr, adam = train.lr * share * scale, math.sqrt(share) * scale
    groups = [{"params": [head_weight], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in g.head if p is not head_weight] + g.digital, "weight_decay": 0.0}]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SGD(groups, lr=lr, momentum=train.momentum, nesterov=train.momentum > 0)]
    if g.cells:
        cells = [{"params": [layer.latent], "lr": adam * CELL_STEP_LEVELS * float(layer.scale)}
                 for layer in model.layers().values() if layer.latent is not None]
        opts.append(TensorAdam(cells, lr=adam * CELL_STEP_LEVELS))
    if g.masks:
        opts.append(TensorAdam(g.masks, lr=adam * get(model.method).mask_lr(train)))
    return opts


class TensorAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number per tensor (a layer's mask or 4-bit weights), not one per entry.

    Per-entry Adam steps every entry whose gradient keeps its sign by the full lr, however small
    that gradient: on a small task, whose batches repeat the same images, every such entry of a
    mask then crosses its threshold on the same step (Piggyback's 1e-2 -> 5e-3 after 10 steps at
    5e-4, a column logit's 2 -> 0 after 4 at 0.5), and the network collapses at once (measured:
    the loss jumped from 0.05 to 80 on the step the masks flipped). With one second moment per
    tensor, a tensor's entries still move by about lr (root mean square) per step, as with Adam,
    but each in proportion to its gradient: the entries with the largest gradients flip first.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 (torch's signature)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["t"], state["m"] = 0, torch.zeros_like(p)
                    state["v"] = torch.zeros((), dtype=p.dtype, device=p.device)
                state["t"] += 1
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).add_(p.grad.pow(2).mean(), alpha=1 - beta2)
                m_hat = state["m"] / (1 - beta1 ** state["t"])
                v_hat = state["v"] / (1 - beta2 ** state["t"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


def lr_factor(step: int, steps: int) -> float:
    """The lr multiplier at optimizer step `step` of `steps`: linear warm-up over the first
    WARMUP_SHARE of the steps, times a cosine from 1 to 0 over all of them."""
    warmup = max(1, math.ceil(WARMUP_SHARE * steps))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def check_task_data(n_train: int, num_classes: int, who: str) -> None:
    """Bad input, as one line: a task needs at least one training image per class."""
    if n_train < num_classes:
        raise UserError(f"{who}: {n_train} training image(s) for {num_classes} classes (the task needs at least "
                        "one per class: add images or raise max_train); nothing was written")


def check_converged(before: torch.Tensor, after: torch.Tensor, who: str, hint: str) -> None:
    """The divergence guard's end check: training must not end above the closed-form head's loss.

    `before` / `after`: each head image's loss under the untrained head and the trained model.
    The mean of their difference may exceed zero by CONVERGED_SE standard errors (the noise of
    that mean over these images: Gumbel masks and BN re-estimation move it a little), no more.
    """
    diff = (after - before).double()
    noise = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    if float(diff.mean()) > CONVERGED_SE * noise:
        raise Diverged(f"{who}: training ended at loss {float(after.mean()):.3g}, above the untrained closed-form "
                        f"head's {float(before.mean()):.3g} on the same training images ({hint}); nothing was written")


def train_task(model: TaskModel, data, spec: TaskSpec, train: TrainParams, seed: int, desc: str,  # noqa: ANN001
               augmented=None, labels: np.ndarray | None = None) -> float:  # noqa: ANN001 (Datasets)
    """Fit the head in closed form, then train the method's trainables; keep the checkpoint that held out
    best (module doc, step 6; `model.kept_step`) and return its mean loss (eval mode, as deployed) on the
    images the head was fit on. The optimizer steps draw
    from `augmented` if given (the same images with train-time augmentation), all else from `data`;
    `labels`: `data`'s labels in order (read from `data` when not given), for the held-out split.

    A run the guard stops is retried from the same start at half of every learning rate, at most
    BACKOFFS times (module doc, step 7; `model.lr_scale`). Raises a one-line UserError, before anything
    is written, for a task with fewer training images than classes, and when the last retry diverges too.
    """
    method = get(model.method)
    who = desc if method.name in desc else f"{desc} ({method.name})"
    check_task_data(len(data), model.net.head.out_features, who)
    masks = " or the mask lr" if method.column_masks or method.element_masks else ""

    def attempt(scale: float, retried: str) -> float:
        hint = f"{retried}lower train.lr (now {train.lr:g}){masks}, or give the task more images"
        return train_attempt(model, data, spec, train, seed, who, hint, scale, augmented, labels)

    loss, model.lr_scale = with_backoff(model.net, attempt)
    return loss


def with_backoff(net: nn.Module, attempt: Callable[[float, str], T]) -> tuple[T, float]:
    """`attempt(scale, retried)` (a training run with every lr times `scale`; `retried` starts its guard's hint)
    and the scale it held at: 1, then, each time the guard stops it (`Diverged`), again from `net`'s state
    at the start at half the scale, at most BACKOFFS times; the last one's line is raised (module doc, step 7)."""
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for tries in range(BACKOFFS + 1):
        scale = 0.5**tries
        try:
            return attempt(scale, f"retried down to 1/{2**tries} of every learning rate; " if tries else ""), scale
        except Diverged:
            if tries == BACKOFFS:
                raise
            net.load_state_dict(start)
    raise AssertionError("unreachable")


def train_attempt(model: TaskModel, data, spec: TaskSpec, train: TrainParams, seed: int, who: str,  # noqa: ANN001
                  hint: str, scale: float, augmented=None, labels: np.ndarray | None = None) -> float:  # noqa: ANN001
    """One run of `train_task` with every learning rate times `scale` (steps 1-6 of the module doc)."""
    n = len(data)
    workers = train.workers
    validation = Validation.of(model, data, labels, seed, workers)
    if validation is not None:  # train on the rest
        data, augmented = Subset(data, validation.train), None if augmented is None else Subset(augmented,
                                                                                               validation.train)
        n = len(data)
    own_bn = bn_statistics(model, n)
    if own_bn:  # per-task BN starts from the task's own statistics
        recalibrate_bn(model.net, data, seed, workers=workers)
    before = init_head(model, data, seed, workers=workers)
    noise = torch.Generator().manual_seed(seed)  # Gumbel noise of its own: no other training draws from it
    for layer in model.layers().values():
        if layer.column_mask is not None:
            layer.column_mask.generator = noise
    batch = batch_images(n, train.batch_size)
    opts = optimizers(model, train, batch, scale)
    steps = optimizer_steps(n, spec.epochs, train.batch_size, MIN_STEPS)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps)) for opt in opts]

    mode = train_mode(model, batch)
    if validation is not None:
        validation.check(0, mode)  # the start: the closed-form head on the untrained masks
    done = 0

    def after_step() -> None:
        nonlocal done
        for s in schedules:
            s.step()
        done += 1
        if validation is not None and done in validation.at(steps):
            validation.check(done, mode)

    fit(model.net, data if augmented is None else augmented, opts, spec.epochs, train.batch_size, seed, who,
        after_step=after_step, train_mode=mode, min_steps=MIN_STEPS, hint=hint, workers=workers)
    if own_bn:
        recalibrate_bn(model.net, data, seed, workers=workers)
    after = image_losses(model, data, head_images(n, seed), workers=workers)
    if float(after.mean()) > float(before.mean()):
        after = refit_head(model, data, seed, after, workers)
    check_converged(before, after, who, hint)  # on the last step: a run that ends above the head failed
    model.steps, model.kept_step = steps, None if validation is None else validation.best_step
    if validation is not None and validation.best_step != steps:  # an earlier checkpoint held out better
        validation.restore_best()
        if own_bn:
            recalibrate_bn(model.net, data, seed, workers=workers)
    model.head_fit = "logistic" if deploy_head(model, data, validation, seed, workers) else "trained"
    return float(image_losses(model, data, head_images(n, seed), workers=workers).mean())


@torch.no_grad()
def deploy_head(model: TaskModel, data, validation: Validation | None, seed: int,  # noqa: ANN001 (Dataset)
                workers: int | None = None) -> bool:
    """Step 8 of the module doc: the head that deploys. Logistic regression (`logistic_head`: the linear
    probe's model) on the kept network's features as deployed (eval masks) replaces the trained head where
    its held-out loss is lower, and is then refit on the held-out images too. With none held out there is
    no evidence either way, and the trained head stays. Returns whether it was replaced."""
    if validation is None:
        return False
    net = model.net
    was_training = net.training
    net.eval()
    head = net.head
    feats, labels = head_features(net, data, head_images(len(data), seed), workers=workers)
    held, held_labels = head_features(net, validation.data, validation.val, workers=workers)
    trained = float(F.cross_entropy(head(held), held_labels))
    kept = {k: v.clone() for k, v in head.state_dict().items()}
    set_head(head, *logistic_head(feats, labels, head.out_features), feats)
    replaced = float(F.cross_entropy(head(held), held_labels)) < trained
    if replaced:
        feats, labels = torch.cat([feats, held]), torch.cat([labels, held_labels])
        set_head(head, *logistic_head(feats, labels, head.out_features), feats)
    else:
        head.load_state_dict(kept)
    net.train(was_training)
    return replaced


@torch.no_grad()
def set_head(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor) -> None:
    """The 8-bit head's weights, its clips estimated afresh from them and from `feats`."""
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    head.weight_quant.ready.fill_(False)
    head.act_quant.ready.fill_(False)
    head(feats)


@torch.no_grad()
def refit_head(model: TaskModel, data, seed: int, trained: torch.Tensor,  # noqa: ANN001
               workers: int | None = None) -> torch.Tensor:
    """The repair tried before the guard's end check fails a run: the closed-form head refit on the
    trained network as deployed (eval masks, final BN), kept when its loss on the head images is lower
    than the trained head's (`trained`); returns the kept head's losses.

    Training sees Gumbel-sampled masks, the chip the deterministic ones: on a task small enough for
    the closed-form head to fit it exactly, the trained head can end worse on the deployed network
    than a head fit to that network's features (measured: XBM on 20 images, 0.34 against 0.07).
    A run that trained normally ends below the closed-form head's loss and never gets here.
    """
    head = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    refit = init_head(model, data, seed, workers=workers)
    if float(refit.mean()) < float(trained.mean()):
        return refit
    model.net.head.load_state_dict(head)
    return trained
