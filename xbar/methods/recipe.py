"""The training recipe every method shares (`train_task`); `train.recipe` names it (xbar.methods.presets).

Rules, each with its evidence in docs/decisions.md ("Recipes", "Masks that learn"):
- optimizers are torch.optim's with per-element state: SGD (momentum) on the head, BN affine and clips; Adam
  on the real-valued masks and on 4-bit latent weights (fine-tuned, spare PEs). A frozen entry of a spare-PE
  layer gets no gradient, so it is in no Adam statistic; weight decay only on the head's weight;
- every method of a task runs the same optimizer steps (epochs x batches, at least MIN_STEPS), warm-up then
  cosine (a preset may state its own: Piggyback's step schedule, batch and Adam lrs);
- mask lr by the reach rule: a mask entry whose gradient keeps its sign crosses its threshold at MASK_REACH
  of the run (Adam moves such an entry by about lr per step), for column and element masks alike;
- one head procedure per recipe, the same for every method: the ridge head fit in closed form, then trained
  with the rest; the trained head deploys (nothing is swapped after training);
- the checkpoint kept is the one that holds out best (xbar.methods.validation), the same for every method;
- a run the guard stops is a failure reported with its lrs (`Diverged`, one line): no retry, no lr change.

BN (`model.bn`): `frozen` keeps the backbone's statistics and affine (the paper's chip has no per-task affine);
`per_task` trains and re-estimates the task's own (charged: xbar.memory, xbar.energy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from xbar.errors import Diverged, UserError
from xbar.methods.layers import TaskModel
from xbar.methods.presets import STEP_AT, STEP_FACTOR, Recipe, recipe_for
from xbar.methods.registry import get
from xbar.methods.validation import Validation, held_out, image_losses  # noqa: F401 (held_out: re-exported)
from xbar.params import TaskSpec, TrainParams
from xbar.runtime import batches, model_device
from xbar.training import (HEAD_INIT_IMAGES, as_input, batch_images, fit, fit_head, head_images, optimizer_steps,
                           ridge_head)  # noqa: F401 (ridge_head: re-exported by xbar.methods)

WEIGHT_DECAY = 5e-4  # on the head's weight only (SGD); no decay on masks or 4-bit weights
WARMUP_SHARE = 0.1  # of the optimizer steps, lr rising linearly from lr / warm-up steps to lr
MIN_STEPS = 50  # a tiny task still gets this many optimizer steps (the data is cycled)
CELL_LR_LEVELS = 0.05  # Adam's lr on 4-bit latent weights, in quantization levels of their layer
MASK_REACH = 0.5  # a mask entry whose gradient keeps its sign crosses its threshold at this share of the run
MIN_BN_IMAGES = 32  # BN statistics from fewer images are off by more than sqrt(2 / 31) = 25% (std of a variance)
CONVERGED_SE = 2.0  # the trained model's loss may exceed the start's by this many standard errors (noise)


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


def lr_schedule(recipe: Recipe, steps: int) -> Callable[[int], float]:
    """The lr multiplier at each optimizer step: warm-up then cosine (`lr_factor`), or the preset's step
    schedule (x STEP_FACTOR from STEP_AT of the run: Piggyback's epoch 15 of 30)."""
    if recipe.schedule == "step":
        return lambda t: 1.0 if t < STEP_AT * steps else STEP_FACTOR
    return lambda t: lr_factor(t, steps)


def lr_factor(step: int, steps: int) -> float:
    """The lr multiplier at optimizer step `step` of `steps`: linear warm-up over the first
    WARMUP_SHARE of the steps, times a cosine from 1 to 0 over all of them."""
    warmup = max(1, math.ceil(WARMUP_SHARE * steps))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def mask_lr(model: TaskModel, train: TrainParams, recipe: Recipe, steps: int) -> float:
    """Adam's lr on the masks: the preset's, else train.mask_lr (column masks), else the reach rule: the
    method's distance from a mask's start to its threshold over the lr factors summed to MASK_REACH of the run."""
    method = get(model.method)
    fixed = recipe.mask_lr if recipe.mask_lr is not None else method.mask_lr(train)
    if fixed is not None:
        return fixed
    factor = lr_schedule(recipe, steps)
    return method.mask_distance() / sum(factor(t) for t in range(max(1, math.ceil(MASK_REACH * steps))))


def optimizers(model: TaskModel, train: TrainParams, batch: int | None = None, steps: int | None = None,
               recipe: Recipe | None = None) -> list[torch.optim.Optimizer]:
    """SGD (momentum) on head, BN and clips; per-element Adam on 4-bit latent weights (CELL_LR_LEVELS of the
    layer's quantization step) and on the masks (`mask_lr`); a preset's own head optimizer where it has one.

    SGD's lr is train.lr for a full batch, in proportion for a smaller `batch` (a task smaller than the batch);
    Adam's lrs by the square root of that share (Malladi et al., NeurIPS 2022). `steps`: the run's optimizer
    steps (the mask lr's reach rule; default: MIN_STEPS).
    """
    recipe = recipe or recipe_for(train.recipe, model.method)
    g = parameter_groups(model)
    full = recipe.batch_size or train.batch_size
    share = min(1.0, (batch or full) / full)
    lr, adam = train.lr * share, math.sqrt(share)
    head_weight = model.net.head.weight
    opts: list[torch.optim.Optimizer] = []
    sgd = [{"params": [p for p in g.head if p is not head_weight] + g.digital, "weight_decay": 0.0}]
    if recipe.head == "random_adam":
        opts.append(torch.optim.Adam(g.head, lr=adam * recipe.head_lr))
        sgd = [{"params": g.digital, "weight_decay": 0.0}]
    else:
        sgd.insert(0, {"params": [head_weight], "weight_decay": WEIGHT_DECAY})
    sgd = [group for group in sgd if group["params"]]
    if sgd:
        opts.insert(0, torch.optim.SGD(sgd, lr=lr, momentum=train.momentum, nesterov=train.momentum > 0))
    cells = [{"params": [layer.latent], "lr": adam * CELL_LR_LEVELS * float(layer.scale)}
             for layer in model.layers().values() if layer.latent is not None]
    if cells:
        opts.append(torch.optim.Adam(cells, lr=adam * CELL_LR_LEVELS))
    if g.masks:
        opts.append(torch.optim.Adam(g.masks, lr=adam * mask_lr(model, train, recipe, steps or MIN_STEPS)))
    return opts


def describe_lrs(opts: list[torch.optim.Optimizer]) -> str:
    """The run's initial lrs, e.g. "SGD 0.05, Adam 0.21" (a diverged run's line names them)."""
    return ", ".join(f"{type(o).__name__} {o.param_groups[0].get('initial_lr', o.param_groups[0]['lr']):.3g}"
                     for o in opts)


def check_task_data(n_train: int, num_classes: int, who: str) -> None:
    """Bad input, as one line: a task needs at least one training image per class."""
    if n_train < num_classes:
        raise UserError(f"{who}: {n_train} training image(s) for {num_classes} classes (the task needs at least "
                        "one per class: add images or raise max_train); nothing was written")


def check_converged(before: torch.Tensor, after: torch.Tensor, who: str, hint: str) -> None:
    """The divergence guard's end check: training must not end above the loss it started from.

    `before` / `after`: each head image's loss at the start and under the trained model. The mean of their
    difference may exceed zero by CONVERGED_SE standard errors (the noise of that mean over these images:
    Gumbel masks and BN re-estimation move it a little), no more.
    """
    diff = (after - before).double()
    noise = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    if float(diff.mean()) > CONVERGED_SE * noise:
        raise Diverged(f"{who}: training ended at loss {float(after.mean()):.3g}, above the start's "
                       f"{float(before.mean()):.3g} on the same training images ({hint}); nothing was written")


def train_task(model: TaskModel, data, spec: TaskSpec, train: TrainParams, seed: int, desc: str,  # noqa: ANN001
               augmented=None, labels: np.ndarray | None = None) -> float:  # noqa: ANN001 (Datasets)
    """Train the method's trainables under train.recipe (module doc); keep the checkpoint that held out best
    (`model.kept_step`) and return its mean loss (eval mode, as deployed) on the head images. The optimizer
    steps draw from `augmented` if given (the same images with train-time augmentation), all else from `data`;
    `labels`: `data`'s labels in order (read from `data` when not given), for the held-out split.

    Raises a one-line UserError before anything is written: a task with fewer training images than classes;
    a run the guard stops (`Diverged`, naming its lrs).
    """
    method = get(model.method)
    recipe = recipe_for(train.recipe, method.name)
    who = desc if method.name in desc else f"{desc} ({method.name})"
    check_task_data(len(data), model.net.head.out_features, who)
    workers = train.workers
    validation = Validation.of(model, data, labels, seed, workers)
    if validation is not None:  # train on the rest
        data = Subset(data, validation.train)
        augmented = None if augmented is None else Subset(augmented, validation.train)
    n = len(data)
    own_bn = bn_statistics(model, n)
    if own_bn:  # per-task BN starts from the task's own statistics
        recalibrate_bn(model.net, data, seed, workers=workers)
    if recipe.head == "ridge_sgd":
        before = init_head(model, data, seed, workers=workers)
    else:  # the preset's fresh head (PyTorch's default init, seeded by the caller)
        before = image_losses(model, data, head_images(n, seed), workers=workers)
    noise = torch.Generator().manual_seed(seed)  # Gumbel noise of its own: no other training draws from it
    for layer in model.layers().values():
        if layer.column_mask is not None:
            layer.column_mask.generator = noise
    batch_size = recipe.batch_size or train.batch_size
    batch = batch_images(n, batch_size)
    steps = optimizer_steps(n, spec.epochs, batch_size, MIN_STEPS)
    opts = optimizers(model, train, batch, steps, recipe)
    factor = lr_schedule(recipe, steps)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in opts]
    hint = f"{recipe.name} recipe at lrs {describe_lrs(opts)}: lower train.lr or train.mask_lr, or give the " \
           "task more images"

    mode = train_mode(model, batch)
    if validation is not None:
        validation.check(0, mode)  # the start: the head on the untrained masks
    done = 0

    def after_step() -> None:
        nonlocal done
        for s in schedules:
            s.step()
        done += 1
        if validation is not None and done in validation.at(steps):
            validation.check(done, mode)

    fit(model.net, data if augmented is None else augmented, opts, spec.epochs, batch_size, seed, who,
        after_step=after_step, train_mode=mode, min_steps=MIN_STEPS, hint=hint, workers=workers)
    if own_bn:
        recalibrate_bn(model.net, data, seed, workers=workers)
    after = image_losses(model, data, head_images(n, seed), workers=workers)
    check_converged(before, after, who, hint)  # on the last step: a run that ends above its start failed
    model.steps, model.kept_step = steps, None if validation is None else validation.best_step
    model.curve = [] if validation is None else validation.curve
    if validation is not None and validation.best_step != steps:  # an earlier checkpoint held out better
        validation.restore_best()
        if own_bn:
            recalibrate_bn(model.net, data, seed, workers=workers)
    model.recipe, model.head_fit = recipe.label(spec.epochs), recipe.head_procedure
    return float(image_losses(model, data, head_images(n, seed), workers=workers).mean())
