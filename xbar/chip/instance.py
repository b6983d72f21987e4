"""Chip instances: one seeded physical chip, what its cells hold, and how re-programming changes them.

A `ChipInstance(seed, device, mapping)` is one chip off the line. Its seed fixes,
for every cell, the stuck-at faults and the programming error of each
programming of it (so two runs of one instance agree cell for cell):

* the backbone PEs are programmed once, at deployment (generation 0);
* a task's **spare PEs** are programmed each time the chip switches to the
  task: `program_pe(pe)` counts one more programming and draws fresh error for
  every cell of that spare PE, so an earlier task run again on the chip may
  see different cells than when it was learned (device-caused forgetting; the
  algorithm itself forgets nothing);
* a method that rewrites backbone cells (fine-tuning, Piggyback's masked-out
  weights set to the zero level) re-programs them in place: `program_pe(pe,
  spare=False)`, and only the rewritten cells get fresh error (the chip writes
  only cells whose level changes, xbar.chip.deployment).

Simplification: the spare PE standing in for backbone PE p always sits in the
same physical slot (its stuck faults are drawn per (spare, p)); the slot
assignment of xbar.chip.deployment, which re-uses slots to save writes, is not
replayed here. Every cell is read `time_s` seconds after its programming.

Signed weights (`signed`, xbar.crossbar): `offset` and `offset_ref` store u = w + L over the
spec's cells (`offset_ref` also holds a reference weight L per row tile, `reference_cells`);
`differential` stores max(w, 0) and max(-w, 0) on a positive and a negative array.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch

from xbar.chip.devices import DevicePreset
from xbar.crossbar import SCHEMES, CrossbarSpec, LayerMap, Mapping, check_scheme
from xbar.errors import UserError

__all__ = ["SCHEMES", "ChipInstance", "LayerCells", "check_scheme", "target_cells"]

MAX_VERIFY_WRITES = 16  # program-and-verify gives up after this many writes of a cell (ours; the last error stays)


def target_cells(levels: torch.Tensor, spec: CrossbarSpec, signed: str | None = None) -> torch.Tensor:
    """Cell levels the chip programs for integer weight `levels`: [arrays, *shape, slices], MSB cell first;
    one array (offset, offset_ref) or two (differential: positive, negative). `signed`: the spec's scheme
    unless given."""
    spec = spec if signed is None else replace(spec, signed=check_scheme(signed))
    cells = spec.cell_levels(levels.round().to(torch.int64)).to(torch.int64)
    if spec.signed != "differential":
        return cells.unsqueeze(0)
    return cells.unflatten(-1, (2, spec.slices)).movedim(-2, 0)


@dataclass
class LayerCells:
    """What one layer's cells hold on a chip instance, in level units above g_min."""

    levels: torch.Tensor  # float [arrays, *weight shape, cells]
    drift_gain: float = 1.0  # global drift compensation: multiplies the digitized partial sums


class ChipInstance:
    """One seeded chip: fixed stuck-at faults, programming error drawn per programming of each PE."""

    def __init__(self, seed: int, device: DevicePreset, mapping: Mapping, time_s: float = 0.0,
                 verify: float = 0.0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"chip instance seed: expected an integer >= 0, got {seed!r}")
        if isinstance(verify, bool) or not isinstance(verify, int | float) or not verify >= 0:
            raise UserError(f"chip.verify_tolerance: expected a tolerance >= 0 levels (0: no verify), got {verify!r}")
        self.verify = float(verify)  # program-and-verify: rewrite a cell until |error| <= verify levels
        self.verify_writes = 0  # re-writes the verify loop made in cells programmed for a task (spare, rewritten)
        if not (isinstance(time_s, int | float) and math.isfinite(time_s) and time_s >= 0):
            raise UserError(f"chip time: expected seconds >= 0, got {time_s!r}")
        self.seed, self.device, self.mapping, self.time_s = seed, device, mapping, float(time_s)
        self.programmed: dict[tuple[str, int], int] = {}  # (place, pe) -> programmings after deployment
        self.read = torch.Generator().manual_seed(self._key("read", "", 0, 0))  # read noise: one stream per chip

    # --- programming -------------------------------------------------------------------

    def program_pe(self, pe: int, spare: bool = True) -> int:
        """Program PE `pe` (its spare PE, or in place) once more: fresh programming error; returns the count."""
        key = ("spare" if spare else "backbone", int(pe))
        self.programmed[key] = self.programmed.get(key, 0) + 1
        return self.programmed[key]

    def generation(self, pe: int, spare: bool = True) -> int:
        return self.programmed.get(("spare" if spare else "backbone", int(pe)), 0)

    # --- draws -------------------------------------------------------------------------

    def _key(self, kind: str, place: str, pe: int, gen: int) -> int:
        digest = hashlib.sha256(f"{self.seed}/{kind}/{place}/{pe}/{gen}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def _draw(self, kind: str, place: str, pe_of: torch.Tensor, gens: dict[int, int], cells: tuple[int, int],
              uniform: bool = False) -> torch.Tensor:
        """One seeded draw per PE: [arrays, n weights, cells] for the weights whose PE is pe_of (flat)."""
        arrays, k = cells
        out = torch.empty(arrays, pe_of.numel(), k)
        for pe in pe_of.unique().tolist():
            where = (pe_of == pe).nonzero().squeeze(1)
            g = torch.Generator().manual_seed(self._key(kind, place, pe, gens.get(pe, 0)))
            shape = (arrays, where.numel(), k)
            out[:, where] = torch.rand(shape, generator=g) if uniform else torch.randn(shape, generator=g)
        return out

    # --- the cells ---------------------------------------------------------------------

    def layer_cells(self, lm: LayerMap, targets: torch.Tensor, spare: torch.Tensor | None = None,
                    rewritten: torch.Tensor | None = None) -> LayerCells:
        """The cells of layer `lm` holding `targets` ([arrays, *shape, cells], from `target_cells`).

        `spare`: bool, weight shape: the weight sits in one of the task's spare PEs.
        `rewritten`: bool, weight shape: a backbone cell re-programmed in place for the task.
        """
        dev, top = self.device, 2**lm.spec.cell_bits - 1
        levels = targets.float()
        if dev.ideal:
            return LayerCells(levels)
        arrays, k = targets.shape[0], targets.shape[-1]
        flat = targets.reshape(arrays, -1, k)
        pe_of = lm.index_tensors()[1].reshape(-1)
        n = pe_of.numel()
        spare = torch.zeros(n, dtype=torch.bool) if spare is None else spare.reshape(-1)
        rewritten = torch.zeros(n, dtype=torch.bool) if rewritten is None else rewritten.reshape(-1) & ~spare
        pes = pe_of.unique().tolist()
        spare_gen = {p: self.generation(p, True) for p in pes}
        back_gen = {p: self.generation(p, False) for p in pes}

        def draws(kind: str, uniform: bool = False) -> torch.Tensor:
            z = self._draw(kind, "backbone", pe_of, {}, (arrays, k), uniform)
            if bool(rewritten.any()):
                z = torch.where(rewritten[None, :, None], self._draw(kind, "backbone", pe_of, back_gen, (arrays, k),
                                                                     uniform), z)
            if bool(spare.any()):
                z = torch.where(spare[None, :, None], self._draw(kind, "spare", pe_of, spare_gen, (arrays, k),
                                                                 uniform), z)
            return z

        stuck = None
        if dev.stuck_low or dev.stuck_high:  # faults belong to the physical cell: no generation
            stuck = self._draw("stuck", "backbone", pe_of, {}, (arrays, k), True)
            if bool(spare.any()):  # a spare slot's faults are its own
                stuck = torch.where(spare[None, :, None], self._draw("stuck", "spare", pe_of, {}, (arrays, k), True),
                                    stuck)
        lv, gain, writes = self._effects(flat, draws, stuck, top)
        if writes is not None:  # what programming the task's cells cost the verify loop (the backbone: once)
            self.verify_writes += int(writes[:, spare | rewritten].sum())
        return LayerCells(lv.reshape(targets.shape), gain)

    def reference_cells(self, name: str, targets: torch.Tensor, top: int) -> torch.Tensor:
        """Cells of layer `name`'s reference columns (offset_ref) holding `targets`, programmed once with
        the backbone (a spare PE's reference columns are not re-drawn: a simplification)."""
        if self.device.ideal:
            return targets.float()
        g = torch.Generator().manual_seed(self._key("reference", name, 0, 0))
        stuck = torch.rand(targets.shape, generator=g)
        lv, _, _ = self._effects(targets, lambda kind: torch.randn(targets.shape, generator=g), stuck, top)
        return lv

    def _effects(self, targets: torch.Tensor, draws, stuck_u: torch.Tensor | None, top: int):  # noqa: ANN001
        """Programming error, stuck cells, drift and relaxation on cells programmed to `targets`; the
        draws come from `draws(kind)` (standard normal, the targets' shape) and `stuck_u` (uniform)."""
        dev = self.device
        lv, writes = targets.float(), None
        if any(dev.prog_sigma) and dev.noise_scale:
            sigma = dev.sigma_levels(targets, top)
            err = sigma * draws("program")
            if self.verify:  # program-and-verify: re-write each cell off by more than the tolerance
                writes = torch.zeros(err.shape, dtype=torch.int32)
                for i in range(1, MAX_VERIFY_WRITES):
                    bad = err.abs() > self.verify
                    if not bool(bad.any()):
                        break
                    writes += bad
                    err = torch.where(bad, sigma * draws(f"program{i}"), err)
            lv = (lv + err).clamp(0, top)
        stuck = None
        if stuck_u is not None and (dev.stuck_low or dev.stuck_high):
            stuck = (stuck_u < dev.stuck_low, stuck_u >= 1 - dev.stuck_high)
            lv = self._stick(lv, stuck, top)
        gain = 1.0
        if self.time_s > dev.drift_t0 and (dev.drift_nu or dev.relax_mean or dev.relax_sigma0 or any(dev.relax_sigma)):
            log_t = math.log(self.time_s / dev.drift_t0)
            before = lv
            lv = lv * (self.time_s / dev.drift_t0) ** -dev.drift_nu + dev.relax_mean * log_t * top
            spread = dev.relax_levels(targets, top, log_t)  # level-dependent, from the target level
            if bool((spread > 0).any()):
                lv = lv + spread * draws("relax")
            lv = lv.clamp(0, top)
            if stuck is not None:
                lv = self._stick(lv, stuck, top)
            if dev.drift_compensation and float(lv.sum()) > 0:
                gain = float(before.sum() / lv.sum())  # a reference read (all rows on) then and now
        return lv, gain, writes

    @staticmethod
    def _stick(lv: torch.Tensor, stuck: tuple[torch.Tensor, torch.Tensor], top: int) -> torch.Tensor:
        low, high = stuck
        return torch.where(low, 0.0, torch.where(high, float(top), lv))
