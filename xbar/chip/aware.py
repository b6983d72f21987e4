"""Hardware-aware training as the chip forward (`train.hw_aware` with `chip.aware: chip`), straight through.
(`chip.aware: noise`, aihwkit's weight-noise training, is xbar.chip.noise_aware.)

Inside `hardware_aware(model, device, adc, ...)`, every mapped layer's *training* forward is

    y = ideal(x) + (chip(x) - ideal(x)).detach()

so the loss is the chip's -- bit-serial inputs, ADC codes of `adc`, the programming error, read
noise, stuck cells and drift of `device` (xbar.chip.forward, xbar.chip.instance) -- and the
gradients are the ideal layer's (straight-through), as aihwkit's hardware-aware training puts the
tile's noise and ADC into the forward pass only. The column mask of a training forward is one
Gumbel sample, used by both paths.

* **A fresh chip per forward.** Each training forward runs on a new chip instance, drawn from a
  seed namespace of its own (TRAINING_SEEDS; never one of the instances `xbar chip` and the
  comparison evaluate on, seed .. seed + M - 1): the task learns what every chip of the line
  does, not one chip's cells.
* **The ADC ranges** (a calibrated rule) are set once, before training, on `calibration` images run
  through the untrained task model, as the deployed chip calibrates on the task's training images.
* **Eval mode stays ideal**: the divergence guard's losses, the no-forgetting gate and the
  reported ideal accuracy see exact arithmetic; only the optimizer steps see the chip.

The chip forward runs on the CPU only. Cost: a training step does the chip forward besides the
ideal forward and backward (the chip forward is ~12x the ideal one, benchmarks/chip_speed.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

from xbar.chip.devices import DevicePreset
from xbar.chip.evaluate import calibrate_adcs, chip_forward, chip_mode, layer_levels
from xbar.chip.forward import AdcConfig, ChipLayer, LayerPlan, reference_targets
from xbar.chip.instance import ChipInstance, target_cells
from xbar.errors import UserError
from xbar.runtime import model_device

TRAINING_SEEDS = 1 << 40  # training chips are seeds TRAINING_SEEDS + seed * 2**20 + forward (evaluation: seed + i)


class _Chips:
    """The training chips: a new instance at every training forward of the network."""

    def __init__(self, model, device: DevicePreset, adc: AdcConfig, seed: int) -> None:  # noqa: ANN001 (TaskModel)
        self.model, self.device, self.adc = model, device, adc
        self.seed, self.forwards = TRAINING_SEEDS + seed * (1 << 20), 0
        self.instance: ChipInstance | None = None
        self.plans = {name: LayerPlan(layer.lm) for name, layer in model.layers().items()}
        self.ranges: dict[str, torch.Tensor | None] = {}
        spec = model.mapping.spec
        self.read_sigma = device.read_sigma * device.noise_scale * (2**spec.cell_bits - 1)

    def next_chip(self) -> ChipInstance:
        self.instance = ChipInstance(self.seed + self.forwards, self.device, self.model.mapping)
        self.forwards += 1
        return self.instance

    def before_forward(self, net: nn.Module, _inputs: tuple) -> None:
        """A forward pre-hook: a training forward of the network runs on a chip of its own."""
        if net.training:
            self.next_chip()

    def layer(self, name: str, layer: nn.Module, multipliers: torch.Tensor | None, backbone: dict) -> ChipLayer:
        """The chip layer of `layer` on the current instance, with this forward's column multipliers."""
        spec, levels = self.model.mapping.spec, layer_levels(layer)
        spare = torch.zeros(levels.shape, dtype=torch.bool) if layer.spare is None else layer.spare.cpu()
        rewritten = (levels != backbone[name]["levels"].to(torch.int64)) & ~spare
        instance = self.instance or self.next_chip()  # a layer run on its own: its first chip
        cells = instance.layer_cells(layer.lm, target_cells(levels, spec, self.adc.signed), spare, rewritten)
        plan, reference = self.plans[name], None
        if self.adc.signed == "offset_ref":
            reference = instance.reference_cells(name, reference_targets(plan, spec), 2**spec.cell_bits - 1)
        chip = ChipLayer(plan, cells, self.adc, spec.cell_bits, spec.weight_levels,
                         None if multipliers is None else multipliers.detach(), self.read_sigma, instance.read,
                         reference)
        chip.ranges = self.ranges.get(name)
        return chip


def _training_forward(chips: _Chips, name: str, backbone: dict):  # noqa: ANN202 (a bound forward)
    def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not layer.training:
            return type(layer).forward(layer, x)
        m = layer.column_multipliers()  # one Gumbel sample for the ideal and the chip path
        y = layer.compute(layer.act_quant(x), layer.weight(m))
        with torch.no_grad():
            y_chip = chip_forward(chips.layer(name, layer, m, backbone))(layer, x)
        return y + (y_chip - y).detach()

    return forward


@contextmanager
def hardware_aware(model, device: DevicePreset, adc: AdcConfig, backbone: dict, seed: int,  # noqa: ANN001
                   calibration: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the block, `model.net` trains on the chip's forward (module doc); eval mode stays ideal.

    `backbone`: levels.pt (name -> {"levels", "scale"}): which cells a task rewrites in place.
    `calibration`: uint8 images for the calibrated ADC ranges (a calibrated adc.range).
    """
    adc.check()
    if model_device(model.net).type != "cpu":
        raise UserError("train.hw_aware: the chip forward runs on the CPU only (set train.device: cpu)")
    if adc.calibrated and (calibration is None or len(calibration) < 1):
        raise UserError(f"train.hw_aware with adc_range {adc.range}: needs calibration images (the task's "
                        "training images)")
    chips = _Chips(model, device, adc, seed)
    was_training = model.net.training
    if adc.calibrated:
        with chip_mode(model, ChipInstance(chips.seed, device, model.mapping), adc, backbone) as calibrated:
            calibrate_adcs(model, calibrated, calibration)
        chips.ranges = {name: chip.ranges for name, chip in calibrated.items()}
    model.net.train(was_training)
    layers = model.layers()
    hook = model.net.register_forward_pre_hook(chips.before_forward)
    try:
        for name, layer in layers.items():
            layer.forward = MethodType(_training_forward(chips, name, backbone), layer)
        yield
    finally:
        hook.remove()
        for layer in layers.values():
            layer.__dict__.pop("forward", None)  # the class's (ideal) forward again
