"""The column ADC: its bits, the rule that sets its range, and how the range is calibrated.

An ADC digitizes one column's partial sum per input cycle: code = clamp(round(psum / step),
lowest, top), value = code x step. Its **range** R sets the step, step = R / top, with one rule:
a step finer than one cell level is the coarsest power-of-two fraction of a level that still
covers R, so integer partial sums read exactly and sums of noisy cells keep their fractions.

Range rules (`chip.adc_range`):

* `full`: the column's full scale, rows in its tile x top cell level: data-independent, never clips
  (a 5-bit ADC then steps 216 / 31 ~ 7 levels at 72 rows);
* `per_layer`, `per_crossbar`, `per_column`: one calibrated range shared by every column of the
  layer, of each crossbar, or one per physical column (bit slice of one output in one row tile), set
  from the partial sums seen on calibration images drawn from the task's training split (never test
  images), as CrossSim profiles ADC inputs on calibration data (dnn/torch/calibration.py).

The clip (`chip.adc_clip`) turns the partial sums seen by one range into R: a percentile p in
(0, 100] of |partial sum| (100: the largest seen), or `mse`, the clip that minimizes the ADC's mean
squared error (rounding plus saturation) over what was seen -- CrossSim optimizes its clip for the
same error; here over a grid of MSE_CANDIDATES clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xbar.errors import UserError

ADC_RANGES = ("full", "per_layer", "per_crossbar", "per_column")
MSE_CANDIDATES = 64  # clips tried by the `mse` rule: k / 64 of the largest partial sum seen, k = 1 .. 64
CALIBRATION_IMAGES = 256  # default calibration images per task (chip.calibration_images)


def check_clip(clip: object, field: str = "adc_clip") -> float | str:
    """A percentile in (0, 100] or "mse"; anything else -> one-line UserError naming `field`."""
    if clip == "mse":
        return clip
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip <= 100:
        raise UserError(f"{field}: expected a percentile in (0, 100] or mse, got {clip!r}")
    return float(clip)


@dataclass(frozen=True)
class AdcConfig:
    """The periphery: ADC bits, the range rule and its clip, and the signed-weight scheme."""

    bits: int = 5
    range: str = "per_column"
    signed: str = "offset"
    clip: float | str = 100.0  # calibrated ranges: percentile of |partial sums|, or "mse"

    def check(self) -> AdcConfig:
        from xbar.crossbar import check_scheme

        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise UserError(f"adc_bits: expected an integer in 1..16, got {self.bits!r}")
        if self.range not in ADC_RANGES:
            raise UserError(f"adc_range: {self.range!r} is not an ADC range rule (one of {', '.join(ADC_RANGES)})")
        check_clip(self.clip)
        check_scheme(self.signed)
        return self

    @property
    def calibrated(self) -> bool:
        return self.range != "full"

    @property
    def rule(self) -> str:
        """How the range is set, in words every chip result prints."""
        return self.range if not self.calibrated else f"{self.range} (clip {self.clip})"

    @property
    def top_code(self) -> int:
        """Largest ADC code: unsigned where the column holds unsigned levels, symmetric signed for differential."""
        return 2**self.bits - 1 if self.signed != "differential" else 2 ** (self.bits - 1) - 1


def adc_step(r: torch.Tensor, top: int) -> torch.Tensor:
    """Step of ADCs of range `r` (level units) and `top` codes (module rule)."""
    step = r.float().clamp_min(1e-6) / max(top, 1)
    fine = torch.exp2(torch.ceil(torch.log2(step)))  # a power-of-two fraction covering r
    return torch.where(step >= 1, step, fine)


def quantize(values: torch.Tensor, step: torch.Tensor, lowest: int, top: int) -> torch.Tensor:
    """What the ADC reads back for `values` (level units)."""
    return (values / step).round().clamp(lowest, top) * step


def clip_ranges(hist: torch.Tensor, clip: float | str, top: int) -> torch.Tensor:
    """Range per unit from `hist` [units, bins] (counts of |partial sum| rounded to whole levels): the
    percentile of what was seen, or the MSE-optimal clip. A unit that saw nothing gets range 1."""
    hist = hist.double()
    bins = torch.arange(hist.shape[1], dtype=torch.float64)
    total = hist.sum(1, keepdim=True).clamp_min(1)
    if clip != "mse":
        cdf = hist.cumsum(1) / total
        return (cdf < float(clip) / 100 - 1e-12).sum(1).float().clamp_min(1.0)
    seen = torch.where(hist > 0, bins, torch.zeros_like(bins)).amax(1).clamp_min(1.0)  # the largest |psum|
    best, best_err = seen.clone(), torch.full_like(seen, math.inf)
    for k in range(1, MSE_CANDIDATES + 1):
        r = seen * k / MSE_CANDIDATES
        step = adc_step(r, top).double().unsqueeze(1)
        err = (hist * (quantize(bins.unsqueeze(0), step, 0, top) - bins) ** 2).sum(1)
        better = err < best_err - 1e-12
        best, best_err = torch.where(better, r, best), torch.where(better, err, best_err)
    return best.float()
