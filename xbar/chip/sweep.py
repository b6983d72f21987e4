"""The chip in the comparison: every task of a configuration on the chip after its last task.

`chip_rows(params, tasks, levels, data, plan)` evaluates the tasks (task.pt contents, in learning
order) with `xbar.chip.evaluate.evaluate_tasks`, as `xbar chip` does, at:

* **column**: the paper's 5-bit ADC with params.yaml's device (chip.device, else energy.preset's):
  the comparison's chip column;
* with `plan.sweeps`, three sweeps of one quantity each, the rest held at the column's setting:
  `adc_bits` (4..8), `noise` (the device's `noise_scale`: every sigma multiplied; 0 leaves the ADC
  alone) and `time` (seconds since programming: drift and relaxation).

Cost: the chip forward is ~12x the ideal one on these CPUs (benchmarks/chip_speed.py), so the
comparison runs `plan.instances` chips (default 5, a 95% CI over them) on a seeded subset of
`plan.images` test images per task (default 1000, enough for the CI's image part to stay well under 3
points; the ideal accuracy is reported on the same images, `ideal`). Settings that
coincide (the column and the 5-bit point of the ADC sweep) are evaluated once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl
import torch
from torch.utils.data import Subset

from xbar.chip.evaluate import chip_settings, evaluate_tasks
from xbar.errors import UserError

PAPER_ADC_BITS = 5  # the paper's SAR ADC per column (section 5.2)
CHIP_SCHEMA = {"label": pl.String, "task": pl.String, "sweep": pl.String, "x": pl.Float64, "device": pl.String,
               "adc_bits": pl.Int64, "noise_scale": pl.Float64, "time_s": pl.Float64, "instances": pl.Int64,
               "images": pl.Int64, "adc_range": pl.String, "signed": pl.String, "ideal": pl.Float64,
               "chip_mean": pl.Float64, "chip_ci": pl.Float64, "chip_std": pl.Float64, "chip_min": pl.Float64}
SWEEPS = ("adc_bits", "noise", "time")


@dataclass(frozen=True)
class ChipPlan:
    """What the comparison measures on the chip (`instances` 0: nothing)."""

    instances: int = 5  # a 95% CI over chip instances (DESIGN: >= 5)
    images: int | None = 1000  # test images per task (a seeded subset); None: the whole test split
    sweeps: bool = False
    adc_bits: tuple[int, ...] = (4, 5, 6, 7, 8)
    noise_scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    times_s: tuple[float, ...] = (0.0, 3600.0, 86400.0, 30 * 86400.0, 365 * 86400.0)  # now .. a year

    def check(self) -> ChipPlan:
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) or self.instances < 0:
            raise UserError(f"chip instances: expected an integer >= 0 (0: no chip column), got {self.instances!r}")
        if self.images is not None and (isinstance(self.images, bool) or not isinstance(self.images, int)
                                        or self.images < 1):
            raise UserError(f"chip images: expected a number of test images >= 1, got {self.images!r}")
        return self


def subset_of(data, images: int | None, seed: int):  # noqa: ANN001, ANN201 (TaskData)
    """`data` with its test split cut to a seeded subset of `images` images (all of them when None or more)."""
    if images is None or images >= len(data.test):
        return data
    idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed))[:images].sort().values
    return replace(data, test=Subset(data.test, idx.tolist()))


def chip_rows(params, label: str, tasks: dict[str, dict], levels: dict, data: dict,  # noqa: ANN001 (Params)
              plan: ChipPlan) -> pl.DataFrame:
    """One row per (sweep point, task): ideal and chip accuracy (%) on the subset, CHIP_SCHEMA."""
    plan.check()
    if not plan.instances:
        return pl.DataFrame(schema=CHIP_SCHEMA)
    subset = {n: subset_of(d, plan.images, params.seed) for n, d in data.items()}
    device, adc = chip_settings(params, adc_bits=PAPER_ADC_BITS)
    time_s = params.chip.time_s
    points = [("column", float(PAPER_ADC_BITS), PAPER_ADC_BITS, device.noise_scale, time_s)]
    if plan.sweeps:
        points += [("adc_bits", float(b), b, device.noise_scale, time_s) for b in plan.adc_bits]
        points += [("noise", s, PAPER_ADC_BITS, s, time_s) for s in plan.noise_scales]
        points += [("time", t, PAPER_ADC_BITS, device.noise_scale, t) for t in plan.times_s]
    done: dict[tuple, dict] = {}
    rows = []
    for sweep, x, bits, scale, t in points:
        key = (bits, scale, t)
        if key not in done:
            dev = replace(device, noise_scale=scale).check()
            done[key] = evaluate_tasks(params, tasks, levels, subset, dev, replace(adc, bits=bits), plan.instances, t)
        for task, r in done[key].items():
            rows.append({"label": label, "task": task, "sweep": sweep, "x": x, "device": device.name,
                         "adc_bits": bits, "noise_scale": scale, "time_s": t, "instances": plan.instances,
                         "images": len(subset[task].test), "adc_range": adc.rule, "signed": adc.signed,
                         "chip_ci": r.get("chip_ci", float("nan")),  # nan: one instance, no interval
                         **{k: r[k] for k in ("ideal", "chip_mean", "chip_std", "chip_min")}})
    return pl.DataFrame(rows, schema=CHIP_SCHEMA)
