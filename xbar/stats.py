"""Means over seeds or chip instances with their 95% confidence intervals.

A reported accuracy is the mean over independent runs (seeds, chip instances) with a
Student-t interval; a difference between two methods is the paired difference on the
same seeds, so the seed-to-seed variation they share cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from xbar.errors import UserError

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables); above 30 the
# Cornish-Fisher expansion around the normal quantile is within 1e-4 of the exact value.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class MeanCI:
    """A mean over `n` runs and the half-width of its 95% t-interval (nan for one run)."""

    mean: float
    half_width: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.2f} (n=1)"
        return f"{self.mean:.2f} ± {self.half_width:.2f} (n={self.n})"

    def as_dict(self) -> dict:
        return {"mean": round(self.mean, 4), "ci95": None if self.n < 2 else round(self.half_width, 4), "n": self.n}


def mean_ci(values: Sequence[float]) -> MeanCI:
    """Mean and 95% t-interval half-width of independent runs' values."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci of no values")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return MeanCI(mean, math.nan, 1)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return MeanCI(mean, t975(n - 1) * math.sqrt(var / n), n)


def paired_ci(a: Sequence[float], b: Sequence[float]) -> MeanCI:
    """The mean of a - b over paired runs (the same seeds or instances), with its 95% t-interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length ({len(a)} vs {len(b)})")
    return mean_ci([x - y for x, y in zip(a, b)])


def check_seeds(seeds: Sequence[int], field: str = "seeds") -> tuple[int, ...]:
    """Seeds for a reported mean: at least one, none twice (one line naming `field` otherwise)."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise UserError(f"{field}: expected at least one seed, got none")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise UserError(f"{field}: seed {twice[0]} is given twice; expected distinct seeds")
    return seeds


def check_instances(instances: int, field: str = "instances") -> int:
    """Chip instances for a reported mean with a CI: at least 2."""
    if instances < 2:
        raise UserError(f"{field}: a 95% CI needs at least 2 chip instances, got {instances}")
    return instances
