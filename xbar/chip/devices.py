"""Device models of the ReRAM cell, as named presets with a source for every number.

A cell holds a level 0..B-1 (B = 2**cell_bits) as a conductance in its window
[g_min, g_max]; the chip forward works in **level units above g_min** (the
HRS current of a column is a known digital offset, like the signed-weight
offset). Every noise figure here is a fraction of the window (g_max - g_min),
so a preset describes the device whatever the cell packs: one level step of a
2-bit cell is 1/3 of the window. `DevicePreset.sigma_levels` converts.

What a preset models (all Gaussian, independent per cell):

* programming error: sigma(x) = sum_i prog_sigma[i] * x**i with x = the target
  level / (B-1) (the published fits depend on the target conductance); drawn
  each time a cell is programmed, then fixed;
* read noise: read_sigma per cell and per read (one input cycle); a column sum
  of n driven cells gets N(0, n * read_sigma**2);
* stuck-at faults, fixed per chip instance (MNSIM's `Device_SAF` style): a
  share stuck_low of the cells sits at level 0 (HRS), stuck_high at level B-1
  (LRS), whatever is programmed;
* drift and relaxation t seconds after programming (t > drift_t0):
  level * (t / t0)**-drift_nu  (power-law decay of the conductance above g_min,
  aihwkit's PCM-style drift) + relax_mean * ln(t / t0) + N(0, (relax_sigma0 +
  relax_sigma(x) * ln(t / t0))**2), relax_sigma a polynomial in the target level x like
  prog_sigma (the log-time relaxation fits of ReRAM; level-dependent as aihwkit's Wan 2022 fit);
  `drift_compensation` rescales each layer's digitized partial sums by the
  ratio of a reference read now to the one at programming (aihwkit's
  GlobalDriftCompensation, done on the partial sums so that the digital
  signed-weight correction still matches).

Levels are clipped to the window after every effect (as aihwkit clips to
[g_min, g_max] / at 0). `noise_scale` multiplies every sigma (the
accuracy-against-noise sweep).

Presets that describe the same device as an energy preset (xbar.energy) carry
the same name: `paper`, `neurosim-22nm`, `mnsim-45nm`; one name selects both
(`chip.device` defaults to `energy.preset`, xbar.presets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from xbar.errors import UserError
from xbar.presets import Sourced, resolve

AIHWKIT_RERAM = "IBM aihwkit src/aihwkit/inference/noise/reram.py"
AIHWKIT_CONV = "IBM aihwkit src/aihwkit/inference/converter/conductance.py"
CROSSSIM = "Sandia CrossSim simulator/devices/custom"
NEUROSIM_INF = "DNN+NeuroSim V1.3 Inference_pytorch (github.com/neurosim/DNN_NeuroSim_V1.3)"
MNSIM_INI = "MNSIM 2.0 SimConfig.ini (github.com/thu-nics/MNSIM-2.0)"


def window_poly(coeffs_us: tuple[float, ...], g_min: float, g_max: float) -> tuple[float, ...]:
    """A sigma fit sigma(G) = sum c_i G**i in uS (G in uS) as a fraction of the window, in x = (G - g_min) / w."""
    w = g_max - g_min
    poly = np.polynomial.Polynomial(coeffs_us)(np.polynomial.Polynomial([g_min, w]))  # compose: G = g_min + w x
    return tuple(float(c) / w for c in poly.coef)


_POLYNOMIALS = ("prog_sigma", "relax_sigma")  # constants given as polynomials in x = level / (B - 1)


@dataclass(frozen=True)
class DevicePreset(Sourced):
    """One cell technology's non-idealities (fractions of the conductance window, rates, seconds)."""

    name: str
    description: str
    prog_sigma: tuple[float, ...] = (0.0,)  # programming error: polynomial in x = level / (B-1)
    read_sigma: float = 0.0  # per cell, per read
    stuck_low: float = 0.0  # share of cells stuck at level 0 (HRS)
    stuck_high: float = 0.0  # share of cells stuck at level B-1 (LRS)
    drift_nu: float = 0.0  # power-law decay exponent of the conductance above g_min
    drift_t0: float = 1.0  # seconds: programming ends here; drift counts from it
    relax_mean: float = 0.0  # mean shift per unit ln(t / t0)
    relax_sigma0: float = 0.0  # relaxation spread once t > t0
    relax_sigma: tuple[float, ...] = (0.0,)  # relaxation spread per unit ln(t / t0): polynomial in x
    drift_compensation: bool = True
    noise_scale: float = 1.0
    sources: tuple[tuple[str, str], ...] = ()

    @property
    def ideal(self) -> bool:
        """Exact cells: no noise, no faults, no drift."""
        quiet = self.noise_scale == 0 or not any((*self.prog_sigma, self.read_sigma, self.relax_sigma0,
                                                   *self.relax_sigma))
        return quiet and not any((self.stuck_low, self.stuck_high, self.drift_nu, self.relax_mean))

    def sigma_levels(self, levels: torch.Tensor, max_level: int) -> torch.Tensor:
        """Programming-error sigma (level units) of cells programmed to `levels` (0..max_level)."""
        x = levels.float() / max_level
        sigma = torch.zeros_like(x)
        for c in reversed(self.prog_sigma):  # Horner
            sigma = sigma * x + c
        return sigma.clamp_min(0) * max_level * self.noise_scale

    def relax_levels(self, levels: torch.Tensor, max_level: int, log_t: float) -> torch.Tensor:
        """Relaxation sigma (level units) ln(t / t0) = `log_t` after programming cells to `levels`."""
        x = levels.float() / max_level
        sigma = torch.zeros_like(x)
        for c in reversed(self.relax_sigma):  # Horner
            sigma = sigma * x + c
        return (self.relax_sigma0 + sigma.clamp_min(0) * log_t) * max_level * self.noise_scale

    def check(self) -> DevicePreset:
        """Bad values -> UserError, one line naming the constant."""
        for key, value in self.constants.items():
            values = value if key in _POLYNOMIALS else (value,)
            if key == "drift_compensation":
                if not isinstance(value, bool):
                    raise UserError(f"device.{key}: expected true or false, got {value!r}")
                continue
            if key in _POLYNOMIALS and (not isinstance(value, tuple) or not value):
                raise UserError(f"device.{key}: expected a number or a list of polynomial coefficients, "
                                f"got {value!r}")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise UserError(f"device.{key}: expected a number, got {v!r}")
        for key in ("read_sigma", "relax_sigma0", "noise_scale", "drift_nu"):
            if getattr(self, key) < 0:
                raise UserError(f"device.{key}: a noise level, must be >= 0, got {getattr(self, key)!r}")
        x = np.linspace(0, 1, 101)
        for key in _POLYNOMIALS:
            sigma = np.polynomial.Polynomial(getattr(self, key))(x)
            if sigma.min() < -1e-12:
                raise UserError(f"device.{key}: a noise level, must be >= 0 over the window, "
                                f"got {float(sigma.min()):.3g} at x = {float(x[sigma.argmin()]):.2f}")
        for key in ("stuck_low", "stuck_high"):
            if not 0 <= getattr(self, key) <= 1:
                raise UserError(f"device.{key}: a rate, must lie in [0, 1], got {getattr(self, key)!r}")
        if self.stuck_low + self.stuck_high > 1:
            raise UserError(f"device.stuck_low + stuck_high: {self.stuck_low + self.stuck_high:g} of the cells "
                            "cannot be stuck (must be <= 1)")
        if self.drift_t0 <= 0:
            raise UserError(f"device.drift_t0: must be > 0 seconds, got {self.drift_t0!r}")
        return self


IDEAL = DevicePreset(
    name="ideal", description="exact cells: every level as programmed, no read noise, no faults, no drift",
    sources=tuple((k, "exact arithmetic (today's ideal chip)") for k in (
        "prog_sigma", "read_sigma", "stuck_low", "stuck_high", "drift_nu", "drift_t0", "relax_mean",
        "relax_sigma0", "relax_sigma", "drift_compensation", "noise_scale")))

# Wan et al., Nature 2022 (NeuRRAM, HfOx-based RRAM), as aihwkit fits it: sigma(g) in uS, a 4th-order
# polynomial of g / g_max, fitted for a 40 uS window (prog_coeff_g_max_reference); keys 1 s and 1 day.
_WAN_1S = (0.348, 16.030, -43.853, 45.393, -16.815)
_WAN_1DAY = (0.701, 22.086, -50.773, 47.095, -16.458)
_WAN_GMAX = 40.0


def _wan_relax_sigma() -> tuple[float, ...]:
    """Relaxation spread per ln(t), level by level: the 1-day spread beyond the 1-s one, sqrt(sd^2 - s1^2),
    per ln(86400), as a 4th-order least-squares polynomial in x = g / g_max (so that programming error and
    relaxation together give aihwkit's 1-day sigma at every level)."""
    x = np.linspace(0, 1, 201)
    s1, sd = np.polynomial.Polynomial(_WAN_1S)(x), np.polynomial.Polynomial(_WAN_1DAY)(x)
    extra = np.sqrt(np.maximum(sd**2 - s1**2, 0)) / _WAN_GMAX / math.log(86400.0)
    return tuple(float(c) for c in np.polynomial.Polynomial.fit(x, extra, 4).convert().coef)


PAPER = DevicePreset(
    name="paper",
    description="HfOx RRAM statistics of Wan et al. (Nature 2022) as fitted by aihwkit's ReRamWan2022NoiseModel; "
                "the XMA2 paper gives no device statistics for its TaOx/HfOx cell",
    prog_sigma=tuple(c / _WAN_GMAX for c in _WAN_1S),
    read_sigma=0.01,
    relax_sigma=_wan_relax_sigma(),
    sources=(
        ("prog_sigma", f"ReRamWan2022NoiseModel coeff_dic[1.0] = [-16.815, 45.393, -43.853, 16.030, 0.348][::-1] uS "
                       f"in g/g_max, fitted for g_max 40 uS (prog_coeff_g_max_reference) ({AIHWKIT_RERAM})"),
        ("read_sigma", f"ReRamWan2022NoiseModel docstring: short-term read noise about 1% of g_max "
                       f"(forward.w_noise 0.01, ADDITIVE_CONSTANT) ({AIHWKIT_RERAM})"),
        ("stuck_low", "0: aihwkit's Wan 2022 model has no stuck cells"),
        ("stuck_high", "0: aihwkit's Wan 2022 model has no stuck cells"),
        ("drift_nu", "0: 'ReRAM does not show drift in the usual sense' (ReRamWan2022NoiseModel)"),
        ("drift_t0", "1 s: the first key of ReRamWan2022NoiseModel.coeff_dic"),
        ("relax_mean", "0: the Wan 2022 fits are centred on the target"),
        ("relax_sigma0", "0: see relax_sigma"),
        ("relax_sigma", f"fit: sqrt(sigma_1day(g)^2 - sigma_1s(g)^2) (coeff_dic[86400] = [-16.458, 47.095, -50.773, "
                        f"22.086, 0.701][::-1]) per ln(86400 s), level by level: a 4th-order polynomial in g / g_max "
                        f"({AIHWKIT_RERAM})"),
        ("drift_compensation", "aihwkit's GlobalDriftCompensation (on)"),
        ("noise_scale", "1: ReRamWan2022NoiseModel(noise_scale=1.0)"),
    ),
)

_CMO_GMIN, _CMO_GMAX = 9.0, 88.199997
_CMO_W = _CMO_GMAX - _CMO_GMIN
_CMO_K, _CMO_TREAD = 0.0277316483, 1e-6
CMO = DevicePreset(
    name="cmo-hfox",
    description="IBM CMO/HfOx analog ReRAM (Falcone et al.), aihwkit's ReRamCMONoiseModel defaults",
    prog_sigma=window_poly((0.00081107, 0.00106879), _CMO_GMIN, _CMO_GMAX),
    # 1/f read noise at 1 s after programming, mid-window conductance
    read_sigma=_CMO_K * math.log10((_CMO_GMIN + _CMO_GMAX) / 2)
    * math.sqrt(math.log((1.0 + _CMO_TREAD) / (2 * _CMO_TREAD))) / _CMO_W,
    relax_mean=-0.08900206 / _CMO_W,
    relax_sigma0=0.41183342 / _CMO_W,
    relax_sigma=(0.04201137 / _CMO_W,),
    sources=(
        ("prog_sigma", f"ReRamCMONoiseModel coeff_dict[0.2] = [0.00106879, 0.00081107][::-1] uS, linear in g (the "
                       f"default acceptance_range 2e-2 is not a key, so aihwkit falls back to 0.2%); window "
                       f"g_min 9.0 / g_max 88.199997 uS (SingleDeviceConductanceConverter, {AIHWKIT_CONV}) "
                       f"({AIHWKIT_RERAM})"),
        ("read_sigma", f"read_dict K = 0.0277316483, t_read = 1e-6 s: K log10(g) sqrt(ln((t + t_read) / 2 t_read)) "
                       f"at t = 1 s, mid-window g ({AIHWKIT_RERAM})"),
        ("stuck_low", "0: not modelled by ReRamCMONoiseModel"),
        ("stuck_high", "0: not modelled by ReRamCMONoiseModel"),
        ("drift_nu", "0: CMO relaxation is independent of the level (generate_drift_coefficients)"),
        ("drift_t0", "1 s: decay_dict fits are in log(t), t in seconds"),
        ("relax_mean", f"decay_dict['mean'] = [-0.08900206] uS per ln(t) ({AIHWKIT_RERAM})"),
        ("relax_sigma0", f"decay_dict['std'][1] = 0.41183342 uS ({AIHWKIT_RERAM})"),
        ("relax_sigma", f"decay_dict['std'][0] = 0.04201137 uS per ln(t) ({AIHWKIT_RERAM})"),
        ("drift_compensation", "aihwkit's GlobalDriftCompensation (on)"),
        ("noise_scale", "1: prog_noise_scale = read_noise_scale = drift_scale = 1.0"),
    ),
)

_CS_WAN_GMAX = 39.26
CROSSSIM_WAN = DevicePreset(
    name="crosssim-wan2022",
    description="CrossSim's RRAM_Wan programming error (cubic fit to Wan et al. 2022, Extended Data Fig. 3, t = 1 s)",
    prog_sigma=window_poly((1.053, 2.374e-1, -1.167e-2, 1.536e-4), 0.0, _CS_WAN_GMAX),
    sources=(
        ("prog_sigma", f"RRAMWan.programming_error: sigma_G = 1.536e-4 G^3 - 1.167e-2 G^2 + 2.374e-1 G + 1.053 uS, "
                       f"at the model's largest window, Gmax 39.26 uS, Gmin 0 ({CROSSSIM}/RRAM_Wan.py)"),
        ("read_sigma", "0: CrossSim's RRAM_Wan models programming error only"),
        ("stuck_low", "0: not in RRAM_Wan"), ("stuck_high", "0: not in RRAM_Wan"),
        ("drift_nu", "0: not in RRAM_Wan"), ("drift_t0", "1 s (unused)"), ("relax_mean", "0: not in RRAM_Wan"),
        ("relax_sigma0", "0: not in RRAM_Wan"), ("relax_sigma", "0: not in RRAM_Wan"),
        ("drift_compensation", "on (no drift to compensate)"), ("noise_scale", "1"),
    ),
)

_MILO_GMIN, _MILO_GMAX = 50.0, 225.0
CROSSSIM_MILO = DevicePreset(
    name="crosssim-milo2021",
    description="CrossSim's RRAM_Milo programming error (Milo et al., IRPS 2021, IGVVA-100 program-and-verify)",
    prog_sigma=window_poly((4.782321, -0.009107), _MILO_GMIN, _MILO_GMAX),
    sources=(
        ("prog_sigma", f"RRAMMilo.programming_error: sigma_G = max(-0.009107 G + 4.782321, 0) uS over the suggested "
                       f"window 50..225 uS (on/off 4.5) ({CROSSSIM}/RRAM_Milo.py)"),
        ("read_sigma", "0: CrossSim's RRAM_Milo models programming error (and I-V nonlinearity, not here)"),
        ("stuck_low", "0: not in RRAM_Milo"), ("stuck_high", "0: not in RRAM_Milo"),
        ("drift_nu", "0: not in RRAM_Milo"), ("drift_t0", "1 s (unused)"), ("relax_mean", "0: not in RRAM_Milo"),
        ("relax_sigma0", "0: not in RRAM_Milo"), ("relax_sigma", "0: not in RRAM_Milo"),
        ("drift_compensation", "on (no drift to compensate)"), ("noise_scale", "1"),
    ),
)

_NS_VARI, _NS_ONOFF = 0.1, 10.0
NEUROSIM = DevicePreset(
    name="neurosim-22nm",
    description="DNN+NeuroSim V1.3 inference: conductance variation --vari 0.1 (its example value) at on/off 10",
    # remainderQ * (1 + N(0, vari)), remainderQ = level conductance incl. g_min = window / (onoff - 1)
    prog_sigma=(_NS_VARI / (_NS_ONOFF - 1), _NS_VARI),
    sources=(
        ("prog_sigma", f"quantization_cpu_np_infer.py: remainderQ + remainderQ * N(0, vari) with remainderQ from "
                       f"g_min = g_max / onoffratio; inference.py --vari 'e.g. 0.1' (default 0), --onoffratio 10 "
                       f"({NEUROSIM_INF}). NeuroSim redraws it every forward; here it is fixed per programming"),
        ("read_sigma", "0: NeuroSim's inference has no separate read noise"),
        ("stuck_low", "0: not in NeuroSim's inference"), ("stuck_high", "0: not in NeuroSim's inference"),
        ("drift_nu", f"0: inference.py --t 0 --v 0 (retention off by default) ({NEUROSIM_INF})"),
        ("drift_t0", "1 s (unused)"), ("relax_mean", "0: retention off by default"),
        ("relax_sigma0", "0: retention off by default"), ("relax_sigma", "0: retention off by default"),
        ("drift_compensation", "on (no drift to compensate)"), ("noise_scale", "1"),
    ),
)

_MN_VAR, _MN_ONOFF = 0.05, 1.5e5 / 3e4
MNSIM = DevicePreset(
    name="mnsim-45nm",
    description="MNSIM 2.0 defaults: 5% resistance variation, 9% stuck at HRS, 1% stuck at LRS, 30k/150k Ohm",
    # 5% of the resistance is ~5% of the conductance, g_min = window / (on/off - 1)
    prog_sigma=(_MN_VAR / (_MN_ONOFF - 1), _MN_VAR),
    stuck_low=0.09,
    stuck_high=0.01,
    sources=(
        ("prog_sigma", f"Device_Variation = 5 (% of the ideal resistance), Device_Resistance = 1.5e5,3e4 "
                       f"({MNSIM_INI}); MNSIM's Weight_update.py draws one deviation per level, here per cell"),
        ("read_sigma", "0: MNSIM has no read noise"),
        ("stuck_low", f"Device_SAF = 9,1: 9% Stuck-At-HRS ({MNSIM_INI}; Weight_update.py sets them to level 0)"),
        ("stuck_high", f"Device_SAF = 9,1: 1% Stuck-At-LRS ({MNSIM_INI}; Weight_update.py: the top level)"),
        ("drift_nu", "0: MNSIM has no drift"), ("drift_t0", "1 s (unused)"), ("relax_mean", "0: no drift"),
        ("relax_sigma0", "0: no drift"), ("relax_sigma", "0: no drift"),
        ("drift_compensation", "on (no drift to compensate)"), ("noise_scale", "1"),
    ),
)

DEVICES: dict[str, DevicePreset] = {p.name: p.check() for p in (IDEAL, PAPER, CMO, CROSSSIM_WAN, CROSSSIM_MILO,
                                                                 NEUROSIM, MNSIM)}


def _polynomial(overrides: dict[str, object]) -> dict[str, object]:
    """A prog_sigma / relax_sigma override given as a number is a level-independent sigma."""
    for key in _POLYNOMIALS:
        value = overrides.get(key)
        if value is not None:
            overrides[key] = tuple(value) if isinstance(value, list | tuple) else (value,)
    return overrides


def resolve_device(name: str, overrides: Mapping[str, object] | None = None) -> DevicePreset:
    """A device preset by name with `overrides` (constant -> value) applied; bad input -> one-line UserError."""
    return resolve(DEVICES, name, overrides, what="device", where="device", prepare=_polynomial)


def parse_settings(items: list[str] | None) -> dict[str, object]:
    """Command-line KEY=VALUE device overrides: a number, comma-separated numbers (a polynomial), true/false."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise UserError(f"--set: expected KEY=VALUE (a device constant), got {item!r}")
        try:
            if raw.lower() in ("true", "false"):
                out[key] = raw.lower() == "true"
            else:
                numbers = [float(v) for v in raw.split(",")]
                out[key] = numbers if len(numbers) > 1 else numbers[0]
        except ValueError:
            raise UserError(f"--set {key}: expected a number, got {raw!r}") from None
    return out
