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
  only cells whose level changes, xbar.deployment).

Simplification: the spare PE standing in for backbone PE p always sits in the
same physical slot (its stuck faults are drawn per (spare, p)); the slot
assignment of xbar.deployment, which re-uses slots to save writes, is not
replayed here. Every cell is read `time_s` seconds after its programming.

Signed weights (`signed`, see xbar.chip.forward): `offset` stores u = w + L
over cells_per_weight cells; `differential` stores max(w, 0) and max(-w, 0) on a
positive and a negative array (the cell count doubles), each over
ceil((weight_bits - 1) / cell_bits) cells.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from xbar.chip.devices import DevicePreset
from xbar.crossbar import CrossbarSpec, LayerMap, Mapping
from xbar.errors import UserError

SCHEMES = ("offset", "differential")


def check_scheme(signed: str) -> str:
    if signed not in SCHEMES:
        raise UserError(f"crossbar.signed: {signed!r} is not a signed-weight scheme (one of {', '.join(SCHEMES)})")
    return signed


def magnitude_cells(spec: CrossbarSpec) -> int:
    """Cells holding one weight's magnitude (0..L) on one array of the differential scheme."""
    return math.ceil((spec.weight_bits - 1) / spec.cell_bits)


def target_cells(levels: torch.Tensor, spec: CrossbarSpec, signed: str = "offset") -> torch.Tensor:
    """Cell levels the chip programs for integer weight `levels`: [arrays, *shape, cells], MSB cell first.

    offset: one array, u = w + L in base 2**cell_bits (xbar.crossbar's encoding);
    differential: two arrays (positive, negative) holding max(w, 0) and max(-w, 0).
    """
    check_scheme(signed)
    w = levels.round().to(torch.int64)
    if signed == "offset":
        return spec.cell_levels(w).to(torch.int64).unsqueeze(0)
    base, k = 2**spec.cell_bits, magnitude_cells(spec)
    arrays = []
    for mag in (w.clamp_min(0), (-w).clamp_min(0)):
        arrays.append(torch.stack([(mag // base**i) % base for i in reversed(range(k))], -1))
    return torch.stack(arrays)


@dataclass
class LayerCells:
    """What one layer's cells hold on a chip instance, in level units above g_min."""

    levels: torch.Tensor  # float [arrays, *weight shape, cells]
    drift_gain: float = 1.0  # global drift compensation: multiplies the digitized partial sums


class ChipInstance:
    """One seeded chip: fixed stuck-at faults, programming error drawn per programming of each PE."""

    def __init__(self, seed: int, device: DevicePreset, mapping: Mapping, time_s: float = 0.0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"chip instance seed: expected an integer >= 0, got {seed!r}")
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

        lv = flat.float()
        if any(dev.prog_sigma) and dev.noise_scale:
            lv = (lv + dev.sigma_levels(flat, top) * draws("program")).clamp(0, top)
        stuck = None
        if dev.stuck_low or dev.stuck_high:
            # faults belong to the physical cell: no generation (a spare slot's faults are its own)
            u = self._draw("stuck", "backbone", pe_of, {}, (arrays, k), True)
            if bool(spare.any()):
                u = torch.where(spare[None, :, None], self._draw("stuck", "spare", pe_of, {}, (arrays, k), True), u)
            stuck = (u < dev.stuck_low, u >= 1 - dev.stuck_high)
            lv = self._stick(lv, stuck, top)
        gain = 1.0
        if self.time_s > dev.drift_t0 and (dev.drift_nu or dev.relax_mean or dev.relax_sigma0 or dev.relax_sigma):
            log_t = math.log(self.time_s / dev.drift_t0)
            before = lv
            lv = lv * (self.time_s / dev.drift_t0) ** -dev.drift_nu + dev.relax_mean * log_t * top
            spread = (dev.relax_sigma0 + dev.relax_sigma * log_t) * top * dev.noise_scale
            if spread:
                lv = lv + spread * draws("relax")
            lv = lv.clamp(0, top)
            if stuck is not None:
                lv = self._stick(lv, stuck, top)
            if dev.drift_compensation and float(lv.sum()) > 0:
                gain = float(before.sum() / lv.sum())  # a reference read (all rows on) then and now
        return LayerCells(lv.reshape(targets.shape), gain)

    @staticmethod
    def _stick(lv: torch.Tensor, stuck: tuple[torch.Tensor, torch.Tensor], top: int) -> torch.Tensor:
        low, high = stuck
        return torch.where(low, 0.0, torch.where(high, float(top), lv))
