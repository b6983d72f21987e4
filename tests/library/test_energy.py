"""The analytic energy model: presets, overrides, inference accounting, typical method figures,
the energy scenarios and the paper's ResNet-50 check, and the `xbar energy` command."""

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from xbar.cli import app
from xbar.crossbar import CrossbarSpec, map_layers, map_model
from xbar.energy.inference import BN_AFFINE_J, COMPONENTS, ColumnUse, inference_energy
from xbar.energy.layer_io import layer_io
from xbar.energy.presets import MAY_BE_ZERO, PRESETS, _sar_cell, _sar_static, energy_preset, resolve_preset
from xbar.energy.reprogramming import write_energy
from xbar.energy.scenarios import SCENARIOS, energy_scenario
from xbar.energy.typical import TYPICAL, change_stats, level_distribution, typical_methods
from xbar.errors import UserError
from xbar.memory import build_named_model

SPEC = CrossbarSpec()


@pytest.fixture(scope="module")
def small():
    """The project's small ResNet (width 16, 3 blocks) on 28x28 images: mapping and layer I/O."""
    model = build_named_model("small_resnet")
    mapping = map_model(model, SPEC)
    return mapping, layer_io(model, [lm.name for lm in mapping.layers], (1, 28, 28))


@pytest.fixture(scope="module")
def resnet50():
    """ResNet-50 (no weights, its classifier excluded as `xbar energy` does): mapping and layer I/O."""
    model = build_named_model("resnet50")
    mapping = map_model(model, SPEC, exclude=("head",))
    return mapping, layer_io(model, [lm.name for lm in mapping.layers], (3, 224, 224))


# --- presets -------------------------------------------------------------------------------------


def test_presets_validate_and_cite_every_constant():
    assert set(PRESETS) == {"paper", "neurosim-22nm", "mnsim-45nm"}
    for preset in PRESETS.values():
        preset.check()
        assert set(preset.source) == set(preset.constants), preset.name  # one note per constant
        assert all(len(note) > 10 for note in preset.source.values())
        assert all(v > 0 for k, v in preset.constants.items() if k not in MAY_BE_ZERO)


# The numbers each preset's sources cite, written out here: a constant that drifts from its source fails.
# (name, constant, value from the cited numbers, words its source note must contain)
G_PAPER = (1 / 100e3 + 1 / 1e6) / 2  # Ron 100 kOhm, on/off 10, four levels evenly spaced in conductance
G_NS = (1 / 6e3 + 1 / 900e3) / 2  # Ron 6 kOhm, Roff 900 kOhm
G_MN = (1 / 30e3 + 1 / 150e3) / 2  # 30 / 150 kOhm
CITED = [
    # NeuroSim's SAR ADC: (a * bits + b) uW for (bits + 1) ns; its column current c / R_col for as long
    ("paper", "adc_j", (1.1294 * 5 + 8.8998) * 1e-6 * 6e-9, ("SarADC", "5 bits")),
    ("paper", "cell_read_j", 0.079449 * G_PAPER * 6e-9, ("0.079449", "100 kOhm", "on/off 10")),
    ("paper", "write_pulse_j", 4.0**2 * G_PAPER * 50e-9, ("4 V", "50 ns")),  # Vw^2 G t: 4.4 pJ
    ("paper", "pulses_per_level", 32 / 3, ("32 pulses", "3 level steps")),
    ("neurosim-22nm", "adc_j", (0.538 * 5 + 4.3753) * 1e-6 * 6e-9, ("22 nm", "levelOutput 32")),
    ("neurosim-22nm", "cell_read_j", 0.072341 * G_NS * 6e-9, ("0.072341", "Ron 6 kOhm")),
    ("neurosim-22nm", "write_pulse_j", 2.0**2 * G_NS * 10e-9, ("2 V", "10 ns")),
    ("neurosim-22nm", "pulses_per_level", 64 / 3, ("64", "3 level steps")),
    # MNSIM: ADC_Choice 4 is 1.26 mW for (6 + 2) ns; read Vr^2 G t; write ((0 + Vw) / 2)^2 / sqrt(R_HRS R_LRS) t
    ("mnsim-45nm", "adc_j", 1.26e-3 * 8e-9, ("1.26 mW", "6-bit")),
    ("mnsim-45nm", "cell_read_j", 0.5**2 * G_MN * 3.16e-9, ("0.5 V", "3.16 ns")),
    ("mnsim-45nm", "write_pulse_j", 1.5**2 / math.sqrt(30e3 * 150e3) * 10e-9, ("3 V", "10 ns")),
]


@pytest.mark.parametrize(("preset", "constant", "value", "words"), CITED,
                         ids=[f"{p}-{c}" for p, c, _, _ in CITED])
def test_preset_constants_follow_from_their_cited_numbers(preset, constant, value, words):
    p = PRESETS[preset]
    assert getattr(p, constant) == pytest.approx(value, rel=1e-9)
    for word in words:
        assert word in p.source[constant], (preset, constant, word)


def test_preset_magnitudes_match_the_documented_table():
    """docs/energy.md's table, in the units it prints: the figures a reader checks against the simulators."""
    paper, ns, mn = PRESETS["paper"], PRESETS["neurosim-22nm"], PRESETS["mnsim-45nm"]
    assert paper.adc_j == pytest.approx(87.3e-15, rel=1e-3) and paper.cell_read_j == pytest.approx(2.62e-15, rel=2e-3)
    assert paper.write_pulse_j == pytest.approx(4.4e-12, rel=1e-9)
    assert ns.write_pulse_j == pytest.approx(3.36e-12, rel=2e-3) and ns.adc_j == pytest.approx(42.4e-15, rel=2e-3)
    assert mn.adc_j == pytest.approx(10.08e-12, rel=1e-9) and mn.write_pulse_j == pytest.approx(0.335e-12, rel=2e-3)


def test_overrides_replace_constants_and_bad_input_is_one_line():
    p = resolve_preset("paper", {"adc_j": 1e-12, "verify_reads_per_pulse": 2})
    assert p.adc_j == 1e-12 and p.cell_read_j == PRESETS["paper"].cell_read_j
    assert p.source["adc_j"].startswith("override")
    assert p.write_j_per_pulse() == pytest.approx(p.write_pulse_j + 2 * p.verify_read_j)
    assert resolve_preset("paper") is PRESETS["paper"]
    for name, overrides, words in [("nope", {}, "unknown preset"), ("paper", {"adc": 1.0}, "unknown constant"),
                                   ("paper", {"adc_j": 0.0}, "must be > 0"),
                                   ("paper", {"write_pulse_j": -1e-12}, "> 0"),
                                   ("paper", {"verify_reads_per_pulse": -1}, "> 0"),
                                   ("paper", {"input_activity": 1.5}, "<= 1")]:
        with pytest.raises(UserError, match=words) as err:
            resolve_preset(name, overrides)
        assert "\n" not in str(err.value)


def test_params_overrides_reach_the_preset():
    from xbar.params import parse_params

    params = parse_params({"source": {"dataset": "optdigits"}, "energy": {"preset": "mnsim-45nm",
                                                                          "overrides": {"adc_j": 2e-12}}})
    p = resolve_preset(params.energy.preset, params.energy.overrides)
    assert p.name == "mnsim-45nm" and p.adc_j == 2e-12
    with pytest.raises(UserError):  # pydantic refuses a zero override in params.yaml already
        parse_params({"source": {"dataset": "optdigits"}, "energy": {"overrides": {"adc_j": 0}}})


# --- one ADC setting -------------------------------------------------------------------------------


def test_the_adc_is_booked_at_crossbar_adc_bits():
    paper = PRESETS["paper"]
    assert paper.adc_bits == 5 and paper.at_adc_bits(5) is paper  # the default books what it did
    six = paper.at_adc_bits(6)
    # NeuroSim's SAR formulas evaluated at 6 bits directly (the preset's source), not a rescaled guess
    g = paper.cell_read_j / _sar_cell(5, 0.079449, 1.0)
    assert six.adc_j == pytest.approx(_sar_static(6, 1.1294, 8.8998), rel=1e-9)
    assert six.cell_read_j == pytest.approx(_sar_cell(6, 0.079449, g), rel=1e-9)
    assert six.verify_read_j == pytest.approx(six.adc_j + six.cell_read_j, rel=1e-9)
    assert six.adc_bits == 6 and "booked at 6 bits" in six.source["adc_j"]
    assert six.at_adc_bits(5).adc_j == pytest.approx(paper.adc_j)
    mnsim = PRESETS["mnsim-45nm"]  # MNSIM: power per part, latency (bits + 2) / f, its cell read apart
    assert mnsim.at_adc_bits(4).adc_j == pytest.approx(mnsim.adc_j * 6 / 8)
    assert mnsim.at_adc_bits(4).cell_read_j == mnsim.cell_read_j
    for preset in PRESETS.values():
        adc = [preset.at_adc_bits(b).adc_j for b in range(1, 17)]
        assert all(a < b for a, b in zip(adc, adc[1:])), preset.name


def test_params_adc_bits_reach_the_energy_model_and_the_default_is_unchanged():
    from xbar.params import parse_params

    base = {"source": {"dataset": "optdigits"}}
    assert energy_preset(parse_params(base)) is PRESETS["paper"]
    four = energy_preset(parse_params({**base, "crossbar": {"adc_bits": 4}}))
    assert four.adc_j == pytest.approx(_sar_static(4, 1.1294, 8.8998))
    # an override is the value as given, at the chip's ADC
    over = energy_preset(parse_params({**base, "crossbar": {"adc_bits": 4}, "energy": {"overrides": {"adc_j": 1e-13}}}))
    assert over.adc_j == 1e-13 and over.adc_bits == 4
    with pytest.raises(UserError, match="crossbar.adc_bits") as err:
        resolve_preset("paper", {"adc_bits": 6})
    assert "\n" not in str(err.value)


def test_one_name_selects_the_energy_preset_and_the_device_model():
    from xbar.chip.devices import DEVICES
    from xbar.chip.evaluate import chip_settings
    from xbar.params import parse_params

    assert set(PRESETS) <= set(DEVICES)  # every energy technology has its device model
    for name in PRESETS:
        params = parse_params({"source": {"dataset": "optdigits"}, "energy": {"preset": name}})
        device, adc = chip_settings(params)
        assert device is DEVICES[name] and energy_preset(params).name == name and adc.bits == 5
    params = parse_params({"source": {"dataset": "optdigits"}, "energy": {"preset": "mnsim-45nm"},
                           "chip": {"device": "ideal"}})
    assert chip_settings(params)[0] is DEVICES["ideal"]  # chip.device, when given, wins


def test_inference_energy_follows_adc_bits(small):
    mapping, io = small
    e = {b: inference_energy(mapping, io, PRESETS["paper"].at_adc_bits(b), 4).breakdown() for b in (4, 5, 8)}
    assert e[4]["adc_j"] < e[5]["adc_j"] < e[8]["adc_j"]
    assert e[4]["shift_add_j"] == e[8]["shift_add_j"]  # one conversion per column and cycle at any precision


# --- inference ------------------------------------------------------------------------------------


def test_output_positions_from_a_dummy_image(small):
    mapping, io = small
    assert io["stem.0"].positions == 14 * 14  # stride-2 stem on 28x28
    assert io["stem.0"].in_elems == 28 * 28 and io["stem.0"].out_elems == 16 * 14 * 14
    assert io["layers.8.conv2"].positions == 4 * 4  # two more stride-2 stages: 14 -> 7 -> 4
    lin = map_layers([("fc", "linear", (10, 64), 1)], SPEC)
    net = torch.nn.Sequential()
    net.add_module("fc", torch.nn.Linear(64, 10))
    assert layer_io(net, ["fc"], (64,))["fc"].positions == 1
    assert lin.layers[0].n_crossbars == 1


def test_energy_of_one_layer_by_hand():
    # 3x3 conv 8 -> 36 on 72x72: one crossbar, 72 rows, 36 outputs = 72 physical columns, 5184 cells
    mapping = map_layers([("conv", "conv", (36, 8, 3, 3), 1)], SPEC)
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(8, 36, 3, padding=1, bias=False))
    io = layer_io(net, ["conv"], (8, 10, 10))
    p = PRESETS["paper"]
    e = inference_energy(mapping, io, p, act_bits=4)
    row = e.crossbars.row(0, named=True)
    assert row["cells_j"] == pytest.approx(100 * 4 * p.input_activity * 5184 * p.cell_read_j)
    assert row["adc_j"] == pytest.approx(100 * 4 * 72 * p.adc_j)
    assert row["shift_add_j"] == pytest.approx(100 * 4 * 72 * p.shift_add_j)
    assert row["mask_j"] == 0
    psum = 4 + 4 + math.ceil(math.log2(72))
    assert row["interconnect_j"] == pytest.approx(100 * (72 * 4 + 36 * psum) * p.interconnect_j_per_bit)
    assert e.layers["buffer_j"][0] == pytest.approx((800 + 3600) * 4 * p.buffer_j_per_bit)


def test_per_layer_and_per_pe_energies_add_up(small):
    mapping, io = small
    e = inference_energy(mapping, io, PRESETS["neurosim-22nm"], act_bits=4)
    total = e.per_image_j
    assert total > 0
    assert e.layers.height == len(mapping.layers) and e.pes.height == mapping.n_pes
    assert float(e.crossbars["total_j"].sum()) + float(e.layers["buffer_j"].sum()) == pytest.approx(total)
    assert float(e.pes["total_j"].sum()) == pytest.approx(float(e.crossbars["total_j"].sum()))
    assert sum(e.breakdown().values()) == pytest.approx(total)
    for comp in COMPONENTS:
        assert float(e.layers[comp].sum()) == pytest.approx(float(e.pes[comp].sum()))


def test_per_task_bn_pays_one_affine_per_conv_output(small):
    """bn: per_task adds the task's own per-channel affine (one multiply-add per conv output activation);
    frozen BN is the backbone's, folded into its deployment: no extra energy."""
    mapping, io = small
    frozen = inference_energy(mapping, io, PRESETS["paper"], act_bits=4)
    own = inference_energy(mapping, io, PRESETS["paper"], act_bits=4, bn_affine=True)
    outputs = sum(io[lm.name].out_elems for lm in mapping.layers if lm.kind == "conv")
    assert outputs > 0 and float(frozen.layers["bn_j"].sum()) == 0
    assert own.per_image_j - frozen.per_image_j == pytest.approx(outputs * 4.6e-12)  # fp32 mul + add, 45 nm
    assert own.breakdown()["bn_j"] == pytest.approx(outputs * BN_AFFINE_J)


def test_columns_switched_off_save_energy_and_masks_cost_reads(small):
    mapping, io = small
    p = PRESETS["paper"]
    plain = inference_energy(mapping, io, p, 4)
    on = {lm.name: ColumnUse(torch.ones(lm.n_columns, dtype=torch.bool), torch.ones(lm.n_columns, dtype=torch.bool))
          for lm in mapping.layers}
    masked = inference_energy(mapping, io, p, 4, on, mask_bits=3)
    assert masked.breakdown()["mask_j"] > 0
    assert masked.per_image_j - plain.per_image_j == pytest.approx(masked.breakdown()["mask_j"])
    half = {n: ColumnUse(torch.arange(len(c.active)) % 2 == 0, c.masked) for n, c in on.items()}
    off = inference_energy(mapping, io, p, 4, half, mask_bits=3)
    assert off.breakdown()["adc_j"] < 0.6 * plain.breakdown()["adc_j"]
    assert off.breakdown()["cells_j"] < 0.6 * plain.breakdown()["cells_j"]
    # every column sits in one crossbar and the columns' weights are the crossbar's weights
    for lm in mapping.layers:
        xb, weights = lm.placement.column_crossbar.long(), lm.placement.column_weights.long()
        per = torch.zeros(lm.n_crossbars, dtype=torch.int64).index_add(0, xb, weights)
        assert per.tolist() == [x["weights"] for x in lm.crossbars]


# --- re-programming ------------------------------------------------------------------------------


def test_write_energy_and_expected_changes():
    p = resolve_preset("paper", {"verify_reads_per_pulse": 1})
    assert write_energy(10, p) == pytest.approx(10 * (p.write_pulse_j + p.verify_read_j))
    # all weights at level 0 (cells 1, 3): nothing changes for Piggyback, a blank cell needs 1 + 3 steps
    point = torch.zeros(15, dtype=torch.float64)
    point[7] = 1
    s = change_stats(SPEC, point)
    assert s["to_zero"].steps == 0 and s["redraw"].steps == 0
    assert s["from_blank"].steps == 4 and s["from_blank"].cells == 2
    # +-1 nudges around 0: -1 = (1, 2) is one step away, +1 = (2, 0) four; two versions differ in both ways
    nudged = change_stats(SPEC, point, spare_change_share=1.0)["same_pe"]
    assert nudged.steps == pytest.approx(0.5 * 3)  # P(versions differ) = 1/2, then |(1,2) - (2,0)| = 1 + 2
    p_lvl = level_distribution(SPEC, math.sqrt(7) / 2)
    assert float(p_lvl.sum()) == pytest.approx(1)
    assert float((p_lvl * torch.arange(-7, 8).abs()).sum()) == pytest.approx(1.3229, abs=1e-3)


def test_typical_methods_shape_and_mask_methods_write_nothing(small):
    mapping, io = small
    r = typical_methods(mapping, io, PRESETS["paper"], spare_ratio=0.2, inferences=3)
    assert list(r["methods"]) == ["finetune_separate", "piggyback", "xbm", "xma", "xma2"]
    for m in r["methods"].values():
        assert m["total_j"] == pytest.approx(m["inference_j"] + m["reprogram_j"])
        assert m["inference_j"] == pytest.approx(3 * m["inference_per_image_j"])
    assert r["methods"]["xbm"]["reprogram_j"] == r["methods"]["xma"]["reprogram_j"] == 0
    assert r["methods"]["xbm"]["cells_written"] == 0
    assert r["assumptions"]["spare_pes"] == math.ceil(0.2 * mapping.n_pes)
    more = typical_methods(mapping, io, PRESETS["paper"], spare_ratio=0.4)
    assert more["methods"]["xma2"]["reprogram_j"] > r["methods"]["xma2"]["reprogram_j"]
    with pytest.raises(UserError):
        typical_methods(mapping, io, PRESETS["paper"], inferences=0)


# --- energy scenarios and the paper's check ---------------------------------------------------------


PAPER_FINETUNE, PAPER_PIGGYBACK = 13.72, 4.38  # XMA2 paper, section 5.2: total energy, method / XMA2
PAPER_PIGGYBACK_TOTAL = 8.16  # "reprogramming the element-wise sparsity elevates the total energy up to 8.16x"


def laplace_levels(mean_abs: float, top: int = 7) -> dict[int, float]:
    """P(weight level) over [-top, top]: a discrete Laplace with E|level| = mean_abs, solved here on its own."""
    from scipy.optimize import brentq

    def probs(b: float) -> dict[int, float]:
        raw = {w: math.exp(-abs(w) / b) for w in range(-top, top + 1)}
        return {w: v / sum(raw.values()) for w, v in raw.items()}

    b = brentq(lambda b: sum(abs(w) * q for w, q in probs(b).items()) - mean_abs, 0.05, 100)
    return probs(b)


def cells(level: int) -> tuple[int, int]:
    """A 4-bit weight level on two 2-bit cells, offset code: level + 7 = 4 * high + low."""
    return divmod(level + 7, 4)


def steps(a: tuple[int, int], b: tuple[int, int]) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def test_scenarios_are_documented_and_unknown_ones_are_one_line():
    assert list(SCENARIOS) == ["steady", "first-task", "paper", "paper-round-trip"]
    for scenario in SCENARIOS.values():
        assert scenario.assumptions and all(len(a) > 10 and len(why) > 10 for a, why in scenario.assumptions)
    # the paper's assumptions each rest on a sentence of the paper, quoted
    assert all("'" in why for _, why in SCENARIOS["paper"].assumptions)
    with pytest.raises(UserError, match="--scenario: unknown energy scenario 'nope' .*steady, first-task, paper, "
                       "paper-round-trip") \
            as err:
        energy_scenario("nope", what="--scenario")
    assert "\n" not in str(err.value)


def test_steady_scenario_is_the_default_and_scenarios_change_only_writes(small):
    mapping, io = small
    default = typical_methods(mapping, io, PRESETS["paper"])
    steady = typical_methods(mapping, io, PRESETS["paper"], scenario=SCENARIOS["steady"])
    paper = typical_methods(mapping, io, PRESETS["paper"], scenario=SCENARIOS["paper"])
    assert default["methods"] == steady["methods"] and default["scenario"] == "steady"
    assert paper["scenario"] == "paper" and paper["ratios"] == paper["assumptions"]["ratios"]
    for name, m in paper["methods"].items():  # the same inference; XBM / XMA write nothing in any scenario
        assert m["inference_j"] == steady["methods"][name]["inference_j"]
    assert paper["methods"]["xma"]["reprogram_j"] == steady["methods"]["xma"]["reprogram_j"] == 0
    # the first task (blank spare PEs) is the first-task scenario's table
    first = typical_methods(mapping, io, PRESETS["paper"], scenario=SCENARIOS["first-task"])
    assert steady["assumptions"]["first_task"]["ratios"] == first["ratios"]


def test_paper_scenario_resnet50(resnet50):
    """The XMA2 paper (section 5.2): XMA2's total energy (inference + re-programming, one image) is 13.72x
    below fine-tuning and 4.38x below Piggyback. Under the `paper` scenario (docs/energy.md), fine-tune /
    XMA2 lies within 25% of 13.72x; Piggyback / XMA2 does not reach 4.38x - 25%, and the reason is the one
    docs/energy.md gives: Piggyback's writes, set by its masked share (not in the paper), dominate its total,
    and the paper's own fine-tune / Piggyback ratio needs a larger share, at which 4.38x is met.

    Each method's writes are recomputed here from the offset code and an independently solved level
    distribution (not from xbar.energy.typical)."""
    mapping, io = resnet50
    preset, paper = PRESETS["paper"], SCENARIOS["paper"]
    result = typical_methods(mapping, io, preset, spare_ratio=0.1, scenario=paper)
    m, a = result["methods"], result["assumptions"]
    conv_weights = sum(mod.weight.numel() for mod in build_named_model("resnet50").modules()
                       if isinstance(mod, torch.nn.Conv2d))
    assert a["weights"] == conv_weights and a["spare_pes"] == math.ceil(0.1 * a["pes"])

    # writes, independently: joules per level step, and the expected steps per weight of each transition
    p = laplace_levels(math.sqrt(7) / 2)  # LSQ's initial step: E|level| = sqrt(L) / 2
    joule = preset.pulses_per_level * preset.write_pulse_j
    redeploy = sum(q * steps((0, 0), cells(w)) for w, q in p.items())  # from the blank cells
    to_zero = sum(q * steps(cells(w), cells(0)) for w, q in p.items())
    moved = TYPICAL.spare_change_share  # weights the task's training moves by one level, clipped at +-7
    trained = sum(q * moved / 2 * (steps(cells(w), cells(max(w - 1, -7))) + steps(cells(w), cells(min(w + 1, 7))))
                  for w, q in p.items())
    masked = TYPICAL.piggyback_masked_share
    assert m["finetune_separate"]["reprogram_j"] == pytest.approx(conv_weights * redeploy * joule, rel=1e-6)
    assert m["piggyback"]["reprogram_j"] == pytest.approx(conv_weights * masked * to_zero * joule, rel=1e-6)
    assert m["xma2"]["reprogram_j"] == pytest.approx(a["spare_pe_weights"] * trained * joule, rel=1e-6)
    assert m["xbm"]["reprogram_j"] == m["xma"]["reprogram_j"] == 0 and m["xbm"]["cells_written"] == 0

    # the goal: fine-tune / XMA2 within 25% of the paper's
    r = result["ratios"]
    assert r["finetune_over_xma2"] == pytest.approx(PAPER_FINETUNE, rel=0.25)

    # Piggyback / XMA2: the documented reason. Its writes dominate its total ...
    pig, x2 = m["piggyback"], m["xma2"]
    assert pig["reprogram_j"] / pig["total_j"] > 0.75
    # ... and the paper's own fine-tune / Piggyback ratio (no XMA2 in it) puts Piggyback's total, with our
    # fine-tune, at more than 1.5x ours: a masked share the paper does not state, larger than ours ...
    paper_pig_total = m["finetune_separate"]["total_j"] / (PAPER_FINETUNE / PAPER_PIGGYBACK)
    share = masked * (paper_pig_total - pig["inference_j"]) / pig["reprogram_j"]
    assert paper_pig_total > 1.5 * pig["total_j"] and share > 1.5 * masked
    # ... which its "up to 8.16x" bounds from above, and at which Piggyback / XMA2 meets 4.38x within 25%
    assert paper_pig_total / pig["inference_j"] < PAPER_PIGGYBACK_TOTAL
    at_share = typical_methods(mapping, io, preset, spare_ratio=0.1, scenario=paper,
                               typical=replace(TYPICAL, piggyback_masked_share=share))
    assert at_share["methods"]["piggyback"]["total_j"] == pytest.approx(paper_pig_total, rel=1e-6)  # writes ~ share
    assert at_share["ratios"]["piggyback_over_xma2"] == pytest.approx(PAPER_PIGGYBACK, rel=0.25)
    assert at_share["methods"]["xma2"]["total_j"] == x2["total_j"]


def test_steady_scenario_resnet50(resnet50):
    """Steady state: every method's writes are no more than the paper scenario's re-deployment (fine-tune)
    and many inferences per task amortize the writes: every total converges to inference."""
    mapping, io = resnet50
    steady = typical_methods(mapping, io, PRESETS["paper"], spare_ratio=0.1)["methods"]
    paper = typical_methods(mapping, io, PRESETS["paper"], spare_ratio=0.1, scenario=SCENARIOS["paper"])["methods"]
    assert steady["xbm"]["reprogram_j"] == steady["xma"]["reprogram_j"] == 0
    assert steady["finetune_separate"]["reprogram_j"] < paper["finetune_separate"]["reprogram_j"]
    many = typical_methods(mapping, io, PRESETS["paper"], spare_ratio=0.1, inferences=10_000)["methods"]
    assert many["finetune_separate"]["total_j"] / many["xma2"]["total_j"] < 1.01


# --- the command -------------------------------------------------------------------------------------


def test_cli_json_shape():
    out = CliRunner().invoke(app, ["energy", "--model", "small_resnet", "--preset", "neurosim-22nm",
                                   "--spare-ratio", "0.2", "--inferences", "5", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert set(data) == {"scenario", "ratios", "methods", "assumptions"} and data["scenario"] == "steady"
    assert set(data["methods"]) == {"finetune_separate", "piggyback", "xbm", "xma", "xma2"}
    for m in data["methods"].values():
        assert {"inference_j", "reprogram_j", "total_j", "cells_written"} <= set(m)
    assert data["assumptions"]["preset"] == "neurosim-22nm" and data["assumptions"]["inferences"] == 5
    table = CliRunner().invoke(app, ["energy", "--model", "small_resnet", "--preset", "paper"])
    assert table.exit_code == 0 and "xma2" in table.stdout and "scenario steady" in table.stdout
    paper = CliRunner().invoke(app, ["energy", "--model", "small_resnet", "--preset", "paper", "--scenario", "paper",
                                     "--json"])
    assert paper.exit_code == 0, paper.output
    data = json.loads(paper.stdout)
    m = data["methods"]
    assert data["scenario"] == "paper" and data["assumptions"]["scenario"] == "paper"
    x2 = m["xma2"]["total_j"]
    assert data["ratios"]["finetune_over_xma2"] == pytest.approx(m["finetune_separate"]["total_j"] / x2)
    assert data["ratios"]["piggyback_over_xma2"] == pytest.approx(m["piggyback"]["total_j"] / x2)


@pytest.mark.parametrize("args", [["--model", "small_resnet", "--preset", "nope"],
                                  ["--model", "no_such_net", "--preset", "paper"],
                                  ["--model", "small_resnet", "--preset", "paper", "--spare-ratio", "1.5"],
                                  ["--model", "small_resnet", "--preset", "paper", "--inferences", "0"],
                                  ["--model", "small_resnet", "--preset", "paper", "--adc-bits", "17"],
                                  ["--model", "small_resnet", "--preset", "paper", "--adc-bits", "0"],
                                  ["--model", "small_resnet", "--preset", "paper", "--scenario", "nope"],
                                  ["--model", "small_resnet", "--preset", "paper", "--signed", "twos"]])
def test_cli_bad_input_exits_2_with_one_line(args):
    out = CliRunner().invoke(app, ["energy", *args])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1


@pytest.mark.parametrize("signed", ["offset", "offset_ref", "differential"])
def test_signed_schemes_book_their_cells_crossbars_and_conversions_by_hand(signed):
    """3x3 conv 8 -> 36 on 72x72. offset: 2 cells and 2 conversions per output, 36 outputs per crossbar;
    offset_ref: the same plus 2 reference columns (70 columns: 35 outputs, 2 crossbars); differential: 4
    cells per weight (18 outputs per crossbar: 2 crossbars) but 2 conversions per output (a pair is one)."""
    spec = CrossbarSpec(signed=signed)
    mapping = map_layers([("conv", "conv", (36, 8, 3, 3), 1)], spec)
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(8, 36, 3, padding=1, bias=False))
    io = layer_io(net, ["conv"], (8, 10, 10))
    p = PRESETS["paper"]
    e = inference_energy(mapping, io, p, act_bits=4).crossbars
    xbars, cells, refs = {"offset": (1, 2, 0), "offset_ref": (2, 2, 2), "differential": (2, 4, 0)}[signed]
    assert mapping.n_crossbars == xbars and mapping.n_cells_used == 36 * 72 * cells
    conversions = 100 * 4 * (36 * 2 + xbars * refs)
    assert float(e["adc_j"].sum()) == pytest.approx(conversions * p.adc_j)
    read_cells = 72 * (36 * cells + xbars * refs)
    assert float(e["cells_j"].sum()) == pytest.approx(100 * 4 * p.input_activity * read_cells * p.cell_read_j)


def test_paper_round_trip_scenario_doubles_shared_backbone_writes_and_meets_the_papers_ratios(resnet50):
    """`paper-round-trip`: Piggyback and XMA2 write the deployed state back after the task (ours, docs/energy.md):
    their re-programming doubles against `paper`, fine-tuning's stays; then all three of the paper's ratios
    lie within 25%."""
    mapping, io = resnet50
    preset = PRESETS["paper"]
    one = typical_methods(mapping, io, preset, spare_ratio=0.1, scenario=SCENARIOS["paper"])["methods"]
    trip = typical_methods(mapping, io, preset, spare_ratio=0.1, scenario=SCENARIOS["paper-round-trip"])
    m = trip["methods"]
    for name in ("piggyback", "xma2"):
        assert m[name]["reprogram_j"] == pytest.approx(2 * one[name]["reprogram_j"], rel=1e-9)
    assert m["finetune_separate"]["reprogram_j"] == one["finetune_separate"]["reprogram_j"]
    r = trip["ratios"]
    assert r["finetune_over_xma2"] == pytest.approx(PAPER_FINETUNE, rel=0.25)
    assert r["piggyback_over_xma2"] == pytest.approx(PAPER_PIGGYBACK, rel=0.25)
    assert r["piggyback_total_over_inference"] == pytest.approx(PAPER_PIGGYBACK_TOTAL, rel=0.25)
