"""Chip mode: a task model evaluated as the chip computes it, on seeded chip instances.

`chip_mode(model, instance, adc)` swaps the forward of every mapped layer
(xbar.methods.CrossbarLayer) for the chip forward (xbar.chip.forward) inside a
`with` block and restores the ideal forward after it; the model itself is not
changed. Entering the block is the chip switching to the task: the task's spare
PEs (and any backbone cell the task rewrites) are programmed on the instance,
drawing fresh programming error.

What the chip forward reads from a CrossbarLayer (its whole coupling to it):
`lm`, `act_quant`, `task_levels()`, `column_multipliers()`, `element_mask` /
`fixed_elements`, `scale`, `bias`, `is_conv`, `conv_args`.

`chip_accuracy` gives the ideal accuracy and the chip's accuracy over M
instances; `switch_back_accuracies` measures device-caused forgetting: the same
task run again after the chip re-programmed its spare PEs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

from xbar.chip.adc import CALIBRATION_IMAGES
from xbar.chip.devices import DevicePreset
from xbar.chip.forward import AdcConfig, ChipLayer, LayerPlan, reference_targets
from xbar.chip.instance import ChipInstance, target_cells
from xbar.errors import UserError
from xbar.quant import scale_grad
from xbar.stats import mean_ci
from xbar.training import accuracy, as_input, predict


def layer_levels(layer: nn.Module) -> torch.Tensor:
    """The integer weight levels the task's cells hold (a Piggyback masked-out weight holds level 0)."""
    levels = layer.task_levels().detach()
    if layer.element_mask is not None:
        levels = levels * layer.element_mask.binary().float()
    elif layer.fixed_elements is not None:
        levels = levels * layer.fixed_elements
    return levels.round().to(torch.int64)


def act_step(act_quant: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input step of the layer's DAC: the same float the activation quantizer multiplies codes by."""
    features = x[0].numel() if x.dim() > 1 else x.numel()
    alpha = scale_grad(act_quant.alpha, (features * act_quant.levels) ** -0.5)
    return alpha.abs().clamp_min(1e-8) / act_quant.levels


def chip_forward(chip: ChipLayer):  # noqa: ANN202 (a bound forward)
    """The forward of a CrossbarLayer as `chip` computes it: forward(layer, x)."""
    def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        xq = layer.act_quant(x)
        step = act_step(layer.act_quant, x)
        codes = (xq / step).round()
        args = layer.act_quant.bits, layer.conv_args if layer.is_conv else None
        y = chip(codes.clamp_min(0), *args)
        if layer.act_quant.signed:  # sign and magnitude: the negative part is a second unsigned pass
            y = y - chip((-codes).clamp_min(0), *args)
        y = y * (layer.scale * step)  # integer sums -> the layer's units, once
        if layer.bias is not None:
            y = y + layer.bias.view(1, -1, *([1] * (y.dim() - 2)))
        return y

    return forward


@contextmanager
@torch.no_grad()
def chip_mode(model, instance: ChipInstance, adc: AdcConfig,  # noqa: ANN001 (a TaskModel)
              backbone: dict | None = None, program: bool = True) -> Iterator[dict[str, ChipLayer]]:
    """Inside the block, `model.net` computes as `instance` does; yields the ChipLayer of every mapped layer.

    `backbone`: levels.pt (name -> {"levels", "scale"}); with it, cells a task rewrites outside its spare
    PEs (fine-tuning, Piggyback) are re-programmed in place. `program=False` re-uses the instance's
    current programming (no fresh draw), e.g. to run the same chip twice.
    """
    adc.check()
    layers = model.layers()
    spec = model.mapping.spec
    spare_pes = torch.as_tensor(model.spare_pes, dtype=torch.int64)
    setup = {}
    for name, layer in layers.items():
        levels = layer_levels(layer)
        pe = layer.lm.index_tensors()[1]
        spare = torch.isin(pe, spare_pes) if spare_pes.numel() else torch.zeros_like(pe, dtype=torch.bool)
        rewritten = torch.zeros_like(spare)
        if backbone is not None:
            rewritten = (levels != backbone[name]["levels"].to(torch.int64)) & ~spare
        setup[name] = (levels, pe, spare, rewritten)
    if program:  # the chip switches to the task
        for pe in spare_pes.tolist():
            instance.program_pe(pe, spare=True)
        for _, pe, _, rewritten in setup.values():
            for p in pe[rewritten].unique().tolist():
                instance.program_pe(p, spare=False)
    read_sigma = instance.device.read_sigma * instance.device.noise_scale * (2**spec.cell_bits - 1)
    chips = {}
    try:
        for name, layer in layers.items():
            levels, _, spare, rewritten = setup[name]
            cells = instance.layer_cells(layer.lm, target_cells(levels, spec, adc.signed), spare, rewritten)
            plan = LayerPlan(layer.lm)
            reference = None
            if adc.signed == "offset_ref":
                reference = instance.reference_cells(name, reference_targets(plan, spec), 2**spec.cell_bits - 1)
            chips[name] = ChipLayer(plan, cells, adc, spec.cell_bits, spec.weight_levels,
                                    layer.column_multipliers(), read_sigma, instance.read, reference)
            layer.forward = MethodType(chip_forward(chips[name]), layer)
        yield chips
    finally:
        for layer in layers.values():
            layer.__dict__.pop("forward", None)  # the class's (ideal) forward again


@torch.no_grad()
def calibrate_adcs(model, chips: dict[str, ChipLayer], images: torch.Tensor,  # noqa: ANN001
                   batch_size: int = 256) -> None:
    """Set every calibrated ADC's range from the partial sums its slice sees on `images` (uint8)."""
    for chip in chips.values():
        chip.start_calibration()
    model.net.eval()
    try:
        for i in range(0, len(images), batch_size):
            model.net(as_input(images[i: i + batch_size]))
    finally:
        for chip in chips.values():
            chip.finish_calibration()


def calibration_images(data, n: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:  # noqa: ANN001
    """Up to `n` seeded images of a dataset (the task's training split: the test split stays unseen)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"chip.calibration_images: expected at least 1 calibration image, got {n!r}")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([data[int(i)][0] for i in idx])


def _run_on_chip(model, data, instance: ChipInstance, adc: AdcConfig, batch_size: int,  # noqa: ANN001
                 calibration: torch.Tensor | None, backbone: dict | None, program: bool = True) -> float:
    """Accuracy (%) of `model` on `data` on `instance` (programmed for the task first unless `program` is off)."""
    with chip_mode(model, instance, adc, backbone, program) as chips:
        if adc.calibrated:
            if calibration is None or len(calibration) < 1:
                raise UserError(f"adc_range {adc.range}: needs at least 1 calibration image (the task's "
                                "training images)")
            calibrate_adcs(model, chips, calibration, batch_size)
        preds, labels = predict(model.net, data, batch_size)
    return float((preds == labels).float().mean() * 100)


def chip_accuracy(model, data, device: DevicePreset, adc: AdcConfig, instances: int = 5, seed: int = 0,  # noqa: ANN001
                  time_s: float = 0.0, batch_size: int = 512, calibration: torch.Tensor | None = None,
                  backbone: dict | None = None, verify: float = 0.0) -> dict:
    """Ideal accuracy and accuracy on `instances` chip instances (seeds seed .. seed + M - 1), in %.

    Returns {"ideal", "chip_mean", "chip_ci" (half-width of the 95% t-interval over instances; nan for
    one), "chip_std" (points, sample std; 0 for one instance), "chip_min", "chip": [per instance]}.
    """
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise UserError(f"instances: expected an integer >= 1, got {instances!r}")
    adc.check()
    ideal = accuracy(model.net, data, batch_size)
    accs = [_run_on_chip(model, data, ChipInstance(seed + i, device, model.mapping, time_s, verify), adc,
                         batch_size, calibration, backbone) for i in range(instances)]
    return {"ideal": ideal, "chip_mean": statistics.fmean(accs), "chip_ci": mean_ci(accs).half_width,
            "chip_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "chip_min": min(accs), "chip": accs}


def switch_back_accuracies(model, data, instance: ChipInstance, adc: AdcConfig, switches: int,  # noqa: ANN001
                           batch_size: int = 512, calibration: torch.Tensor | None = None,
                           backbone: dict | None = None) -> list[float]:
    """Accuracy of one task on one chip when learned, then each time the chip switches back to it.

    Every switch re-programs the task's spare PEs (fresh programming error), so the list shows what
    the device forgets; the algorithm forgets nothing (ideal mode gives one accuracy throughout).
    """
    return [_run_on_chip(model, data, instance, adc, batch_size, calibration, backbone)
            for _ in range(switches + 1)]


def chip_settings(params, adc_bits: int | None = None, device: str | None = None,  # noqa: ANN001 (Params)
                  overrides: dict | None = None, signed: str | None = None,
                  adc_range: str | None = None, adc_clip: float | str | None = None) -> tuple[DevicePreset, AdcConfig]:
    """The device preset and ADC of params.yaml (crossbar.adc_bits / signed, chip.*; the device defaults to
    energy.preset's name), or as given."""
    from xbar.chip.devices import resolve_device
    from xbar.presets import technology

    given = params.chip.overrides if overrides is None else {**params.chip.overrides, **overrides}
    preset = resolve_device(technology(params)[1] if device is None else device, given)
    bits = params.crossbar.adc_bits if adc_bits is None else adc_bits
    clip = params.chip.adc_clip if adc_clip is None else adc_clip
    return preset, AdcConfig(bits, adc_range or params.chip.adc_range, signed or params.crossbar.signed,
                             clip).check()


def evaluate_tasks(params, tasks: dict[str, dict], levels: dict, data: dict, device: DevicePreset,  # noqa: ANN001
                   adc: AdcConfig, instances: int, time_s: float = 0.0, switches: int = 0) -> dict[str, dict]:
    """Every task (name -> task.pt contents, in learning order) on `instances` chips, as the chip runs it
    once all of them are learned (xbar.methods.chip_view). `data`: name -> TaskData. Accuracies in %,
    chip_ci (95% half-width over instances) and chip_std in points. `switches` > 0 adds, per instance, the
    accuracy when the task is learned and after each of `switches` switches back to it; "switch_back" is
    their mean over instances, "device_forgetting" the largest mean drop from the first reading (points)
    and "device_forgetting_ci" its 95% half-width: what the device forgets as the spare PEs are
    re-programmed."""
    from xbar.energy.presets import energy_preset
    from xbar.methods import chip_view, load_task_model
    from xbar.stats import check_instances, paired_ci

    check_instances(instances)
    out = {}
    for name in tasks:
        model = load_task_model(chip_view(tasks, name), levels, params)
        calib = None
        if adc.calibrated:
            calib = calibration_images(data[name].train, params.chip.calibration_images, params.seed)
        verify = params.chip.verify_tolerance
        res = chip_accuracy(model, data[name].test, device, adc, instances, params.seed, time_s,
                            params.train.eval_batch_size, calib, levels, verify)
        out[name] = {k: round(res[k], 2) for k in ("ideal", "chip_mean", "chip_ci", "chip_std", "chip_min")}
        if switches > 0:
            chips = [ChipInstance(params.seed + i, device, model.mapping, time_s, verify) for i in range(instances)]
            runs = [switch_back_accuracies(model, data[name].test, chip, adc, switches, params.train.eval_batch_size,
                                           calib, levels) for chip in chips]
            first = [r[0] for r in runs]
            drops = [paired_ci(first, [r[s] for r in runs]) for s in range(1, switches + 1)]
            worst = max(drops, key=lambda d: d.mean)
            out[name]["switch_back"] = [round(statistics.fmean(r[s] for r in runs), 2) for s in range(switches + 1)]
            out[name]["device_forgetting"] = round(worst.mean, 2)
            out[name]["device_forgetting_ci"] = round(worst.half_width, 2)
            if verify:  # the verify loop's re-writes per programming of the task, one pulse each
                writes = statistics.fmean(c.verify_writes for c in chips) / (switches + 1)
                out[name]["verify_writes"] = round(writes, 1)
                out[name]["verify_j"] = writes * energy_preset(params).write_j_per_pulse()
    return out
