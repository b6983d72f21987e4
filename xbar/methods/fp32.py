"""The paper's accuracy ceiling (`finetune_fp32`): the fp32 backbone (no quantizer, no crossbar) fine-tuned
whole on the task, its own copy. It trains by the recipe's shared pieces (head, schedule, guard) with SGD on
every weight; nothing goes on a chip, so it is a configuration of the comparison, not a registered method.
"""

from __future__ import annotations

import torch
from torch import nn

from xbar.methods.presets import recipe_for
from xbar.methods.recipe import (MIN_BN_IMAGES, MIN_STEPS, WEIGHT_DECAY, bn_mode, check_converged, describe_lrs,
                                 lr_schedule, recalibrate_bn)
from xbar.params import TaskSpec, TrainParams
from xbar.runtime import batches, model_device
from xbar.training import as_input, batch_images, fit, fit_head, head_images, optimizer_steps

NAME = "finetune_fp32"


@torch.no_grad()
def losses(net: nn.Module, data, idx: torch.Tensor, batch_size: int = 512,  # noqa: ANN001 (Dataset)
           workers: int | None = None) -> torch.Tensor:
    """Each image's cross-entropy under `net` in eval mode, read in batches (any source: labels may be ints)."""
    net.eval()
    chunks = [chunk.tolist() for chunk in idx.split(batch_size)]
    return torch.cat([nn.functional.cross_entropy(net(as_input(x)), y, reduction="none").cpu()
                      for x, y in batches(data, chunks, model_device(net), workers)])


def train_fp32(net: nn.Module, data, fit_data, spec: TaskSpec, train: TrainParams, seed: int,  # noqa: ANN001
               desc: str) -> tuple[int, str]:
    """Fine-tune `net` (its head already sized for the task) on `data` (optimizer steps draw from `fit_data`,
    e.g. augmented): the ridge head, then SGD on every weight at train.lr under the recipe's schedule, the
    divergence guard (no retry). Returns (optimizer steps, the recipe's label)."""
    recipe = recipe_for(train.recipe, NAME)
    n, workers = len(data), train.workers
    own_bn = n >= MIN_BN_IMAGES  # a fine-tune's BN is its own: the task's statistics, where there are enough
    if own_bn:
        recalibrate_bn(net, data, seed, workers=workers)
    idx = head_images(n, seed)
    net.eval()
    fit_head(net, data, idx, workers=workers)
    before = losses(net, data, idx, workers=workers)
    batch = batch_images(n, train.batch_size)
    steps = optimizer_steps(n, spec.epochs, train.batch_size, MIN_STEPS)
    opt = torch.optim.SGD(net.parameters(), lr=train.lr * min(1.0, batch / train.batch_size),
                          momentum=train.momentum, nesterov=train.momentum > 0, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(recipe, steps))
    who, hint = f"{desc} ({NAME})", f"{recipe.name} recipe at lrs {describe_lrs([opt])}: lower train.lr"
    fit(net, fit_data, [opt], spec.epochs, train.batch_size, seed, who, after_step=sched.step,
        train_mode=bn_mode(batch >= MIN_BN_IMAGES), min_steps=MIN_STEPS, hint=hint, workers=workers,
        mixed_precision=train.mixed_precision)
    if own_bn:
        recalibrate_bn(net, data, seed, workers=workers)
    check_converged(before, losses(net, data, idx, workers=workers), who, hint)
    return steps, recipe.label(spec.epochs)
