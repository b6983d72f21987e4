"""The chip forward (xbar.chip): against a slow cell-by-cell computation, exactness with an exact ADC and
an ideal device, ADC clipping, the column mask on the digitized partial sum, device presets, instances."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tiny_backbone import random_task, tiny_backbone
from xbar.chip.devices import DEVICES, resolve_device
from xbar.chip.adc import ADC_RANGES
from xbar.chip.evaluate import calibrate_adcs, chip_accuracy, chip_mode, switch_back_accuracies
from xbar.chip.forward import AdcConfig, ChipLayer, LayerPlan
from xbar.chip.instance import ChipInstance, LayerCells, target_cells
from xbar.cli import app
from xbar.crossbar import SCHEMES, CrossbarSpec, map_layers
from xbar.errors import UserError
from xbar.methods import build_task_model
from xbar.params import TaskSpec
from xbar.training import as_input, predict, seed_everything

SPEC = CrossbarSpec()
SMALL = CrossbarSpec(rows=18, cols=8)  # several row and column tiles on tiny layers
ACT_BITS = 4

# (name, weight shape, groups, conv args (stride, padding, dilation) or None for linear, spec)
LAYERS = [
    ("3x3 over 2 row tiles", (5, 4, 3, 3), 1, (1, 1, 1), SMALL),
    ("1x1 strided", (6, 20, 1, 1), 1, (2, 0, 1), SMALL),
    ("grouped, a group over 2 tiles", (4, 4, 3, 3), 2, (1, 1, 1), SMALL),
    ("depthwise, packed", (6, 1, 3, 3), 6, (1, 1, 1), SPEC),
    ("5x5 split over 2 tiles per channel", (3, 2, 5, 5), 1, (1, 2, 1), SMALL),
    ("linear", (7, 40), 1, None, SMALL),
]


def layer_of(shape, groups, spec):
    kind = "conv" if len(shape) == 4 else "linear"
    return map_layers([("l", kind, shape, groups)], spec).layers[0]


def random_case(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-7, 8, shape, generator=g), g


def codes_for(shape, groups, g, n=3):
    cin = shape[1] * groups
    size = (n, cin, 7, 7) if len(shape) == 4 else (n, cin)
    return torch.randint(0, 2**ACT_BITS, size, generator=g).float()


def slow_chip(codes, lm, cells, adc, multipliers, conv_args, offset):
    """Cell by cell: for every column (mask unit), every bit slice and input cycle, sum the cells of its
    weights times the input bits of their rows, digitize, shift-add, correct, mask, add up row tiles."""
    cout, cin_g, k = lm.out_channels, lm.cin_per_group, lm.kernel
    if conv_args is None:
        rows_in = codes.unsqueeze(2)  # [N, Cin, 1]
    else:
        stride, padding, dilation = conv_args
        rows_in = F.unfold(codes, lm.shape[2:], dilation, padding, stride)  # [N, Cin * k, P]
    n, _, p = rows_in.shape
    column = lm.index_tensors()[0].reshape(cout, cin_g * k)
    levels = cells.levels  # [arrays, cout, ..., K]
    arrays, kc = levels.shape[0], levels.shape[-1]
    lv = levels.reshape(arrays, cout, cin_g * k, kc)
    base = 2**SPEC.cell_bits
    out = torch.zeros(n, cout, p)
    for c in column.unique().tolist():
        o_idx, r_idx = (column == c).nonzero(as_tuple=True)
        o = int(o_idx[0])
        group = o // (cout // lm.groups)
        rows = group * cin_g * k + r_idx  # rows of the unrolled input
        full = len(rows) * (base - 1)
        top = adc.top_code
        step = max(1.0, full / top)
        total = torch.zeros(n, p)
        for j in range(ACT_BITS):
            bits = (rows_in[:, rows].long() >> j) & 1  # [N, rows, P]
            for s in range(kc):
                g = lv[0, o, r_idx, s] if adc.signed == "offset" else lv[0, o, r_idx, s] - lv[1, o, r_idx, s]
                psum = (g.view(1, -1, 1) * bits).sum(1).float()
                lo = 0 if adc.signed == "offset" else -top
                value = torch.clamp(torch.round(psum / step), lo, top) * step
                total += value * base ** (kc - 1 - s) * 2**j
            if offset:
                total -= offset * bits.sum(1) * 2**j
        out[:, o] += total * (1.0 if multipliers is None else float(multipliers[c]))
    return out.reshape(n, cout, *(() if conv_args is None else _hw(codes, lm, conv_args)))


def _hw(codes, lm, conv_args):
    stride, padding, dilation = conv_args
    h = [(codes.shape[2 + i] + 2 * padding - dilation * (lm.shape[2 + i] - 1) - 1) // stride + 1 for i in range(2)]
    return tuple(h)


def chip_of(lm, levels, adc, multipliers=None):
    cells = LayerCells(target_cells(levels, lm.spec, adc.signed).float())
    return ChipLayer(LayerPlan(lm), cells, adc, lm.spec.cell_bits, lm.spec.weight_levels, multipliers), cells


@pytest.mark.parametrize(("name", "shape", "groups", "conv", "spec"), LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize(("bits", "signed"), [(16, "offset"), (3, "offset"), (16, "differential"),
                                              (4, "differential")])
def test_chip_forward_matches_a_cell_by_cell_computation(name, shape, groups, conv, spec, bits, signed):
    lm = layer_of(shape, groups, spec)
    levels, g = random_case(shape)
    codes = codes_for(shape, groups, g)
    mult = torch.tensor([1.0, 0.5, 0.125, 0.0, 0.25])[torch.randint(0, 5, (lm.n_columns,), generator=g)]
    adc = AdcConfig(bits, "full", signed)
    chip, cells = chip_of(lm, levels, adc, mult)
    args = None if conv is None else (*conv, groups)
    fast = chip(codes, ACT_BITS, args)
    slow = slow_chip(codes, lm, cells, adc, mult, conv, spec.weight_levels if signed == "offset" else 0)
    assert torch.allclose(fast, slow, atol=1e-3), (fast - slow).abs().max()
    if bits == 16:  # an exact ADC: the chip computes the masked integer convolution
        column = lm.index_tensors()[0].long()
        w = levels.float() * mult[column]
        ideal = F.linear(codes, w) if conv is None else F.conv2d(codes, w, None, *conv, groups)
        assert torch.allclose(fast, ideal, atol=1e-3)


def test_low_bit_adc_clips_and_rounds():
    lm = layer_of((8, 8, 3, 3), 1, SPEC)  # 72 rows: column sums up to 216
    levels, g = random_case((8, 8, 3, 3), seed=1)
    codes = codes_for((8, 8, 3, 3), 1, g)
    exact, _ = chip_of(lm, levels, AdcConfig(8, "full"))  # 255 codes >= 216: exact
    ideal = F.conv2d(codes, levels.float(), None, 1, 1)
    assert torch.equal(exact(codes, ACT_BITS, (1, 1, 1, 1)), ideal)
    for bits in (3, 5):
        low, _ = chip_of(lm, levels, AdcConfig(bits, "full"))
        err = (low(codes, ACT_BITS, (1, 1, 1, 1)) - ideal).abs()
        assert err.max() > 0
    # a calibrated range below the partial sums saturates them
    chip, _ = chip_of(lm, levels, AdcConfig(5, "per_layer"))
    chip.ranges = torch.full((1,), 4.0)
    saturated = chip(codes, ACT_BITS, (1, 1, 1, 1))
    assert not torch.allclose(saturated, ideal, atol=1.0)


def test_calibration_sets_each_range_to_a_percentile_of_its_partial_sums():
    shape = (8, 8, 3, 3)  # 72 rows: one row tile
    lm = layer_of(shape, 1, SPEC)
    levels, g = random_case(shape, seed=3)
    codes = codes_for(shape, 1, g, n=4)
    cells = target_cells(levels, SPEC)[0].float()  # [8, 8, 3, 3, K]
    psums = torch.stack([torch.stack([F.conv2d(((codes.long() >> j) & 1).float(), cells[..., s], None, 1, 1)
                                      for j in range(ACT_BITS)]) for s in range(2)])  # [K, cycles, N, 8, H, W]
    for pct in (100.0, 90.0):
        chip, _ = chip_of(lm, levels, AdcConfig(5, "per_column", clip=pct))
        chip.start_calibration()
        chip(codes, ACT_BITS, (1, 1, 1, 1))
        chip.finish_calibration()
        # per column: unit (tile 0, group 0, slice s, output o)
        want = [[float(torch.quantile(psums[s][:, :, o].flatten(), pct / 100, interpolation="higher"))
                 for o in range(8)] for s in range(2)]
        assert chip.ranges[chip.unit[0, 0]].tolist() == want
        layer, _ = chip_of(lm, levels, AdcConfig(5, "per_layer", clip=pct))
        layer.start_calibration()
        layer(codes, ACT_BITS, (1, 1, 1, 1))
        layer.finish_calibration()
        assert layer.ranges.tolist() == [float(torch.quantile(psums.flatten(), pct / 100, interpolation="higher"))]
    assert want[1][0] < psums[1][:, :, 0].max()  # the 90th percentile clips the largest sums


def test_the_column_mask_acts_on_the_digitized_partial_sum():
    """At a coarse ADC, masking a column scales its digitized output exactly; scaling the weights instead
    (what the ideal mode does) would digitize different partial sums."""
    shape = (6, 8, 3, 3)
    lm = layer_of(shape, 1, SPEC)  # one row tile: column = output channel
    levels, g = random_case(shape, seed=2)
    codes = codes_for(shape, 1, g)
    adc = AdcConfig(3, "full")
    mult = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0, 1.0])
    plain, _ = chip_of(lm, levels, adc)
    masked, _ = chip_of(lm, levels, adc, mult)
    args = (1, 1, 1, 1)
    y1, ym = plain(codes, ACT_BITS, args), masked(codes, ACT_BITS, args)
    assert torch.equal(ym, y1 * mult.view(1, -1, 1, 1))
    # masking before the ADC (on the cells) is a different computation at 3 bits
    before = ChipLayer(LayerPlan(lm), LayerCells(target_cells(levels, SPEC).float() * mult.view(1, -1, 1, 1, 1, 1)),
                       adc, SPEC.cell_bits, SPEC.weight_levels)
    assert not torch.allclose(before(codes, ACT_BITS, args)[:, 1:4], ym[:, 1:4])


# --- a tiny task model: exactness end to end --------------------------------------------------------


@pytest.fixture(scope="module")
def task_model():
    params, quant, levels = tiny_backbone(width=8)
    seed_everything(0)
    spec = TaskSpec(dataset="optdigits", method="xma2", epochs=1)
    model = build_task_model(params, spec, quant, levels, 3, spare_pes=torch.tensor([0, 3]))
    g = torch.Generator().manual_seed(0)
    for layer in model.layers().values():  # a task that masks columns and changes its spare PEs
        layer.column_mask.real.data = torch.randn(layer.column_mask.real.shape, generator=g) * 3
        if layer.latent is not None:
            layer.latent.data += torch.randn(layer.latent.shape, generator=g) * layer.scale * 2
    model.net.eval()
    return model, levels


@pytest.mark.parametrize("signed", SCHEMES)
@pytest.mark.parametrize("rule", ADC_RANGES)
def test_exact_adc_and_ideal_device_reproduce_ideal_predictions(task_model, signed, rule):
    """Every signed scheme and range rule. Calibrated ranges are set on the evaluated images themselves,
    so that they cover every partial sum the evaluation makes: the 16-bit ADC then resolves all of them."""
    model, _ = task_model
    data = random_task(128, seed=3)
    calib = data.tensors[0]
    ideal_pred, _ = predict(model.net, data, 64)
    x = as_input(data.tensors[0][:32])
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n, layer in model.layers().items()]
    with torch.no_grad():
        model.net(x)
        ideal_out = dict(outputs)
        with chip_mode(model, ChipInstance(0, DEVICES["ideal"], model.mapping), AdcConfig(16, rule, signed)) as chips:
            if rule != "full":
                calibrate_adcs(model, chips, calib)
                assert all(c.ranges is not None for c in chips.values())
            chip_pred, _ = predict(model.net, data, 64)
            model.net(x)
    for h in hooks:
        h.remove()
    assert torch.equal(chip_pred, ideal_pred)
    for name, out in outputs.items():  # layer by layer: integer sums, only the scale's float rounding differs
        assert torch.allclose(out, ideal_out[name], rtol=1e-5, atol=1e-6), name
    assert "forward" not in next(iter(model.layers().values())).__dict__  # the ideal forward is back


def test_signed_inputs_run_as_two_passes_and_stay_exact():
    """Normalized images reach the first layer signed: the quantizer turns signed and the chip's
    positive and negative passes add up to the ideal layer exactly."""
    params, quant, levels = tiny_backbone(width=8)
    seed_everything(0)
    model = build_task_model(params, TaskSpec(dataset="optdigits", method="xma2", epochs=1), quant, levels, 3,
                             spare_pes=torch.tensor([0]))
    model.net.input_norm.set([0.5], [0.25])
    first = next(iter(model.layers().values()))
    first.act_quant.ready.fill_(False)  # re-calibrates on the normalized images
    model.net.eval()
    x = as_input(random_task(16, seed=6).tensors[0])
    with torch.no_grad():
        ideal = model.net(x)
        assert bool(first.act_quant.signed) and not any(bool(l.act_quant.signed) for l in list(model.layers().values())[1:])
        assert (first.act_quant(model.net.input_norm(x)) < 0).any()
        with chip_mode(model, ChipInstance(0, DEVICES["ideal"], model.mapping), AdcConfig(16, "full")):
            chip = model.net(x)
    assert torch.allclose(chip, ideal, rtol=1e-4, atol=1e-5)


def test_chip_accuracy_reports_instances_and_the_ideal_device_is_exact(task_model):
    model, _ = task_model
    data = random_task(48, seed=4)
    calib = random_task(32, seed=5).tensors[0]
    exact = chip_accuracy(model, data, DEVICES["ideal"], AdcConfig(16), instances=2, calibration=calib)
    assert exact["chip"] == [exact["ideal"]] * 2 and exact["chip_std"] == 0.0
    noisy = chip_accuracy(model, data, DEVICES["mnsim-45nm"], AdcConfig(4, "full"), instances=2)
    assert len(noisy["chip"]) == 2 and noisy["chip_min"] == min(noisy["chip"])
    assert noisy["chip_mean"] == pytest.approx(sum(noisy["chip"]) / 2)
    # a noisy device changes what the chip computes, and two instances differ
    x = as_input(data.tensors[0][:16])
    with torch.no_grad():
        ideal = model.net(x)
        logits = []
        for seed in (0, 1):
            with chip_mode(model, ChipInstance(seed, DEVICES["paper"], model.mapping), AdcConfig(16, "full")):
                logits.append(model.net(x))
    assert not torch.allclose(logits[0], ideal) and not torch.allclose(logits[0], logits[1])
    with pytest.raises(UserError, match="instances"):
        chip_accuracy(model, data, DEVICES["ideal"], AdcConfig(8), instances=0)
    with pytest.raises(UserError, match="calibration"):
        chip_accuracy(model, data, DEVICES["ideal"], AdcConfig(8, "per_column"), instances=1)
    with pytest.raises(UserError, match="calibration"):
        chip_accuracy(model, data, DEVICES["ideal"], AdcConfig(8, "per_crossbar"), instances=1,
                      calibration=calib[:0])


def test_switching_back_to_a_task_reprograms_its_spare_pes(task_model):
    """The chip forgets through its device: every switch back draws new error in the task's spare PEs."""
    model, _ = task_model
    data = random_task(16, seed=6)
    chip = ChipInstance(0, resolve_device("paper", {"noise_scale": 5.0, "read_sigma": 0.0}), model.mapping)
    accs = switch_back_accuracies(model, data, chip, AdcConfig(8, "full"), switches=2, batch_size=16)
    assert len(accs) == 3
    assert all(chip.generation(pe) == 3 for pe in model.spare_pes.tolist())
    x = as_input(data.tensors[0])
    outs = []
    with torch.no_grad():
        for program in (True, False, True):
            with chip_mode(model, chip, AdcConfig(8, "full"), program=program):
                outs.append(model.net(x))
    # the same programming computes the same (no read noise here); a switch back changes the cells
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2], atol=1e-3)


# --- device presets and chip instances ---------------------------------------------------------------


def test_presets_cite_every_constant_and_ideal_is_ideal():
    assert {"ideal", "paper", "neurosim-22nm", "mnsim-45nm"} <= set(DEVICES)
    for preset in DEVICES.values():
        assert set(preset.source) == set(preset.constants), preset.name
        assert all(len(note) > 0 for note in preset.source.values())
    assert DEVICES["ideal"].ideal and not DEVICES["paper"].ideal and not DEVICES["mnsim-45nm"].ideal


@pytest.mark.parametrize(("name", "overrides", "words"), [
    ("nope", {}, "unknown preset"),
    ("paper", {"sigma": 0.1}, "unknown constant"),
    ("paper", {"read_sigma": -0.01}, "must be >= 0"),
    ("paper", {"prog_sigma": -0.1}, "prog_sigma"),
    ("paper", {"noise_scale": -1.0}, "must be >= 0"),
    ("paper", {"stuck_low": 1.5}, r"\[0, 1\]"),
    ("paper", {"stuck_high": -0.1}, r"\[0, 1\]"),
    ("paper", {"stuck_low": 0.6, "stuck_high": 0.6}, "<= 1"),
    ("paper", {"read_sigma": "x"}, "expected a number"),
])
def test_bad_device_input_is_one_line(name, overrides, words):
    with pytest.raises(UserError, match=words) as err:
        resolve_device(name, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("adc", "words"), [(AdcConfig(0), "adc_bits"), (AdcConfig(17), "adc_bits"),
                                             (AdcConfig(2.5), "adc_bits"), (AdcConfig(True), "adc_bits"),
                                             (AdcConfig(5, "auto"), "adc_range"), (AdcConfig(5, signed="x"), "signed"),
                                             (AdcConfig(5, clip=101), "percentile"),
                                             (AdcConfig(5, clip=0), "percentile"),
                                             (AdcConfig(5, clip="max"), "percentile"),
                                             (AdcConfig(5, "calibrated"), "adc_range")])
def test_bad_adc_settings_are_one_line(adc, words):
    with pytest.raises(UserError, match=words) as err:
        adc.check()
    assert "\n" not in str(err.value)


def test_override_replaces_a_constant_and_cites_it():
    d = resolve_device("paper", {"prog_sigma": 0.05, "stuck_low": 0.01})
    assert d.prog_sigma == (0.05,) and d.stuck_low == 0.01 and d.source["stuck_low"] == "override"
    assert resolve_device("paper") is DEVICES["paper"]


def test_stuck_at_rates_are_realized_within_binomial_bounds():
    lm = layer_of((64, 64, 3, 3), 1, SPEC)
    device = resolve_device("ideal", {"stuck_low": 0.09, "stuck_high": 0.01})
    targets = target_cells(torch.full(lm.shape, -1), SPEC)  # u = 6 = cells (1, 2): neither 0 nor 3
    cells = ChipInstance(7, device, map_layers([("l", "conv", lm.shape, 1)], SPEC)).layer_cells(lm, targets).levels
    n = cells.numel()
    for level, rate in ((0.0, 0.09), (3.0, 0.01)):
        share = float((cells == level).sum()) / n
        assert abs(share - rate) < 5 * math.sqrt(rate * (1 - rate) / n), (level, share)
    assert float(((cells == 1) | (cells == 2)).float().mean()) == pytest.approx(0.9, abs=0.01)


def test_same_seed_same_chip_and_reprogramming_a_spare_pe_draws_new_error():
    shape = (40, 16, 3, 3)
    mapping = map_layers([("l", "conv", shape, 1)], SPEC)
    lm = mapping.layers[0]
    targets = target_cells(torch.randint(-7, 8, shape, generator=torch.Generator().manual_seed(0)), SPEC)
    device = DEVICES["paper"]
    a = ChipInstance(3, device, mapping).layer_cells(lm, targets).levels
    assert torch.equal(a, ChipInstance(3, device, mapping).layer_cells(lm, targets).levels)
    assert not torch.equal(a, ChipInstance(4, device, mapping).layer_cells(lm, targets).levels)
    pe = lm.index_tensors()[1]
    spare = pe == lm.first_pe  # the task's spare PE stands in for the layer's first PE
    chip = ChipInstance(3, device, mapping)
    chip.program_pe(lm.first_pe)
    first = chip.layer_cells(lm, targets, spare).levels
    assert torch.equal(first, chip.layer_cells(lm, targets, spare).levels)  # reading twice changes nothing
    chip.program_pe(lm.first_pe)  # the chip switched away and back: the spare PE is programmed again
    again = chip.layer_cells(lm, targets, spare).levels
    inside = spare.unsqueeze(0).unsqueeze(-1).expand_as(first)
    assert not torch.equal(first[inside], again[inside])
    assert torch.equal(first[~inside], again[~inside])  # the backbone's cells keep their error
    assert torch.equal(a[~inside], again[~inside])


def test_drift_lowers_conductance_and_compensation_restores_the_scale():
    shape = (16, 8, 3, 3)
    mapping = map_layers([("l", "conv", shape, 1)], SPEC)
    lm = mapping.layers[0]
    targets = target_cells(torch.randint(-7, 8, shape, generator=torch.Generator().manual_seed(1)), SPEC)
    device = resolve_device("ideal", {"drift_nu": 0.05})
    now = ChipInstance(0, device, mapping, time_s=0.0).layer_cells(lm, targets)
    later = ChipInstance(0, device, mapping, time_s=86400.0).layer_cells(lm, targets)
    assert float(later.levels.sum()) < float(now.levels.sum())
    assert later.drift_gain == pytest.approx(86400.0**0.05, rel=1e-4) and now.drift_gain == 1.0


@pytest.mark.parametrize(("args", "words"), [
    (["--adc-bits", "17"], "--adc-bits"), (["--adc-bits", "0"], "--adc-bits"),
    (["--device", "nope"], "unknown preset"), (["--set", "bogus=1"], "unknown constant"),
    (["--set", "read_sigma=-0.1"], "must be >= 0"), (["--set", "stuck_high=1.5"], r"\[0, 1\]"),
    (["--instances", "0"], "below 2"), (["--instances", "1"], "below 2"), (["--time", "-5"], "--time"),
    (["--adc-range", "per_row"], "adc_range"), (["--signed", "twos"], "signed"), (["--adc-clip", "0"], "--adc-clip"),
    (["--adc-clip", "101"], "--adc-clip"), (["--adc-clip", "best"], "--adc-clip"),
    (["--verify-tolerance", "-0.1"], "--verify-tolerance"),
])
def test_xbar_chip_refuses_bad_input_in_one_line(args, words):
    out = CliRunner().invoke(app, ["chip", *args])
    assert out.exit_code == 2
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.output
    assert re.search(words, lines[0])


@pytest.mark.parametrize(("section", "values", "words"), [
    ("crossbar", {"adc_bits": 0}, "adc_bits"), ("crossbar", {"adc_bits": 17}, "adc_bits"),
    ("chip", {"device": "nope"}, "unknown preset"), ("chip", {"overrides": {"sigma": 0.1}}, "unknown constant"),
    ("chip", {"overrides": {"read_sigma": -0.1}}, "must be >= 0"), ("chip", {"instances": 0}, "instances"),
    ("chip", {"overrides": {"stuck_low": 1.5}}, r"\[0, 1\]"), ("energy", {"preset": "nope"}, "unknown preset"),
    ("chip", {"adc_range": "calibrated"}, "adc_range"), ("chip", {"adc_clip": 0}, "adc_clip"),
    ("chip", {"adc_clip": 100.5}, "adc_clip"), ("chip", {"calibration_images": 0}, "calibration_images"),
    ("chip", {"instances": 1}, "instances"), ("crossbar", {"signed": "twos"}, "signed"),
])
def test_xbar_chip_refuses_bad_params_in_one_line(tmp_path, monkeypatch, section, values, words):
    """The same refusals when the bad value comes from params.yaml (before any artifact is read)."""
    import yaml

    from project import tiny_params

    data = tiny_params({"digits": {}})
    data[section] = {**data.get(section, {}), **values}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["chip", "--no-mlflow"])
    assert out.exit_code == 2
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.output
    assert re.search(words, lines[0])


def test_program_and_verify_rewrites_cells_until_within_tolerance_and_counts_the_rewrites():
    shape = (40, 16, 3, 3)
    mapping = map_layers([("l", "conv", shape, 1)], SPEC)
    lm = mapping.layers[0]
    targets = target_cells(torch.randint(-7, 8, shape, generator=torch.Generator().manual_seed(0)), SPEC)
    device = DEVICES["paper"]
    spare = lm.index_tensors()[1] == lm.first_pe
    open_loop = ChipInstance(3, device, mapping)
    open_loop.program_pe(lm.first_pe)
    err = (open_loop.layer_cells(lm, targets, spare).levels - targets).abs()
    assert float(err.max()) > 0.2 and open_loop.verify_writes == 0
    chip = ChipInstance(3, device, mapping, verify=0.05)
    chip.program_pe(lm.first_pe)
    cells = chip.layer_cells(lm, targets, spare).levels
    inside = spare.unsqueeze(0).unsqueeze(-1).expand_as(cells)
    err = (cells - targets).abs()
    first_err = (open_loop.layer_cells(lm, targets, spare).levels - targets).abs() > 0.05 + 1e-6
    # within tolerance but the few that ran out of writes (MAX_VERIFY_WRITES; ~0.77**15 ~ 2% at the worst level)
    assert float((err > 0.05 + 1e-6).float().mean()) < 0.02 < float(first_err.float().mean())
    # the re-writes in the spare PE: at least the cells outside +-0.05 at the first write
    assert chip.verify_writes >= int(first_err[inside].sum()) > 0
    with pytest.raises(UserError, match="verify_tolerance"):
        ChipInstance(0, device, mapping, verify=-1.0)
