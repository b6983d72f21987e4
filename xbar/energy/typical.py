"""Typical cell changes of each method, for an architecture without a trained task.

`typical_methods` estimates all five methods on an architecture alone (the
`xbar energy` command), from documented typical cell changes (TYPICAL), counted
as an energy scenario says (xbar.energy.scenarios: steady, first-task, paper).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from xbar.crossbar import CrossbarSpec, Mapping, spare_pe_count
from xbar.energy.inference import buffer_energy, component_energy, crossbar_use
from xbar.energy.layer_io import LayerIO
from xbar.energy.presets import EnergyPreset
from xbar.energy.reprogramming import level_pulses, write_energy
from xbar.energy.scenarios import FIRST_TASK, STEADY, EnergyScenario
from xbar.errors import UserError
from xbar.memory import fullest_pes, mask_bits_for
from xbar.methods import Method, get, names


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
      `spare_change_share` by its own task's training (a spare PE re-using a slot that held the same PE);
    * `trained`: a backbone weight moved by +-1 level with probability `spare_change_share` (a spare PE
      that held a copy of the backbone PE it replaces).
    """
    n = 2 * spec.weight_levels + 1
    zero = spec.weight_levels  # index of level 0
    blank = torch.zeros(n, n, dtype=torch.float64)
    blank_level = int((spec.cell_levels(torch.arange(-spec.weight_levels, spec.weight_levels + 1)).sum(1) == 0)
                      .nonzero()[0])  # "old" = cells all at level 0: -L offset-encoded, 0 differential
    blank[:, blank_level] = p
    to_zero = torch.zeros(n, n, dtype=torch.float64)
    to_zero[:, zero] = p
    move = _nudge(spec, spare_change_share)
    same_pe = (move.T * p[None, :]) @ move  # sum over the backbone level b of P(a | b) p(b) P(c | b)
    return {
        "redraw": _expected(spec, p[:, None] * p[None, :]),
        "from_blank": _expected(spec, blank.T),
        "to_zero": _expected(spec, to_zero),
        "same_pe": _expected(spec, same_pe),
        "trained": _expected(spec, p[:, None] * move),
    }


def typical_methods(mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset, act_bits: int = 4,
                    spare_ratio: float = 0.1, inferences: int = 1, shift_levels: int = 3,
                    typical: TypicalChanges = TYPICAL, scenario: EnergyScenario = STEADY) -> dict:
    """Every registered method (except those that continue a shared network: one fine-tuned copy per
    task stands for fine-tuning) on an architecture alone, for one new task, its writes counted as
    `scenario` says (default: steady, a chip that served the previous task of the same method), from the
    method's registry flags: what it rewrites (every weight, masked-out weights, spare PEs) and its masks;
    inference per image, re-programming, total = inferences x inference + re-programming.

    Returns {"scenario", "ratios", "methods": {name: {...}}, "assumptions": {...}} (the `xbar energy
    --json` object); the assumptions include the first task (from the backbone-only chip, blank spare PEs)
    for comparison.
    """
    if isinstance(inferences, bool) or not isinstance(inferences, int) or inferences < 1:
        raise UserError(f"--inferences: expected a positive integer, got {inferences!r}")
    typical.check()
    methods_modelled = [get(n) for n in names() if not get(n).continues_previous]
    spec = mapping.spec
    n_spare = spare_pe_count(spare_ratio, mapping.n_pes)  # spare_ratio: checked by xbar.params (SpareRatio)
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

    def per_image(method: Method) -> float:
        if not method.column_masks:
            return sum(float(v.sum()) for v in base.values()) + buffers
        mask_frozen = frozen if method.spare_pes else np.ones_like(frozen)
        scale = np.where(mask_frozen, on, 1.0)  # columns (and their cells) switched off
        bits = mask_bits_for(method.mask_shift_levels(shift_levels) + 2)
        e = base["cells_j"] * scale + (base["adc_j"] + base["shift_add_j"]) * scale + base["interconnect_j"]
        mask = use.positions * np.where(mask_frozen, use.active_columns, 0) * bits * preset.mask_read_j_per_bit
        return float(e.sum() + mask.sum()) + buffers

    def writes(st: ChangeStats, weights: float) -> tuple[float, float]:
        return weights * st.cells, weights * st.steps

    spare_stats = {"ha3m": ChangeStats(h * stats["same_pe"].cells + (1 - h) * stats["redraw"].cells,
                                       h * stats["same_pe"].steps + (1 - h) * stats["redraw"].steps),
                   "blank": stats["from_blank"], "backbone_copies": stats["trained"]}
    finetune_stats = {"requantize": stats["redraw"], "redeploy": stats["from_blank"]}

    def changes(method: Method, how: EnergyScenario) -> tuple[float, float]:
        """(cells written, level steps) of the new task, counted as the scenario `how` says."""
        if method.trains_all:
            return writes(finetune_stats[how.finetune], n_w)
        trips = 2 if how.round_trip else 1  # to the task, and back to the deployed state
        if method.element_masks:  # zero the new mask's; on a switch, restore the old mask's as well
            return writes(stats["to_zero"], trips * (n_w * m if how.piggyback == "zero" else n_w * 2 * m * (1 - m)))
        if method.spare_pes:
            return writes(spare_stats[how.spare_pes], trips * spare_weights)
        return 0.0, 0.0  # masks live in the mask buffers only

    def table(how: EnergyScenario) -> dict[str, dict]:
        out = {}
        for method in methods_modelled:
            image = per_image(method)
            cells, steps = changes(method, how)
            name = method.name
            pulses = level_pulses(steps, preset)
            reprogram = write_energy(pulses, preset)
            out[name] = {"inference_j": image * inferences, "reprogram_j": reprogram,
                         "total_j": image * inferences + reprogram, "cells_written": int(round(cells)),
                         "inference_per_image_j": image, "pulses": pulses}
        return out

    def ratios(t: dict[str, dict]) -> dict[str, float]:  # the paper's three claims, by its methods' names
        return {"finetune_over_xma2": t["finetune_separate"]["total_j"] / t["xma2"]["total_j"],
                "piggyback_over_xma2": t["piggyback"]["total_j"] / t["xma2"]["total_j"],
                "piggyback_total_over_inference": t["piggyback"]["total_j"] / t["piggyback"]["inference_j"]}

    methods, first_task = table(scenario), table(FIRST_TASK)
    assumptions = {
        "preset": preset.name, "preset_description": preset.description,
        "constants": preset.constants, "sources": preset.source,
        "crossbar": asdict(spec), "act_bits": act_bits, "inferences": inferences,
        "pes": mapping.n_pes, "weights": n_w, "cells_used": mapping.n_cells_used,
        "spare_ratio": spare_ratio, "spare_pes": n_spare, "spare_pe_weights": spare_weights,
        "spare_pe_choice": "the fullest PEs (an upper bound of spare-PE writes; a real ranking is per task)",
        "scenario": scenario.name, "scenario_description": scenario.description,
        "scenario_assumptions": [{"assumption": a, "rests_on": why} for a, why in scenario.assumptions],
        "weight_levels": f"discrete Laplace over [-{spec.weight_levels}, {spec.weight_levels}] with "
                         f"E|level| = {typical.mean_abs_level(spec):.3f} (LSQ initial step: sqrt(L)/2)",
        **method_notes(scenario, typical),
        "column_off_share": typical.column_off_share,
        "typical_changes": asdict(typical),
        "expected_per_weight": {k: asdict(v) for k, v in stats.items()},
        "ratios": ratios(methods),
        "first_task": {"scenario": f"{FIRST_TASK.name}: {FIRST_TASK.description}; Piggyback zeroes {m:.0%} "
                                   "of weights",
                       "reprogram_j": {k: v["reprogram_j"] for k, v in first_task.items()},
                       "cells_written": {k: v["cells_written"] for k, v in first_task.items()},
                       "ratios": ratios(first_task)},
    }
    return {"scenario": scenario.name, "ratios": ratios(methods), "methods": methods, "assumptions": assumptions}


def method_notes(scenario: EnergyScenario, typical: TypicalChanges) -> dict[str, str]:
    """What each method writes under `scenario`, in words (the `xbar energy --json` assumptions)."""
    m, h, s = typical.piggyback_masked_share, typical.spare_reuse_share, typical.spare_change_share
    finetune = {"requantize": "a separate fine-tuned copy per task, re-quantized: each weight's new level "
                              "independent of the old one; only cells whose level changes are written",
                "redeploy": "a separate fine-tuned copy per task, deployed anew: every cell programmed from "
                            "the blank state (level 0), as the backbone was"}
    piggyback = {"switch": f"{m:.0%} of weights masked out (set to the zero level), masks independent between "
                           f"tasks: {2 * m * (1 - m):.0%} of weights restored or zeroed per switch",
                 "zero": f"{m:.0%} of weights masked out: set from the backbone's level to the zero level"}
    spare = {"ha3m": f"{h:.0%} of a task's spare PEs land on a spare PE holding an earlier version of the same PE "
                     f"(HA3M re-use), whose weights differ only where either task's training moved a level "
                     f"({s:.0%} of weights each); the rest land on a spare PE holding an unrelated PE",
             "blank": "every non-zero cell of the spare PEs programmed from the blank state",
             "backbone_copies": f"the spare PEs hold copies of the backbone PEs the task selects: only the weights "
                                f"its training moved ({s:.0%}, by one level) are written"}
    return {"finetune_separate": finetune[scenario.finetune], "piggyback": piggyback[scenario.piggyback],
            "xbm_xma": "column masks live in the mask buffers only: no cell is written",
            "xma2": spare[scenario.spare_pes] + "; column masks on the frozen PEs"}

