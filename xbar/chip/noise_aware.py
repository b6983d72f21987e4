"""Noise-aware training as aihwkit does it (`train.hw_aware` with `chip.aware: noise`): programming
noise injected into the weights of every training forward, gradients through the ideal layer.

Inside `noise_aware(model, device, signed, seed)`, a mapped layer's *training* forward is

    y = layer(x_q, W + dW),   dW drawn afresh each forward, no gradient through dW

where dW is what programming the task's cells would add to each weight: every cell of the weight
(its signed-weight scheme, xbar.crossbar) gets N(0, sigma(level)**2) of the device's programming error
(xbar.chip.devices), weighted by its slice's significance B**(K-1-s), the negative array of
differential weights subtracted, times the layer's scale and the column multiplier. The gradient
with respect to W is the ideal layer's evaluated at the perturbed weights, as aihwkit's
InferenceRPUConfig trains with weight noise. The ADC is not modelled here (its range is calibrated
after training, xbar.chip.adc); eval mode stays ideal, so the no-forgetting gate and the reported ideal
accuracy see exact arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

from xbar.chip.devices import DevicePreset
from xbar.chip.instance import target_cells

NOISE_SEEDS = 1 << 41  # training noise: its own seed stream, never an evaluated chip's


def weight_noise_sigma(levels: torch.Tensor, spec, device: DevicePreset, signed: str) -> torch.Tensor:  # noqa: ANN001
    """Per weight, the programming-error sigma (weight levels) of the cells holding `levels`."""
    cells = target_cells(levels, spec, signed)  # [arrays, *shape, K]
    k = cells.shape[-1]
    sig = (2**spec.cell_bits) ** torch.arange(k - 1, -1, -1, dtype=torch.float32)
    var = (device.sigma_levels(cells, 2**spec.cell_bits - 1) * sig) ** 2
    return var.sum(-1).sum(0).sqrt()  # independent cells: variances add (the arrays' sign does not matter)


def _noisy_forward(device: DevicePreset, spec, signed: str, generator: torch.Generator):  # noqa: ANN001, ANN202
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not layer.training:
            return type(layer).forward(layer, x)
        m = layer.column_multipliers()
        w = layer.weight(m)
        with torch.no_grad():
            levels = layer.task_levels().detach().round()
            key = id(layer)
            if key not in cache or not torch.equal(cache[key][0], levels):  # sigma follows the levels
                cache[key] = (levels, weight_noise_sigma(levels, spec, device, signed).to(w.device))
            z = torch.randn(levels.shape, generator=generator).to(w.device)
            dw = cache[key][1] * z * layer.scale.detach()
            if m is not None:
                dw = dw * layer.weight_multipliers(m.detach())
        return layer.compute(layer.act_quant(x), w + dw)

    return forward


@contextmanager
def noise_aware(model, device: DevicePreset, signed: str, seed: int) -> Iterator[None]:  # noqa: ANN001 (TaskModel)
    """Inside the block, `model.net`'s training forwards see programming noise on their weights (module doc)."""
    generator = torch.Generator().manual_seed(NOISE_SEEDS + seed)
    layers = model.layers()
    forward = _noisy_forward(device, model.mapping.spec, signed, generator)
    try:
        for layer in layers.values():
            layer.forward = MethodType(forward, layer)
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.pop("forward", None)  # the class's (ideal) forward again
