"""Energy presets: the constants of one technology, each with where its value comes from.

Constants live in named presets (`PRESETS`), each constant with its source;
`resolve_preset(name, overrides, adc_bits)` applies `energy.overrides` from params.yaml
(through xbar.presets, as the device presets do) and books the ADC at `crossbar.adc_bits`.

**One ADC setting.** A preset books its ADC at `adc_bits` (the precision its
source quotes: 5 bits for paper and neurosim-22nm, 6 for mnsim-45nm);
`at_adc_bits(b)` re-books it at the chip's `crossbar.adc_bits`, the same setting
the chip forward digitizes with. A SAR ADC converts in (bits + `adc_extra_cycles`)
cycles (NeuroSim's SarADC: bits + 1 ns; MNSIM: (bits + 2) / f) at a static
power that grows by `adc_power_per_bit` of its reference value per bit
(NeuroSim's a * bits + b uW; MNSIM quotes one power per ADC part: 0). The
column current of NeuroSim's ADC flows for the whole conversion, so the share
`cell_read_in_conversion` of `cell_read_j` scales with the conversion time too
(1 for the NeuroSim-derived presets; 0 for MNSIM, whose read pulse is fixed).
At its own `adc_bits` a preset is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, replace

from xbar.errors import UserError
from xbar.presets import Sourced, resolve

NEUROSIM_V13 = "DNN+NeuroSim V1.3 Param.cpp (github.com/neurosim/DNN_NeuroSim_V1.3)"
NEUROSIM_V21 = "DNN+NeuroSim V2.1 Param.cpp (github.com/neurosim/DNN_NeuroSim_V2.1)"
NEUROSIM_ADC = "NeuroSim SarADC.cpp: E = P(bits, R_col) * (bits + 1) ns"
MNSIM = "MNSIM 2.0 SimConfig.ini / Hardware_Model (github.com/thu-nics/MNSIM-2.0)"


# constants that may be 0: no verify reads (open-loop programming); an ADC whose power does not
# depend on its bits; a cell read that does not last as long as the conversion
MAY_BE_ZERO = ("verify_reads_per_pulse", "adc_extra_cycles", "adc_power_per_bit", "cell_read_in_conversion")


@dataclass(frozen=True)
class EnergyPreset(Sourced):
    """Energy constants of one technology (joules, counts, shares). Every constant is > 0, except
    those of MAY_BE_ZERO; `adc_bits` is a whole number of bits, the precision adc_j is booked at."""

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
    adc_bits: int  # the ADC precision adc_j, cell_read_j and verify_read_j are booked at
    adc_extra_cycles: float  # a conversion takes adc_bits + this many cycles
    adc_power_per_bit: float  # the ADC's static power grows by this share of its value per bit
    cell_read_in_conversion: float  # share of cell_read_j that lasts as long as the conversion
    sources: tuple[tuple[str, str], ...] = ()  # (constant, where its value comes from)

    def at_adc_bits(self, bits: int) -> EnergyPreset:
        """The preset with its ADC (and the cell current that flows while it converts) booked at `bits`."""
        if bits == self.adc_bits:
            return self
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise UserError(f"adc_bits: expected an integer in 1..16, got {bits!r}")
        time = (bits + self.adc_extra_cycles) / (self.adc_bits + self.adc_extra_cycles)
        power = 1 + self.adc_power_per_bit * (bits - self.adc_bits)
        adc = self.adc_j * time * power
        cell = self.cell_read_j * (1 - self.cell_read_in_conversion + self.cell_read_in_conversion * time)
        verify = self.verify_read_j * (adc + cell) / (self.adc_j + self.cell_read_j)  # a cell read + a conversion
        note = f" -- booked at {bits} bits (crossbar.adc_bits): x{time:.3g} conversion time, x{power:.3g} power"
        scaled = {"adc_j", "verify_read_j"} | ({"cell_read_j"} if self.cell_read_in_conversion else set())
        sources = tuple((k, v + note if k in scaled else v) for k, v in self.sources if k != "adc_bits")
        return replace(self, adc_j=adc, cell_read_j=cell, verify_read_j=verify, adc_bits=bits,
                       sources=(*sources, ("adc_bits", f"crossbar.adc_bits (the preset's own: {self.adc_bits})")))

    def write_j_per_pulse(self) -> float:
        """Energy of one programming pulse including its share of verify reads."""
        return self.write_pulse_j + self.verify_reads_per_pulse * self.verify_read_j

    def check(self) -> "EnergyPreset":
        for key, value in self.constants.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"energy.{key}: expected a number, got {value!r}")
            if key in MAY_BE_ZERO and value == 0:
                continue
            if value <= 0:
                raise UserError(f"energy.{key}: must be > 0, got {value!r}")
        for key in ("input_activity", "cell_read_in_conversion"):
            if getattr(self, key) > 1:
                raise UserError(f"energy.{key}: a share, must be <= 1, got {getattr(self, key)!r}")
        if self.adc_bits != int(self.adc_bits) or not 1 <= self.adc_bits <= 16:
            raise UserError(f"energy.adc_bits: expected an integer in 1..16, got {self.adc_bits!r}")
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


def _sar_power_per_bit(bits: int, a: float, b: float) -> float:
    """The static power's growth per bit, as a share of its value at `bits`: a / (a * bits + b)."""
    return a / (a * bits + b)


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
    adc_bits=5,
    adc_extra_cycles=1.0,
    adc_power_per_bit=_sar_power_per_bit(5, 1.1294, 8.8998),
    cell_read_in_conversion=1.0,
    sources=(
        ("adc_bits", "5: the paper's one 5-bit SAR ADC per column (section 5.2)"),
        ("adc_extra_cycles", f"1: a conversion takes bits + 1 ns ({NEUROSIM_ADC})"),
        ("adc_power_per_bit", f"a / (a * 5 + b) with 32 nm LP a, b = 1.1294, 8.8998 uW: P = a * bits + b "
                              f"({NEUROSIM_ADC})"),
        ("cell_read_in_conversion", f"1: the column current flows for the whole conversion ({NEUROSIM_ADC})"),
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
    adc_bits=5,
    adc_extra_cycles=1.0,
    adc_power_per_bit=_sar_power_per_bit(5, 0.538, 4.3753),
    cell_read_in_conversion=1.0,
    sources=(
        ("adc_bits", f"5: levelOutput 32 ({NEUROSIM_V13})"),
        ("adc_extra_cycles", f"1: a conversion takes bits + 1 ns ({NEUROSIM_ADC})"),
        ("adc_power_per_bit", f"a / (a * 5 + b) with 22 nm LP a, b = 0.538, 4.3753 uW: P = a * bits + b "
                              f"({NEUROSIM_ADC})"),
        ("cell_read_in_conversion", f"1: the column current flows for the whole conversion ({NEUROSIM_ADC})"),
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
    adc_bits=6,
    adc_extra_cycles=2.0,
    adc_power_per_bit=0.0,
    cell_read_in_conversion=0.0,
    sources=(
        ("adc_bits", f"6: ADC_Choice 4, a 6-bit SAR ADC ({MNSIM}, ADC.py)"),
        ("adc_extra_cycles", f"2: latency (bits + 2) / sample rate ({MNSIM}, ADC.py)"),
        ("adc_power_per_bit", f"0: MNSIM quotes one power per ADC part (1.26 mW for ADC_Choice 4), held at other "
                              f"precisions ({MNSIM}, ADC.py)"),
        ("cell_read_in_conversion", f"0: the cells conduct for Read_Latency 3.16 ns, apart from the ADC ({MNSIM})"),
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


def resolve_preset(name: str, overrides: MappingABC[str, float] | None = None,
                   adc_bits: int | None = None) -> EnergyPreset:
    """A preset by name, its ADC booked at `adc_bits` (crossbar.adc_bits; None: the preset's own), then
    `overrides` (energy.overrides: the values as given, e.g. an adc_j measured at that precision) applied;
    bad input -> UserError (one line)."""
    chosen = resolve(PRESETS, name, None, what="energy.preset", where="energy.overrides")
    table = {name: chosen if adc_bits is None else chosen.at_adc_bits(adc_bits)}
    return resolve(table, name, overrides, what="energy.preset", where="energy.overrides",
                   note="override (params.yaml energy.overrides)",
                   fixed={"adc_bits": "the ADC's bits are crossbar.adc_bits, shared with the chip forward"})


def energy_preset(params) -> EnergyPreset:  # noqa: ANN001 (Params)
    """params.yaml's energy preset, its ADC at crossbar.adc_bits: what every stage and the comparison use."""
    return resolve_preset(params.energy.preset, params.energy.overrides, params.crossbar.adc_bits)

