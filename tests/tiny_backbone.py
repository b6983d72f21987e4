"""Tiny quantized backbones for fast unit tests of masks, ranking and methods: random (`tiny_backbone`) and
pretrained for a few seconds on optdigits (`pretrained_backbone`: features that vary between images, as a
user's backbone has; training a task on a random backbone's features can fail the divergence guard)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from project import tiny_params
from xbar.crossbar import map_model
from xbar.methods import crossbar_spec, quantized_net
from xbar.params import Params, parse_params
from xbar.quant import export_levels
from xbar.training import as_input, seed_everything


def tiny_backbone(tasks: dict | None = None, width: int = 8) -> tuple[Params, dict, dict]:
    """(params, quant.pt contents, levels.pt contents) of a width-`width`, 1-block small ResNet."""
    raw = tiny_params(tasks or {"a": {"dataset": "optdigits"}})
    raw["model"]["width"] = width
    params = parse_params(raw)
    seed_everything(0, 1)  # one thread: the same backbone whatever ran before (float sums depend on threads)
    net = quantized_net(params, 10, 1)
    net.eval()
    net(as_input(random_images(64, seed=1)))  # sets every quantizer's clip
    quant = {"state_dict": net.state_dict(), "num_classes": 10, "channels": 1}
    mapped = {lm.name for lm in map_model(net, crossbar_spec(params)).layers}
    levels = {k: v for k, v in export_levels(net).items() if k in mapped}
    return params, quant, levels


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def random_task(n: int = 96, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Images whose class is visible (brightness of one image quarter), so a few steps learn something."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = random_images(n, seed) // 2
    for c in range(classes):
        rows = slice(14 * (c // 2), 14 * (c // 2) + 14)
        cols = slice(14 * (c % 2), 14 * (c % 2) + 14)
        x[y == c, :, rows, cols] += 120
    return TensorDataset(x, y)


def pretrained_backbone(width: int = 8, epochs: int = 2) -> tuple[Params, dict, dict]:
    """(params, quant.pt contents, levels.pt contents) of a width-`width`, 1-block small ResNet pretrained on
    optdigits (one-cycle SGD, `epochs` epochs) and quantized (calibration only): seconds on 2 cores."""
    import math

    from xbar.crossbar import mapped_layers
    from xbar.data import load_task_data
    from xbar.models import build_model
    from xbar.quant import calibrate, quantize_model
    from xbar.training import fit

    raw = tiny_params({"a": {"dataset": "optdigits"}})
    raw["model"]["width"] = width
    params = parse_params(raw)
    seed_everything(0, 1)  # one thread: the same backbone whatever ran before (float sums depend on threads)
    data = load_task_data(params.source.dataset, 0)
    net = build_model(params.model, data.num_classes, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * math.ceil(len(data.train) / 128))
    fit(net, data.train, [opt], epochs, 128, 0, "pretrain", after_step=sched.step)
    quantize_model(net, params.crossbar.weight_bits, params.quant.act_bits)
    calibrate(net, as_input(torch.stack([data.train[i][0] for i in range(256)])))
    mapped = {name for name, _ in mapped_layers(net)}
    levels = {k: v for k, v in export_levels(net).items() if k in mapped}
    return params, {"state_dict": net.state_dict(), "num_classes": data.num_classes, "channels": 1}, levels
