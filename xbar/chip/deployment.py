"""The deployment state of the chip: what every cell holds, and what changing it costs.

The chip has the backbone's PEs (`mapping.n_pes`, in mapping order) and a fixed
number of physical **spare PEs** after them. Each PE is `crossbars_per_pe`
crossbars of rows x cols cells; a weight's cells sit at a physical position
(crossbar, row, column) given by the mapping, so two PEs' contents can be
compared cell by cell.

* Backbone PEs hold the backbone's levels (levels.pt). Mask methods never
  rewrite them; fine-tuning rewrites them with its own levels, Piggyback sets
  the cells of masked-out weights to the zero weight's levels.
* A spare PE holds the weights of one PE of some task (xma2), or nothing
  (blank: all cells at level 0).
* The mask buffers hold one task's column masks.

`program(chip, image)` brings the chip to a task's `TaskImage`, writing only
the cells whose level differs from what is already there. A task's spare PEs
are assigned to physical spare PEs so that the fewest level steps are written
(HA3M's idea: re-use programmed weights -- a spare PE holding an earlier
version of the same PE is the cheap place for it), among the spare PEs that
no other live task holds: a task evicts another's spare PE only when the
blank, stale and its own ones run out (`assign_slots`). Every written cell's write
count goes up by one (endurance). Switching back to an earlier task, e.g. to
evaluate it, is the same operation.

`chip_files` / `load_chip`: a small JSON (slots, which image the backbone PEs
hold, digests of the mapping and backbone the chip was made for) plus a tensor
file with the levels and write counts of every PE that differs from the
freshly deployed chip.
"""


from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from xbar.chip.image import BACKBONE, TaskImage, task_image
from xbar.chip.layout import ChipLayout, levels_digest
from xbar.crossbar import CrossbarSpec
from xbar.energy.presets import EnergyPreset
from xbar.energy.reprogramming import level_pulses, write_energy
from xbar.errors import UserError

FORMAT = 1


@dataclass
class Chip:
    """Cell levels and write counts of every physical PE: the backbone PEs, then the spare PEs."""

    spec: CrossbarSpec
    mapping_digest: str
    backbone_digest: str
    n_pes: int
    n_slots: int
    levels: torch.Tensor  # uint8 [n_pes + n_slots, cells_per_pe]
    writes: torch.Tensor  # int32, same shape: times each cell was re-programmed since deployment
    original: torch.Tensor  # uint8 [n_pes, cells_per_pe]: the backbone as deployed (not saved)
    slots: list[dict | None]  # per spare PE: {"task", "pe"} it holds, or None (blank)
    backbone_key: str = BACKBONE  # which image the backbone PEs hold
    serving: str | None = None  # the task the chip is set up for
    masks: str | None = None  # whose column masks sit in the mask buffers
    buffer: dict[str, torch.Tensor] = field(default_factory=dict)  # their codes by layer (not saved: reloaded)
    history: list[dict] = field(default_factory=list)  # one summary per programming event

    def endurance(self) -> dict:
        """Writes per cell so far: max and mean over every cell of the chip, mean over cells written."""
        w = self.writes
        written = int((w > 0).sum())
        return {"max_writes_per_cell": int(w.max()) if w.numel() else 0,
                "mean_writes_per_cell": float(w.float().mean()) if w.numel() else 0.0,
                "mean_writes_per_written_cell": float(w.sum()) / written if written else 0.0,
                "cells_ever_written": written, "cells": int(w.numel())}


def new_chip(layout: ChipLayout, backbone_levels: dict[str, torch.Tensor], n_slots: int) -> Chip:
    """The freshly deployed chip: backbone PEs hold the backbone, `n_slots` blank spare PEs."""
    if n_slots < 0:
        raise UserError(f"spare PEs: expected a count >= 0, got {n_slots}")
    original = layout.image(backbone_levels)
    cpe = layout.spec.cells_per_pe
    levels = torch.cat([original, torch.zeros(n_slots, cpe, dtype=torch.uint8)])
    return Chip(layout.spec, layout.digest, levels_digest(backbone_levels), layout.mapping.n_pes, n_slots,
                levels, torch.zeros(levels.shape, dtype=torch.int32), original, [None] * n_slots)


def _steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.int16) - b.to(torch.int16)).abs()


def _pairwise_steps(targets: torch.Tensor, care: torch.Tensor, slots: torch.Tensor, levels: int) -> np.ndarray:
    """Level steps between every target and every slot content over the target's cells (`care`):
    sum_c care_c |t_c - s_c| = sum over thresholds k of the disagreements of [t >= k] and [s >= k]
    (matmuls, one per k)."""
    cost = torch.zeros(len(targets), len(slots), dtype=torch.float64)
    u = care.double()
    for k in range(1, levels):
        t, s = ((targets >= k) & care).double(), (slots >= k).double()
        cost += t.sum(1, keepdim=True) + u @ s.T - 2 * t @ s.T
    return cost.round().numpy()


def assign_slots(targets: torch.Tensor, care: torch.Tensor, slots: torch.Tensor, levels: int,
                 taken: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HA3M-style placement: the spare PE (slot) for each target minimising the total level steps
    written over the targets' cells, first among the slots not `taken` (bool per slot: another live
    task's spare PE). Returns (slot of each target, the cost matrix in level steps)."""
    from scipy.optimize import linear_sum_assignment

    cost = _pairwise_steps(targets, care, slots, levels)
    # an eviction costs more than any placement without one: the fewest evictions, then the fewest steps
    penalty = np.zeros(len(slots)) if taken is None else taken.numpy() * (cost.sum() + 1.0)
    rows, cols = linear_sum_assignment(cost + penalty[None, :])
    order = np.empty(len(targets), dtype=np.int64)
    order[rows] = cols
    return order, cost


@dataclass(frozen=True)
class ProgramReport:
    """One programming event: per physical PE written (table) and totals."""

    rows: pl.DataFrame  # phase, task, kind, pe, slot, cells_used, cells_written, level_steps, pulses, energy_j
    summary: dict


ROW_SCHEMA = {"phase": pl.String, "task": pl.String, "kind": pl.String, "pe": pl.Int64, "slot": pl.Int64,
              "cells_used": pl.Int64, "cells_written": pl.Int64, "level_steps": pl.Int64, "pulses": pl.Float64,
              "energy_j": pl.Float64}


def program(chip: Chip, image: TaskImage, preset: EnergyPreset, used: torch.Tensor,
            phase: str = "program", live: frozenset[str] = frozenset()) -> ProgramReport:
    """Bring `chip` to `image`, writing only the cells that change; the spare PEs of the `live` tasks
    (learned and still served) are evicted only when no other spare PE is left.

    `used` (ChipLayout.used: bool [n_pes, cells_per_pe]) marks the cells that hold a weight. Only
    those matter: a cell outside them sits in a row that gets no input or a column that is not
    converted, so a spare PE keeps whatever an earlier occupant left there.
    """
    rows: list[dict] = []
    n_pes = chip.n_pes

    def write(physical: int, target: torch.Tensor, care: torch.Tensor, kind: str, pe: int, slot: int | None) -> None:
        current = chip.levels[physical]
        changed = (current != target) & care
        steps = int(_steps(current, target)[care].sum())
        if steps or kind == "spare":
            pulses = level_pulses(steps, preset)
            rows.append({"phase": phase, "task": image.task, "kind": kind, "pe": pe, "slot": slot,
                         "cells_used": int(care.sum()), "cells_written": int(changed.sum()), "level_steps": steps,
                         "pulses": pulses, "energy_j": write_energy(pulses, preset)})
        if steps:
            chip.levels[physical] = torch.where(care, target, current)
            chip.writes[physical] += changed.to(torch.int32)

    # backbone PEs: only when they hold another image than the one the task needs
    if chip.backbone_key != image.backbone_key:
        target = chip.original if image.backbone is None else image.backbone
        differ = ((chip.levels[:n_pes] != target) & used).any(1).nonzero().flatten().tolist()
        for p in differ:
            write(p, target[p], used[p], "backbone", p, None)
        chip.backbone_key = image.backbone_key

    # spare PEs: place the task's spare PEs where they cost the fewest level steps
    saving = {}
    if image.spares:
        pes = sorted(image.spares)
        if len(pes) > chip.n_slots:
            raise UserError(f"task {image.task}: needs {len(pes)} spare PEs, the chip has {chip.n_slots} "
                            "(the chip was built for a smaller spare_ratio: re-run from the first task)")
        targets = torch.stack([image.spares[p] for p in pes])
        held = [None if s is None else s.get("pe") for s in chip.slots]  # which PE each spare PE held before
        care = used[pes]
        taken = torch.tensor([s is not None and s["task"] != image.task and s["task"] in live for s in chip.slots])
        order, cost = assign_slots(targets, care, chip.levels[n_pes:], 2**chip.spec.cell_bits, taken)
        in_order = float(cost[np.arange(len(pes)), np.arange(len(pes))].sum())  # spare PE i -> slot i
        for i, p in enumerate(pes):
            slot = int(order[i])
            write(n_pes + slot, targets[i], care[i], "spare", p, slot)
            chip.slots[slot] = {"task": image.task, "pe": p}
        spare_rows = [r for r in rows if r["kind"] == "spare"]
        cells_in = sum(r["cells_used"] for r in spare_rows)
        written = sum(r["cells_written"] for r in spare_rows)
        assigned = sum(r["level_steps"] for r in spare_rows)
        reused = sum(1 for i, p in enumerate(pes) if held[int(order[i])] == p)
        evicted = sum(1 for i in range(len(pes)) if bool(taken[int(order[i])]))
        saving = {"spare_pes": len(pes), "cells_in_spare_pes": cells_in, "spare_cells_written": written,
                  "cells_saved_share": 1 - written / cells_in if cells_in else 0.0,
                  "level_steps_in_order": in_order, "level_steps_assigned": assigned,
                  "steps_saved_by_placement_share": 1 - assigned / in_order if in_order else 0.0,
                  "spare_pes_reusing_same_pe": reused, "live_spare_pes_evicted": evicted}

    mask_bits = load_masks(chip, image)
    chip.serving = image.task

    table = pl.DataFrame(rows, schema=ROW_SCHEMA)
    summary = {"phase": phase, "task": image.task, "method": image.method,
               "cells_written": int(table["cells_written"].sum()), "level_steps": int(table["level_steps"].sum()),
               "pulses": float(table["pulses"].sum()), "energy_j": float(table["energy_j"].sum()),
               "backbone_cells_written": int(table.filter(pl.col("kind") == "backbone")["cells_written"].sum()),
               "mask_bits_loaded": mask_bits, "mask_load_j": mask_bits * preset.buffer_j_per_bit, **saving}
    chip.history.append({k: summary[k] for k in ("phase", "task", "cells_written", "pulses", "energy_j",
                                                 "mask_load_j")})
    return ProgramReport(table, summary)


def load_masks(chip: Chip, image: TaskImage) -> int:
    """Load `image`'s column masks into the mask buffers unless they hold them already; the bits loaded."""
    if not image.mask_bits or chip.masks == image.task:
        return 0
    chip.masks, chip.buffer = image.task, dict(image.masks)
    return image.mask_bits


SWITCH_TOTALS = ("cells_written", "level_steps", "pulses", "energy_j", "mask_bits_loaded", "mask_load_j")


@dataclass(frozen=True)
class TaskProgramming:
    """Learning one task on the chip: programming it, then the switches that evaluating every earlier
    task costs (to each in turn, and back)."""

    program: ProgramReport
    switches: list[ProgramReport]

    @property
    def switch(self) -> dict:
        """The switches' totals."""
        return {k: sum(r.summary[k] for r in self.switches) for k in SWITCH_TOTALS} | {"events": len(self.switches)}

    @property
    def reprogram_j(self) -> float:
        """The task's own re-programming: cell writes and mask load of programming it. The switches made to
        evaluate earlier tasks are the harness's, not the task's (the paper does not count them): `switch`."""
        s = self.program.summary
        return s["energy_j"] + s["mask_load_j"]

    @property
    def rows(self) -> pl.DataFrame:
        return pl.concat([r.rows for r in [self.program, *self.switches]])


def learn_on_chip(chip: Chip, layout: ChipLayout, tasks: dict[str, dict], backbone_levels: dict[str, torch.Tensor],
                  preset: EnergyPreset) -> TaskProgramming:
    """Program the last task of `tasks` (name -> task.pt, in learning order) onto `chip`, then switch the
    chip to every earlier task in turn and back to the new one; in place.

    Two tasks whose method puts the same image on the backbone PEs (finetune_shared: the latest shared
    network, that is its forgetting) switch without writing them.
    """
    names = list(tasks)

    def image(name: str) -> TaskImage:
        return task_image(name, tasks, layout, backbone_levels)

    used, task, live = layout.used(), names[-1], frozenset(names)
    programmed = program(chip, image(task), preset, used, "program", live)
    switches = [program(chip, image(earlier), preset, used, "switch", live) for earlier in names[:-1]]
    if switches:
        switches.append(program(chip, image(task), preset, used, "switch_back", live))
    return TaskProgramming(programmed, switches)


def programming_energy(events: list[dict]) -> dict[str, float]:
    """Energy of learning one task on the chip, from its programming events in a deployment state's
    history (`Chip.history`: the "program" event, then the switches for evaluation): program_j and
    switch_j, each cell writes + mask loads; reprogram_j is the task's own, program_j (TaskProgramming)."""
    program = [e for e in events if e["phase"] == "program"]
    if len(program) != 1:
        raise UserError(f"deployment history: expected one programming event for the task, found {len(program)}")
    p, switches = program[0], [e for e in events if e["phase"] != "program"]
    switch_energy, switch_masks = sum(e["energy_j"] for e in switches), sum(e["mask_load_j"] for e in switches)
    return {"program_j": p["energy_j"] + p["mask_load_j"], "switch_j": switch_energy + switch_masks,
            "reprogram_j": p["energy_j"] + p["mask_load_j"]}


# --- saving and loading ----------------------------------------------------------------------------


def _tensor_bytes(obj: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def chip_files(chip: Chip, tensors_name: str | None) -> tuple[dict, bytes | None]:
    """(JSON-ready dict, tensor-file bytes) of a chip. The tensor file holds every physical PE that
    differs from the freshly deployed chip (levels and write counts); `tensors_name` None: the chip
    must be untouched (the backbone-only chip) and there is no tensor file."""
    initial = torch.cat([chip.original, torch.zeros(chip.n_slots, chip.spec.cells_per_pe, dtype=torch.uint8)])
    touched = ((chip.levels != initial).any(1) | (chip.writes > 0).any(1)).nonzero().flatten()
    data = None
    if tensors_name is None:
        if touched.numel():
            raise ValueError("a programmed chip needs a tensor file")
    else:
        data = _tensor_bytes({"pe_ids": touched.clone(), "levels": chip.levels[touched].clone(),
                              "writes": chip.writes[touched].clone()})
    meta = {"format": FORMAT, "mapping_digest": chip.mapping_digest, "backbone_digest": chip.backbone_digest,
            "crossbar": asdict(chip.spec), "pes": chip.n_pes, "spare_pes": chip.n_slots,
            "cells_per_pe": chip.spec.cells_per_pe, "slots": chip.slots, "backbone_image": chip.backbone_key,
            "serving": chip.serving, "masks_in_buffer": chip.masks, "endurance": chip.endurance(),
            "history": chip.history, "tensors": tensors_name,
            "tensors_sha256": None if data is None else hashlib.sha256(data).hexdigest(),
            "touched_pes": int(touched.numel())}
    return meta, data


def load_chip(path: Path, layout: ChipLayout, backbone_levels: dict[str, torch.Tensor]) -> Chip:
    """Read a deployment.json (+ its tensor file) made for this mapping and backbone; else UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing (run program_spares for that task first: dvc repro)")
    try:
        meta = json.loads(path.read_text())
        digest = meta["mapping_digest"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: not a deployment state (corrupt or truncated); re-run program_spares") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: deployment format {meta.get('format')!r}, this xbar reads {FORMAT}; "
                        "re-run program_spares")
    if digest != layout.digest:
        raise UserError(f"{path}: made for another crossbar mapping (digest {digest[:12]}, this one "
                        f"{layout.digest[:12]}); re-run program_spares from the first task")
    if meta.get("backbone_digest") != levels_digest(backbone_levels):
        raise UserError(f"{path}: made for another backbone (levels.pt changed); "
                        "re-run program_spares from the first task")
    chip = new_chip(layout, backbone_levels, int(meta["spare_pes"]))
    if meta.get("tensors"):
        tensors = path.parent / meta["tensors"]
        if not tensors.exists():
            raise UserError(f"{tensors}: missing (it belongs to {path}); re-run program_spares")
        data = tensors.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
            raise UserError(f"{tensors}: does not belong to {path} (digest differs); re-run program_spares")
        try:
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            ids = t["pe_ids"].to(torch.int64)
            chip.levels[ids] = t["levels"]
            chip.writes[ids] = t["writes"]
        except (RuntimeError, KeyError, IndexError) as err:
            raise UserError(f"{tensors}: unreadable deployment tensors ({type(err).__name__}); "
                            "re-run program_spares") from None
    chip.slots = list(meta["slots"])
    # the mask buffers' contents are not saved: the next task to run loads its masks (a new task does anyway)
    chip.backbone_key, chip.serving, chip.masks = meta["backbone_image"], meta["serving"], None
    chip.history = list(meta.get("history", []))
    return chip
