"""Energy presets: the constants of one technology, each with where its value comes from.

Constants live in named presets (`PRESETS`), each constant with its source;
`resolve_preset(name, overrides)` applies `energy.overrides` from params.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, fields, replace

from xbar.errors import UserError

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

