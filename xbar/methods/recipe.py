"""The training recipe every method shares (`train_task`).

1. methods with per-task BN first re-estimate its statistics on the new task
   (`recalibrate_bn`), so training and the head fit below see the same features;
2. the head is fit in closed form (ridge regression on up to 4096 training
   images' features, `init_head`): SGD from a random head on raw pooled features
   is badly conditioned and cost every mask method tens of points;
3. SGD (train.lr, cosine) on weights, head, BN, clips; Adam (the method's
   `mask_lr`) on masks;
4. BN statistics are re-estimated once more with the deterministic (eval) masks:
   during training the column masks are Gumbel samples, the deployed ones are not.

Per-task BN (a method's `bn_per_task`): a column mask changes a channel's
partial sums, so the backbone's BN statistics no longer match; such a method
trains and re-estimates its own BN (4 x channels values per BN layer, digital,
stored in `model_state`). Piggyback keeps the backbone's BN, as in its paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xbar.methods.layers import TaskModel
from xbar.methods.registry import get
from xbar.params import TaskSpec, TrainParams
from xbar.training import as_input, fit

WEIGHT_DECAY = 5e-4  # head and fine-tuned / spare-PE weights only
HEAD_INIT_IMAGES = 4096  # images whose features fit the head in closed form before training
RIDGE = 1e-2  # relative ridge penalty: keeps the solve stable for batches smaller than the feature width


def ridge_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) of the least-squares fit of one-hot labels (float64, deterministic)."""
    f = features.detach().double()
    mean = f.mean(0)
    fc = f - mean
    target = F.one_hot(labels, num_classes).double()
    gram = fc.T @ fc
    penalty = RIDGE * (gram.diagonal().mean() + 1e-12)
    w = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype), fc.T @ (target - target.mean(0)))
    b = target.mean(0) - mean @ w
    return w.T.to(features.dtype), b.to(features.dtype)


@torch.no_grad()
def init_head(model: TaskModel, data, seed: int, batch_size: int = 512) -> None:  # noqa: ANN001 (Dataset)
    """Fit the head in closed form on the untrained task model's features (LP-FT's linear probe).

    SGD from a random head on the backbone's raw pooled features (large common
    mean) is badly conditioned and leaves every method tens of points short;
    ridge regression of one-hot labels on up to HEAD_INIT_IMAGES seeded training
    images, with the logit scale that minimizes cross-entropy, starts the head
    where a linear probe ends. Same for every method, so the comparison is fair.
    """
    net = model.net
    was_training = net.training
    net.eval()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:HEAD_INIT_IMAGES]
    feats, labels = [], []
    for chunk in idx.split(batch_size):
        x, y = zip(*(data[int(i)] for i in chunk))
        feats.append(net.features(as_input(torch.stack(x))))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    f, y = torch.cat(feats), torch.cat(labels)
    w, b = ridge_head(f, y, net.head.out_features)
    logits = f @ w.T + b
    scales = torch.logspace(-1, 3, 41)
    best = min(scales.tolist(), key=lambda s: float(F.cross_entropy(logits * s, y)))
    net.head.weight.copy_(w * best)
    net.head.bias.copy_(b * best)
    net.head.weight_quant.ready.fill_(False)  # clips start from the fitted weights / real features
    net.head.act_quant.ready.fill_(False)
    net.train(was_training)


def set_trainable(model: TaskModel) -> None:
    """requires_grad exactly on the method's trainables (see the module's table)."""
    net, method = model.net, get(model.method)
    for p in net.parameters():
        p.requires_grad_(method.trains_all)  # fine-tuning trains everything (BN, clips too)
    for p in net.head.parameters():
        p.requires_grad_(True)
    if method.bn_per_task:
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

    cells: list[nn.Parameter]  # crossbar weights: fine-tuned or spare-PE weights (SGD, decay)
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
def recalibrate_bn(model: TaskModel, data, seed: int, batch_size: int = 128) -> None:  # noqa: ANN001 (Dataset)
    """Re-estimate BN statistics with the deterministic (eval) masks and levels.

    During training the column masks are Gumbel samples, so the running
    statistics describe a noisy network; the deployed one has no noise. One
    pass over up to HEAD_INIT_IMAGES seeded training images with every mask in
    eval mode and BN averaging (momentum None) fixes the mismatch.
    """
    net = model.net
    net.eval()
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the pass
        bn.train()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))[:HEAD_INIT_IMAGES]
    for chunk in idx.split(batch_size):
        net(as_input(torch.stack([data[int(i)][0] for i in chunk])))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    net.eval()


def train_mode(model: TaskModel):  # noqa: ANN201 (a callable for fit)
    """Training mode, except the BN of a method without per-task BN, which keeps the backbone's statistics."""
    frozen_bn = not get(model.method).bn_per_task

    def apply(net: nn.Module) -> None:
        net.train()
        if frozen_bn:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    return apply


def optimizers(model: TaskModel, train: TrainParams) -> list[torch.optim.Optimizer]:
    """SGD (lr, momentum) on weights, head, BN and clips; Adam on the real-valued masks
    (the method's `mask_lr`: train.mask_lr for column masks, a constant for Piggyback's).

    (Adam on the head and BN was tried: it adapts the head too slowly to the
    masked features, -1 to -4 points for xma / xma2.)
    """
    g = parameter_groups(model)
    head_weight = model.net.head.weight
    groups = [{"params": g.cells + [head_weight], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in g.head if p is not head_weight] + g.digital, "weight_decay": 0.0}]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=train.momentum > 0)]
    if g.masks:
        opts.append(torch.optim.Adam(g.masks, lr=get(model.method).mask_lr(train)))
    return opts


def train_task(model: TaskModel, data, spec: TaskSpec, train: TrainParams, seed: int, desc: str) -> float:  # noqa: ANN001
    """Fit the head in closed form, then train the method's trainables; returns the last epoch's mean loss."""
    bn_per_task = get(model.method).bn_per_task
    if bn_per_task:  # per-task BN starts from the task's own statistics
        recalibrate_bn(model, data, seed)
    init_head(model, data, seed)
    noise = torch.Generator().manual_seed(seed)  # Gumbel noise of its own: no other training draws from it
    for layer in model.layers().values():
        if layer.column_mask is not None:
            layer.column_mask.generator = noise
    opts = optimizers(model, train)
    steps = spec.epochs * math.ceil(len(data) / train.batch_size)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) for opt in opts]

    def after_step() -> None:
        for s in schedules:
            s.step()

    loss = fit(model.net, data, opts, spec.epochs, train.batch_size, seed, desc,
               after_step=after_step, train_mode=train_mode(model))
    if bn_per_task:
        recalibrate_bn(model, data, seed)
    return loss
