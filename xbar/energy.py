"""Analytic, NeuroSim-style energy model of the crossbar accelerator.

**Inference** (per image). A layer's crossbars are used once per output
position (H_out * W_out for a conv, 1 for a linear layer), with the input
applied bit-serially over `act_bits` cycles. Per crossbar and image:

* cell reads      = positions * act_bits * input_activity * active cells   (x cell_read_j)
* ADC conversions = positions * act_bits * active physical columns          (x adc_j)
* shift-add       = one per ADC conversion                                   (x shift_add_j)
* mask buffer     = positions * masked columns * mask bits                   (x mask_read_j_per_bit)
* interconnect    = positions * (rows_used * act_bits / crossbars sharing the row tile's input
                    + columns * psum_bits)                                   (x interconnect_j_per_bit)

and per layer: the input and output feature maps through the buffer
(`buffer_j_per_bit`). A column whose mask is 0 is switched off (XBM's "off"
column): its cells and its ADC do nothing. A spare PE's columns carry no mask.

**Re-programming** (per cell). Write-and-step programming moves a cell one
level per `pulses_per_level` pulses, so a cell going from level a to b costs
|a - b| * pulses_per_level pulses of `write_pulse_j`, plus
`verify_reads_per_pulse` verify reads of `verify_read_j` each. A cell already
at its target level costs nothing (xbar.deployment only writes cells that
change).

Constants live in named presets (`PRESETS`), each constant with its source;
`resolve_preset(name, overrides)` applies `energy.overrides` from params.yaml.
`typical_methods` estimates all five methods on an architecture alone (the
`xbar energy` command), from documented typical cell changes (TYPICAL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import polars as pl
import torch
from torch import nn

from xbar.crossbar import CrossbarSpec, LayerMap, Mapping
from xbar.errors import UserError

# --- presets ----------------------------------------------------------------------------

NEUROSIM_V13 = "DNN+NeuroSim V1.3 Param.cpp (github.com/neurosim/DNN_NeuroSim_V1.3)"
NEUROSIM_V21 = "DNN+NeuroSim V2.1 Param.cpp (github.com/neurosim/DNN_NeuroSim_V2.1)"
NEUROSIM_ADC = "NeuroSim SarADC.cpp: E = P(bits, R_col) * (bits + 1) ns"
MNSIM = "MNSIM 2.0 SimConfig.ini / Hardware_Model (github.com/thu-nics/MNSIM-2.0)"


@dataclass(frozen=True)
class EnergyPreset:
    """Energy constants of one technology (joules, counts, shares). Every constant is > 0,
    except `verify_reads_per_pulse`, which may be 0 (open-loop programming, no verify)."""

    name: str
    description: str
    cell_read_j: float  # one cell conducting during one input bit cycle
    adc_j: float  # one ADC conversion of one physical column
    shift_add_j: float  # one shift-add of one ADC output
    mask_read_j_per_bit: float  # mask buffer read, per bit
    buffer_j_per_bit: float  # activation buffer access, per bit
    interconnect_j_per_bit: float  # bus / H-tree transfer, per bit
    write_pulse_j: float  # one programming pulse on one cell (cell + line charging)
    pulses_per_level: float  # pulses to move a cell by one level
    verify_read_j: float  # one verify read of a cell (cell read + conversion)
    verify_reads_per_pulse: float  # 0: open-loop identical pulses
    input_activity: float  # share of input bit cycles that drive a row (bit = 1)
    sources: tuple[tuple[str, str], ...] = ()  # (constant, where its value comes from)

    @property
    def constants(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "description", "sources")}

    @property
    def source(self) -> dict[str, str]:
        return dict(self.sources)

    def write_j_per_pulse(self) -> float:
        """Energy of one programming pulse including its share of verify reads."""
        return self.write_pulse_j + self.verify_reads_per_pulse * self.verify_read_j

    def check(self) -> "EnergyPreset":
        for key, value in self.constants.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"energy.{key}: expected a number, got {value!r}")
            if key == "verify_reads_per_pulse" and value == 0:
                continue
            if value <= 0:
                raise UserError(f"energy.{key}: must be > 0, got {value!r}")
        if self.input_activity > 1:
            raise UserError(f"energy.input_activity: a share of input cycles, must be <= 1, "
                            f"got {self.input_activity!r}")
        return self


def _mean_g(r_on: float, r_off: float) -> float:
    """Mean conductance of 2-bit cells with levels equally spaced in conductance, all levels equally used."""
    return (1 / r_on + 1 / r_off) / 2


# NeuroSim's SAR ADC (SarADC.cpp, LP devices) draws P = (a * bits + b) uW + c * R_col^(-~1) W for
# (bits + 1) ns per conversion. The second term is the column current through the conducting cells
# (1/R_col = their summed conductance), so we book it per conducting cell -- c * G * (bits + 1) ns --
# as `cell_read_j`, and the first term as `adc_j`. (NeuroSim's 1T1R array itself only adds line
# charging; adding V^2 G t on top would count the cell current twice.)
def _sar_static(bits: int, a: float, b: float) -> float:
    return (a * bits + b) * 1e-6 * (bits + 1) * 1e-9


def _sar_cell(bits: int, c: float, g: float) -> float:
    return c * g * (bits + 1) * 1e-9


# paper: 32 nm, the TaOx/HfOx (HfO2-based) analog RRAM of Wu et al. VLSI 2018, 2 bits per cell,
# one 5-bit SAR ADC per column, 72x72 crossbars (XMA2 paper section 5.2). Its Table 4 is an image
# we do not have, so the device and circuit numbers come from NeuroSim's model of that device.
_G_PAPER = _mean_g(100e3, 1e6)  # Ron 100 kOhm, on/off 10 (DNN+NeuroSim V2.1; Peng et al. IEDM 2019, Table 1)
PAPER = EnergyPreset(
    name="paper",
    description="XMA2 paper setup: 32 nm, TaOx/HfOx 1T1R 2-bit cell (Wu et al. 2018), 5-bit SAR ADC per column",
    cell_read_j=_sar_cell(5, 0.079449, _G_PAPER),
    adc_j=_sar_static(5, 1.1294, 8.8998),
    shift_add_j=30e-15,
    mask_read_j_per_bit=5e-15,
    buffer_j_per_bit=50e-15,
    interconnect_j_per_bit=50e-15,
    write_pulse_j=4.0**2 * _G_PAPER * 50e-9,
    pulses_per_level=32 / 3,
    verify_read_j=_sar_cell(5, 0.079449, _G_PAPER) + _sar_static(5, 1.1294, 8.8998),
    verify_reads_per_pulse=0.0,
    input_activity=0.5,
    sources=(
        ("cell_read_j", f"column-current term of {NEUROSIM_ADC} (32 nm LP: 0.079449 / R_col W) per conducting "
                        "cell of mean conductance G: Ron 100 kOhm, on/off 10 (TaOx/HfOx, Wu et al. VLSI 2018; "
                        f"{NEUROSIM_V21}; Peng et al. IEDM 2019 Table 1), 4 levels evenly spaced in G"),
        ("adc_j", f"static term of {NEUROSIM_ADC}, 32 nm LP, 5 bits (paper: one 5-bit SAR ADC per column)"),
        ("shift_add_j", "estimate: ~12-bit add + register at 32 nm (NeuroSim's shift-add = adders + DFFs)"),
        ("mask_read_j_per_bit", "estimate: register-file read at 32 nm"),
        ("buffer_j_per_bit", "estimate: SRAM global buffer access at 32 nm (the buffer holds the largest feature map)"),
        ("interconnect_j_per_bit", "estimate: ~0.25 mm of wire at 0.2 fF/um and 1 V per bit moved "
                                   "(an H-tree hop inside a tile)"),
        ("write_pulse_j", f"Vw^2 * G * t per pulse (NeuroSim write energy): Vw 4 V, t 50 ns ({NEUROSIM_V21})"),
        ("pulses_per_level", f"maxNumLevelLTP = 32 pulses over the full conductance range ({NEUROSIM_V21}); "
                             "a 2-bit cell spans it in 3 level steps"),
        ("verify_read_j", "derived: one cell read + one ADC conversion"),
        ("verify_reads_per_pulse", "0: NeuroSim programs with identical open-loop pulses"),
        ("input_activity", "50% of input bits are 1: NeuroSim's default activity (Peng et al. IEDM 2019, sec. IV)"),
    ),
)

_G_NS = _mean_g(6e3, 6e3 * 150)  # DNN+NeuroSim V1.3 default RRAM: Ron 6 kOhm, Roff 900 kOhm
NEUROSIM_22NM = EnergyPreset(
    name="neurosim-22nm",
    description="DNN+NeuroSim V1.3 defaults: 22 nm, RRAM Ron 6 kOhm / Roff 900 kOhm, 2-bit cell, 5-bit ADC",
    cell_read_j=_sar_cell(5, 0.072341, _G_NS),
    adc_j=_sar_static(5, 0.538, 4.3753),
    shift_add_j=20e-15,
    mask_read_j_per_bit=3.5e-15,
    buffer_j_per_bit=35e-15,
    interconnect_j_per_bit=35e-15,
    write_pulse_j=2.0**2 * _G_NS * 10e-9,
    pulses_per_level=64 / 3,
    verify_read_j=_sar_cell(5, 0.072341, _G_NS) + _sar_static(5, 0.538, 4.3753),
    verify_reads_per_pulse=0.0,
    input_activity=0.5,
    sources=(
        ("cell_read_j", f"column-current term of {NEUROSIM_ADC} (22 nm LP: 0.072341 / R_col W) per conducting cell; "
                        f"Ron 6 kOhm, Roff 6e3*150 ({NEUROSIM_V13}), 4 levels evenly spaced in G"),
        ("adc_j", f"static term of {NEUROSIM_ADC}, 22 nm LP, levelOutput 32 = 5 bits ({NEUROSIM_V13})"),
        ("shift_add_j", "estimate: the 32 nm figure scaled to 22 nm"),
        ("mask_read_j_per_bit", "estimate: the 32 nm figure scaled to 22 nm"),
        ("buffer_j_per_bit", "estimate: the 32 nm figure scaled to 22 nm"),
        ("interconnect_j_per_bit", "estimate: the 32 nm figure scaled to 22 nm"),
        ("write_pulse_j", f"Vw^2 * G * t: writeVoltage 2 V ({NEUROSIM_V13}), "
                          "10 ns pulse (MLP+NeuroSim V3 IdealDevice)"),
        ("pulses_per_level", "maxNumLevelLTP = 64 over the full range (MLP+NeuroSim V3 IdealDevice), 3 level steps"),
        ("verify_read_j", "derived: one cell read + one ADC conversion"),
        ("verify_reads_per_pulse", "0: NeuroSim programs with identical open-loop pulses"),
        ("input_activity", "50% (NeuroSim's default activity)"),
    ),
)

_G_MN = _mean_g(30e3, 150e3)  # MNSIM 2.0: Device_Resistance 1.5e5 (HRS), 3e4 (LRS)
_READ_MN = 0.5**2 * _G_MN * 3.16e-9  # MNSIM books the crossbar's read power apart from the ADC's
_ADC_MN = 1.26e-3 * (6 + 2) / 1e9  # ADC_Choice 4: 6-bit SAR, 1.26 mW, 1 GS/s, latency (bits + 2) / rate
MNSIM_45NM = EnergyPreset(
    name="mnsim-45nm",
    description="MNSIM 2.0 defaults: 45 nm, RRAM 30 kOhm / 150 kOhm, 6-bit SAR ADC (ADC_Choice 4)",
    cell_read_j=_READ_MN,
    adc_j=_ADC_MN,
    shift_add_j=50e-15,
    mask_read_j_per_bit=8e-15,
    buffer_j_per_bit=80e-15,
    interconnect_j_per_bit=75e-15,
    write_pulse_j=((0 + 3) / 2) ** 2 / math.sqrt(150e3 * 30e3) * 10e-9,
    pulses_per_level=1.0,
    verify_read_j=_READ_MN + _ADC_MN,
    verify_reads_per_pulse=0.0,
    input_activity=0.1,
    sources=(
        ("cell_read_j", f"Vr^2 * G * t: Read_Voltage 0.5 V, Read_Latency 3.16 ns, 30/150 kOhm, "
                        f"4 levels evenly spaced in G ({MNSIM})"),
        ("adc_j", f"ADC_Choice 4: 6-bit SAR ADC, 1.26 mW, 1 GS/s, latency (bits + 2) ns ({MNSIM}, ADC.py)"),
        ("shift_add_j", "estimate: ~12-bit add + register at 45 nm"),
        ("mask_read_j_per_bit", "estimate: register-file read at 45 nm"),
        ("buffer_j_per_bit", "estimate: SRAM buffer access at 45 nm (MNSIM's default buffer: 16 KB SRAM)"),
        ("interconnect_j_per_bit", "estimate: ~0.25 mm of wire at 45 nm"),
        ("write_pulse_j", f"Device.py: ((0 + Write_Voltage 3 V) / 2)^2 / sqrt(R_HRS R_LRS) "
                          f"* Write_Latency 10 ns ({MNSIM})"),
        ("pulses_per_level", "1: MNSIM writes a cell in one operation"),
        ("verify_read_j", "derived: one cell read + one ADC conversion"),
        ("verify_reads_per_pulse", "0: MNSIM models no verify"),
        ("input_activity", "10%: MNSIM's read power weights 0 V by 0.9 and Vr by 0.1 (Device.py)"),
    ),
)

PRESETS: dict[str, EnergyPreset] = {p.name: p.check() for p in (PAPER, NEUROSIM_22NM, MNSIM_45NM)}


def resolve_preset(name: str, overrides: MappingABC[str, float] | None = None) -> EnergyPreset:
    """A preset by name with `overrides` (energy.overrides) applied; bad input -> UserError (one line)."""
    if name not in PRESETS:
        raise UserError(f"energy.preset: unknown preset {name!r} (one of {', '.join(PRESETS)})")
    preset = PRESETS[name]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(preset.constants))
    if unknown:
        raise UserError(f"energy.overrides: unknown constant {unknown[0]!r} (constants: {', '.join(preset.constants)})")
    if not overrides:
        return preset
    note = tuple((k, "override (params.yaml energy.overrides)") for k in overrides)
    sources = tuple((k, v) for k, v in preset.sources if k not in overrides) + note
    return replace(preset, **overrides, sources=sources).check()


# --- what the energy model needs to know about the network --------------------------------


@dataclass(frozen=True)
class LayerIO:
    """Per image: output positions (times the layer's crossbars are used), input and output elements."""

    positions: int
    in_elems: int
    out_elems: int


def layer_io(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, LayerIO]:
    """Run one dummy image (C, H, W) through `model` with forward hooks on the named layers.

    The model may live on the meta device (shapes only, nothing computed).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise UserError(f"model: no layer named {missing[0]!r}")
    found: dict[str, LayerIO] = {}

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            out, x = output.shape, inputs[0].shape
            positions = math.prod(out[2:]) if isinstance(module, nn.Conv2d) else math.prod(out[1:-1])
            found[name] = LayerIO(int(positions), int(math.prod(x[1:])), int(math.prod(out[1:])))
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"input shape {tuple(input_shape)} does not fit the model ({first})") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unused = [n for n in names if n not in found]
    if unused:
        raise UserError(f"model: layer {unused[0]!r} is not used in the forward pass; cannot place its energy")
    return found


def column_crossbars(lm: LayerMap) -> tuple[torch.Tensor, torch.Tensor]:
    """(local crossbar, cells) of each of the layer's columns (mask units), int64 [n_columns]."""
    spec, k = lm.spec, lm.kernel
    cout, cout_g = lm.out_channels, lm.out_channels // lm.groups
    out = torch.arange(cout)
    if lm.packed:
        crossbar = out // cout_g // lm.groups_per_crossbar
        cells = torch.full((cout,), lm.cin_per_group * k * spec.cells_per_weight)
        return crossbar, cells
    n_rt, opc = lm.row_tiles_per_group, spec.outputs_per_crossbar
    n_ct = math.ceil(cout_g / opc)
    rt = torch.arange(n_rt).view(n_rt, 1)
    group, o_in_g = out // cout_g, out % cout_g
    crossbar = ((group * n_rt + rt) * n_ct + o_in_g // opc).reshape(-1)  # column = rt * cout + out
    rows = torch.tensor([x["rows_used"] for x in lm.crossbars], dtype=torch.int64)
    return crossbar, rows[crossbar] * spec.cells_per_weight


def column_pes(lm: LayerMap) -> torch.Tensor:
    """Global PE of each of the layer's columns, int64 [n_columns]."""
    return lm.first_pe + column_crossbars(lm)[0] // lm.spec.crossbars_per_pe


@dataclass(frozen=True)
class ColumnUse:
    """A task's columns in one layer: which compute (mask != 0) and which read a mask from the buffer."""

    active: torch.Tensor  # bool [n_columns]
    masked: torch.Tensor  # bool [n_columns]


def column_use(task: dict, mapping: Mapping) -> dict[str, ColumnUse]:
    """ColumnUse of every layer from a task.pt (docs/artifacts.md): columns with mask value 0 are off,
    masks are read for the columns of frozen PEs (a spare PE's columns are not masked)."""
    out: dict[str, ColumnUse] = {}
    masks, values = task.get("column_masks") or {}, task.get("mask_values")
    spare = task.get("spare_pes", torch.zeros(0, dtype=torch.int64)).to(torch.int64)
    for lm in mapping.layers:
        if lm.name not in masks:
            continue
        codes = masks[lm.name].long()
        if codes.numel() != lm.n_columns:
            raise UserError(f"task.pt: layer {lm.name} has {codes.numel()} column masks, "
                            f"the mapping {lm.n_columns} columns")
        masked = ~torch.isin(column_pes(lm), spare)
        active = (values.float()[codes] != 0) | ~masked
        out[lm.name] = ColumnUse(active, masked)
    return out


# --- inference -------------------------------------------------------------------------------

COMPONENTS = ("cells_j", "adc_j", "shift_add_j", "mask_j", "interconnect_j")


@dataclass(frozen=True)
class CrossbarUse:
    """Per crossbar (global order, numpy arrays): what one image makes it do."""

    layer: np.ndarray  # str
    pe: np.ndarray
    positions: np.ndarray  # times used per image
    rows_used: np.ndarray
    input_share: np.ndarray  # 1 / crossbars of its row tile: one broadcast of the input feeds them all
    active_columns: np.ndarray  # mask units that compute (all unless a mask switches them off)
    active_cells: np.ndarray  # cells in those columns
    masked_columns: np.ndarray  # mask units that read a mask code from the buffer


def crossbar_use(mapping: Mapping, io: dict[str, LayerIO], columns: dict[str, ColumnUse] | None = None) -> CrossbarUse:
    spec, columns = mapping.spec, columns or {}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in CrossbarUse.__dataclass_fields__}
    for lm in mapping.layers:
        n = lm.n_crossbars
        cols = np.array([x["columns"] for x in lm.crossbars], dtype=np.int64)
        cells = np.array([x["weights"] for x in lm.crossbars], dtype=np.int64) * spec.cells_per_weight
        masked = np.zeros(n, dtype=np.int64)
        if lm.name in columns:
            use, (xb, col_cells) = columns[lm.name], column_crossbars(lm)
            active = use.active.to(torch.int64)
            cols = torch.zeros(n, dtype=torch.int64).index_add(0, xb, active).numpy()
            cells = torch.zeros(n, dtype=torch.int64).index_add(0, xb, active * col_cells).numpy()
            masked = torch.zeros(n, dtype=torch.int64).index_add(0, xb, use.masked.to(torch.int64)).numpy()
        parts["layer"].append(np.full(n, lm.name, dtype=object))
        parts["pe"].append(lm.first_pe + np.arange(n) // spec.crossbars_per_pe)
        parts["positions"].append(np.full(n, io[lm.name].positions, dtype=np.int64))
        parts["rows_used"].append(np.array([x["rows_used"] for x in lm.crossbars], dtype=np.int64))
        tiles = np.array([x.get("row_tile", i) for i, x in enumerate(lm.crossbars)], dtype=np.int64)
        parts["input_share"].append(1.0 / np.bincount(tiles)[tiles])
        parts["active_columns"].append(cols)
        parts["active_cells"].append(cells)
        parts["masked_columns"].append(masked)
    return CrossbarUse(**{k: np.concatenate(v) for k, v in parts.items()})


def component_energy(use: CrossbarUse, spec: CrossbarSpec, preset: EnergyPreset, act_bits: int,
                     mask_bits: int = 0) -> dict[str, np.ndarray]:
    """Per crossbar and image, joules by component (the formulas of the module docstring)."""
    psum_bits = act_bits + spec.weight_bits + math.ceil(math.log2(spec.rows))  # a column's partial sum
    p, cycles = use.positions.astype(np.float64), float(act_bits)
    conversions = p * cycles * use.active_columns * spec.cells_per_weight
    return {
        "cells_j": p * cycles * preset.input_activity * use.active_cells * preset.cell_read_j,
        "adc_j": conversions * preset.adc_j,
        "shift_add_j": conversions * preset.shift_add_j,
        "mask_j": p * use.masked_columns * mask_bits * preset.mask_read_j_per_bit,
        "interconnect_j": p * (use.rows_used * cycles * use.input_share + use.active_columns * psum_bits)
        * preset.interconnect_j_per_bit,
    }


def buffer_energy(mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset, act_bits: int) -> np.ndarray:
    """Per layer and image: its input and output feature maps through the activation buffer."""
    return np.array([(io[lm.name].in_elems + io[lm.name].out_elems) * act_bits * preset.buffer_j_per_bit
                     for lm in mapping.layers], dtype=np.float64)


@dataclass(frozen=True)
class InferenceEnergy:
    """One image's inference energy: per crossbar, per PE and per layer tables (joules)."""

    crossbars: pl.DataFrame
    layers: pl.DataFrame
    pes: pl.DataFrame

    @property
    def per_image_j(self) -> float:
        return float(self.layers["total_j"].sum())

    def breakdown(self) -> dict[str, float]:
        return {c: float(self.layers[c].sum()) for c in (*COMPONENTS, "buffer_j")}


def inference_energy(mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset, act_bits: int,
                     columns: dict[str, ColumnUse] | None = None, mask_bits: int = 0) -> InferenceEnergy:
    use = crossbar_use(mapping, io, columns)
    energy = component_energy(use, mapping.spec, preset, act_bits, mask_bits)
    xb = pl.DataFrame({"layer": use.layer.astype(str), "pe": use.pe, "crossbar": np.arange(len(use.pe)),
                       "positions": use.positions, "active_columns": use.active_columns,
                       "active_cells": use.active_cells, "masked_columns": use.masked_columns, **energy},
                      schema_overrides={"layer": pl.String, "pe": pl.Int64, "crossbar": pl.Int64})
    xb = xb.with_columns(total_j=pl.sum_horizontal(*COMPONENTS))
    sums = xb.group_by("layer", maintain_order=True).agg(
        pl.col("pe").n_unique().alias("pes"), pl.len().alias("crossbars"), pl.col("positions").first(),
        *[pl.col(c).sum() for c in COMPONENTS])
    layers = pl.DataFrame({"layer": [lm.name for lm in mapping.layers],
                           "buffer_j": buffer_energy(mapping, io, preset, act_bits)})
    layers = (layers.join(sums, on="layer", how="left", maintain_order="left")
              .with_columns(total_j=pl.sum_horizontal(*COMPONENTS, "buffer_j"))
              .select("layer", "pes", "crossbars", "positions", *COMPONENTS, "buffer_j", "total_j"))
    pes = (xb.group_by("pe", maintain_order=True)
           .agg(pl.col("layer").first(), pl.len().alias("crossbars"), *[pl.col(c).sum() for c in COMPONENTS])
           .with_columns(total_j=pl.sum_horizontal(*COMPONENTS))
           .select("pe", "layer", "crossbars", *COMPONENTS, "total_j"))
    return InferenceEnergy(xb, layers, pes)


def mask_bits_for(n_values: int) -> int:
    """Bits one column's mask code takes in the buffer (unpacked): ceil(log2 K); 0 without a mask."""
    return math.ceil(math.log2(n_values)) if n_values > 1 else 0


def model_io(model_params, mapping: Mapping, num_classes: int, channels: int,  # noqa: ANN001 (params.ModelParams)
             image_size: int) -> dict[str, LayerIO]:
    """`layer_io` of the mapped layers of params' model for one channels x size x size image (meta device)."""
    from xbar.models import build_model

    with torch.device("meta"):
        model = build_model(model_params, num_classes, channels)
    return layer_io(model, [lm.name for lm in mapping.layers], (channels, image_size, image_size))


@dataclass(frozen=True)
class TaskInference:
    """One image's inference energy of a learned task, and the column masks it follows from."""

    energy: InferenceEnergy
    columns: dict[str, ColumnUse]
    mask_bits: int  # per masked column, read from the mask buffer


def task_inference(task: dict, mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset,
                   act_bits: int) -> TaskInference:
    """Inference energy of a task.pt: a column with mask 0 is off, frozen PEs read their mask code."""
    columns = column_use(task, mapping)
    bits = mask_bits_for(len(task.get("mask_values", ()))) if columns else 0
    return TaskInference(inference_energy(mapping, io, preset, act_bits, columns, bits), columns, bits)


# --- re-programming --------------------------------------------------------------------------


def write_energy(pulses: float, preset: EnergyPreset) -> float:
    """Energy of `pulses` programming pulses (verify reads included)."""
    return float(pulses) * preset.write_j_per_pulse()


def level_pulses(steps: float, preset: EnergyPreset) -> float:
    """Pulses to move cells by `steps` levels in total."""
    return float(steps) * preset.pulses_per_level


# --- typical cell changes of each method, for an architecture without a trained task -------------


@dataclass(frozen=True)
class TypicalChanges:
    """Documented assumptions of `typical_methods` (docs/energy.md gives each one's reasoning)."""

    weight_mean_abs_level: float | None = None  # None: sqrt(L) / 2 (LSQ's initial step size)
    piggyback_masked_share: float = 0.3  # weights a Piggyback mask switches off (set to the zero level)
    spare_change_share: float = 0.3  # spare-PE weights whose level the task's training moves (by one level)
    spare_reuse_share: float = 0.5  # a task's spare PEs that find a spare PE holding an earlier version of the same PE
    column_off_share: float = 0.0  # frozen columns a mask switches off (0: none, the conservative choice)

    def mean_abs_level(self, spec: CrossbarSpec) -> float:
        return self.weight_mean_abs_level or math.sqrt(spec.weight_levels) / 2

    def check(self) -> "TypicalChanges":
        for key in ("piggyback_masked_share", "spare_change_share", "spare_reuse_share", "column_off_share"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise UserError(f"{key}: a share, must lie in [0, 1], got {value!r}")
        return self


TYPICAL = TypicalChanges()
METHOD_NAMES = ("finetune", "piggyback", "xbm", "xma", "xma2")


def level_distribution(spec: CrossbarSpec, mean_abs: float) -> torch.Tensor:
    """P(weight level) over [-L, L]: a discrete Laplace with E|w| = mean_abs (float64 [2L + 1])."""
    levels = torch.arange(-spec.weight_levels, spec.weight_levels + 1, dtype=torch.float64)
    lo, hi = 1e-3, 1e3
    for _ in range(200):  # bisection on the Laplace scale b
        b = math.sqrt(lo * hi)
        p = torch.exp(-levels.abs() / b)
        p /= p.sum()
        lo, hi = (b, hi) if float((p * levels.abs()).sum()) < mean_abs else (lo, b)
    return p


@dataclass(frozen=True)
class ChangeStats:
    """Per weight: expected cells written and expected level steps (summed over its cells)."""

    cells: float
    steps: float


def _expected(spec: CrossbarSpec, joint: torch.Tensor) -> ChangeStats:
    """Expected (cells written, level steps) per weight for a joint P(old level, new level)."""
    levels = torch.arange(-spec.weight_levels, spec.weight_levels + 1)
    cells = spec.cell_levels(levels).to(torch.float64)  # [2L+1, cpw]
    diff = (cells[:, None, :] - cells[None, :, :]).abs()
    return ChangeStats(float((joint[..., None] * (diff > 0)).sum()), float((joint[..., None] * diff).sum()))


def _nudge(spec: CrossbarSpec, share: float) -> torch.Tensor:
    """P(new | old): the level moves by +-1 (equally likely, clipped at +-L) with probability `share`."""
    n = 2 * spec.weight_levels + 1
    move = torch.eye(n, dtype=torch.float64) * (1 - share)
    for i in range(n):
        move[i, max(i - 1, 0)] += share / 2
        move[i, min(i + 1, n - 1)] += share / 2
    return move


def change_stats(spec: CrossbarSpec, p: torch.Tensor, spare_change_share: float = 0.3) -> dict[str, ChangeStats]:
    """Expected writes per weight of the transitions the methods make, for backbone levels ~ p:

    * `redraw`: a new level drawn independently from p (a fine-tuned, re-quantized weight);
    * `from_blank`: a blank cell (level 0) programmed to a level drawn from p (an empty spare PE);
    * `to_zero`: a level drawn from p set to the zero weight's cells, or back (a Piggyback mask);
    * `same_pe`: two versions of one backbone weight, each moved by +-1 level with probability
      `spare_change_share` by its own task's training (a spare PE re-using a slot that held the same PE).
    """
    n = 2 * spec.weight_levels + 1
    zero = spec.weight_levels  # index of level 0
    blank = torch.zeros(n, n, dtype=torch.float64)
    blank[:, 0] = p  # "old" = cells all at level 0: the weight -L is offset-encoded as all-zero cells
    to_zero = torch.zeros(n, n, dtype=torch.float64)
    to_zero[:, zero] = p
    move = _nudge(spec, spare_change_share)
    same_pe = (move.T * p[None, :]) @ move  # sum over the backbone level b of P(a | b) p(b) P(c | b)
    return {
        "redraw": _expected(spec, p[:, None] * p[None, :]),
        "from_blank": _expected(spec, blank.T),
        "to_zero": _expected(spec, to_zero),
        "same_pe": _expected(spec, same_pe),
    }


def fullest_pes(mapping: Mapping, n: int) -> torch.Tensor:
    """The n PEs holding most weights (ties: lower id): an upper bound for spare-PE writes."""
    _, weights = mapping.pe_counts()
    order = sorted(range(len(weights)), key=lambda i: (-int(weights[i]), i))
    return torch.tensor(sorted(order[:n]), dtype=torch.int64)


def typical_methods(mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset, act_bits: int = 4,
                    spare_ratio: float = 0.1, inferences: int = 1, shift_levels: int = 3,
                    typical: TypicalChanges = TYPICAL) -> dict:
    """The five methods on an architecture alone, for one new task added to a chip that served the
    previous task of the same method (steady state of continual learning):
    inference per image, re-programming for the switch, total = inferences x inference + re-programming.

    Returns {"methods": {name: {...}}, "assumptions": {...}} (the `xbar energy --json` object); the
    assumptions include the first task (from the backbone-only chip, blank spare PEs) for comparison.
    """
    from xbar.memory import spare_pe_count  # the same ceil(ratio * PEs) the memory report uses

    if isinstance(spare_ratio, bool) or not isinstance(spare_ratio, int | float) or not 0 < spare_ratio <= 1:
        raise UserError(f"--spare-ratio: {spare_ratio!r} is outside (0, 1]")
    if isinstance(inferences, bool) or not isinstance(inferences, int) or inferences < 1:
        raise UserError(f"--inferences: expected a positive integer, got {inferences!r}")
    typical.check()
    spec = mapping.spec
    n_spare = spare_pe_count(mapping.n_pes, spare_ratio)
    spare = fullest_pes(mapping, n_spare)
    _, pe_weights = mapping.pe_counts()
    spare_weights = int(pe_weights[spare].sum())
    stats = change_stats(spec, level_distribution(spec, typical.mean_abs_level(spec)), typical.spare_change_share)
    n_w, m, h = mapping.n_weights, typical.piggyback_masked_share, typical.spare_reuse_share

    # inference: every method computes on the same cells; masks add buffer reads (spare PEs carry none)
    # and a mask value 0 switches a column off
    use = crossbar_use(mapping, io)
    base = component_energy(use, spec, preset, act_bits)
    buffers = float(buffer_energy(mapping, io, preset, act_bits).sum())
    frozen = ~np.isin(use.pe, spare.numpy())
    on = 1 - typical.column_off_share

    def per_image(kind: str) -> float:
        if kind in ("finetune", "piggyback"):
            return sum(float(v.sum()) for v in base.values()) + buffers
        mask_frozen = frozen if kind == "xma2" else np.ones_like(frozen)
        scale = np.where(mask_frozen, on, 1.0)  # columns (and their cells) switched off
        bits = mask_bits_for(2 if kind == "xbm" else shift_levels + 2)
        e = base["cells_j"] * scale + (base["adc_j"] + base["shift_add_j"]) * scale + base["interconnect_j"]
        mask = use.positions * np.where(mask_frozen, use.active_columns, 0) * bits * preset.mask_read_j_per_bit
        return float(e.sum() + mask.sum()) + buffers

    def writes(st: ChangeStats, weights: float) -> tuple[float, float]:
        return weights * st.cells, weights * st.steps

    xma2_steady = ChangeStats(h * stats["same_pe"].cells + (1 - h) * stats["redraw"].cells,
                              h * stats["same_pe"].steps + (1 - h) * stats["redraw"].steps)
    steady = {  # (cells written, level steps) to switch from the previous task to the new one
        "finetune": writes(stats["redraw"], n_w),
        "piggyback": writes(stats["to_zero"], n_w * 2 * m * (1 - m)),  # restore the old mask's, zero the new's
        "xbm": (0.0, 0.0), "xma": (0.0, 0.0),
        "xma2": writes(xma2_steady, spare_weights),
    }
    first = {**steady, "piggyback": writes(stats["to_zero"], n_w * m),
             "xma2": writes(stats["from_blank"], spare_weights)}

    def table(changes: dict[str, tuple[float, float]]) -> dict[str, dict]:
        out = {}
        for name in METHOD_NAMES:
            image = per_image(name)
            cells, steps = changes[name]
            pulses = level_pulses(steps, preset)
            reprogram = write_energy(pulses, preset)
            out[name] = {"inference_j": image * inferences, "reprogram_j": reprogram,
                         "total_j": image * inferences + reprogram, "cells_written": int(round(cells)),
                         "inference_per_image_j": image, "pulses": pulses}
        return out

    def ratios(t: dict[str, dict]) -> dict[str, float]:
        return {"finetune_over_xma2": t["finetune"]["total_j"] / t["xma2"]["total_j"],
                "piggyback_over_xma2": t["piggyback"]["total_j"] / t["xma2"]["total_j"],
                "piggyback_total_over_inference": t["piggyback"]["total_j"] / t["piggyback"]["inference_j"]}

    methods, first_task = table(steady), table(first)
    assumptions = {
        "preset": preset.name, "preset_description": preset.description,
        "constants": preset.constants, "sources": preset.source,
        "crossbar": asdict(spec), "act_bits": act_bits, "inferences": inferences,
        "pes": mapping.n_pes, "weights": n_w, "cells_used": mapping.n_cells_used,
        "spare_ratio": spare_ratio, "spare_pes": n_spare, "spare_pe_weights": spare_weights,
        "spare_pe_choice": "the fullest PEs (an upper bound of spare-PE writes; a real ranking is per task)",
        "scenario": "a new task on a chip that served the previous task of the same method (steady state); "
                    "total = inferences x inference per image + re-programming for the switch",
        "weight_levels": f"discrete Laplace over [-{spec.weight_levels}, {spec.weight_levels}] with "
                         f"E|level| = {typical.mean_abs_level(spec):.3f} (LSQ initial step: sqrt(L)/2)",
        "finetune": "a separate fine-tuned copy per task, re-quantized: each weight's new level independent "
                    "of the old one (paper: 'nearly all cells'); only cells whose level changes are written",
        "piggyback": f"{m:.0%} of weights masked out (set to the zero level), masks independent between "
                     f"tasks: {2 * m * (1 - m):.0%} of weights restored or zeroed per switch",
        "xbm_xma": "column masks live in the mask buffers only: no cell is written",
        "xma2": f"{h:.0%} of a task's spare PEs land on a spare PE holding an earlier version of the same PE "
                f"(HA3M re-use), whose weights differ only where either task's training moved a level "
                f"({typical.spare_change_share:.0%} of weights each); the rest land on a spare PE holding "
                "an unrelated PE; column masks on the frozen PEs",
        "column_off_share": typical.column_off_share,
        "typical_changes": asdict(typical),
        "expected_per_weight": {k: asdict(v) for k, v in stats.items()},
        "ratios": ratios(methods),
        "first_task": {"scenario": "the first task on the backbone-only chip: spare PEs blank (level 0), "
                                   f"Piggyback zeroes {m:.0%} of weights",
                       "reprogram_j": {k: v["reprogram_j"] for k, v in first_task.items()},
                       "cells_written": {k: v["cells_written"] for k, v in first_task.items()},
                       "ratios": ratios(first_task)},
    }
    return {"methods": methods, "assumptions": assumptions}


def input_shape_for(name: str) -> tuple[int, int, int]:
    """The image the energy of a named model is computed for: 1x28x28 for the project's small ResNet,
    3x299x299 for Inception v3, else ImageNet's 3x224x224."""
    if name == "small_resnet":
        return (1, 28, 28)
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def named_energy(name: str, preset: str, spare_ratio: float = 0.1, inferences: int = 1,
                 spec: CrossbarSpec | None = None, act_bits: int = 4) -> dict:
    """`xbar energy`: the five methods' typical energy on an architecture by name (no weights needed)."""
    from xbar.memory import AUX_NAMES, HEAD_NAMES, build_named_model
    from xbar.crossbar import map_model

    chosen = resolve_preset(preset)  # a bad preset fails before the model is built
    model = build_named_model(name)
    skip = tuple(n for n, _ in model.named_children() if n in HEAD_NAMES + AUX_NAMES)
    mapping = map_model(model, spec or CrossbarSpec(), exclude=skip)
    if not mapping.layers:
        raise UserError(f"--model: {name} has no Conv2d / Linear layer to map")
    try:
        io = layer_io(model, [lm.name for lm in mapping.layers], input_shape_for(name))
    except (UserError, NotImplementedError):  # an operator without a meta kernel: run it for real
        model = model.to_empty(device="cpu")
        io = layer_io(model, [lm.name for lm in mapping.layers], input_shape_for(name))
    result = typical_methods(mapping, io, chosen, act_bits, spare_ratio, inferences)
    result["assumptions"] = {"model": name, "input_shape": list(input_shape_for(name)),
                             "excluded_layers": list(skip), **result["assumptions"]}
    return result
