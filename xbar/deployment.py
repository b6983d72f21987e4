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
version of the same PE is the cheap place for it). Every written cell's write
count goes up by one (endurance). Switching back to an earlier task, e.g. to
evaluate it, is the same operation.

`save_chip` / `load_chip`: a small JSON (slots, which image the backbone PEs
hold, digests of the mapping and backbone the chip was made for) plus a tensor
file with the levels and write counts of every PE that differs from the
freshly deployed chip.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from xbar.crossbar import CrossbarSpec, LayerMap, Mapping
from xbar.energy import EnergyPreset, column_pes, level_pulses, mask_bits_for, write_energy
from xbar.errors import UserError

FORMAT = 1
BACKBONE = "backbone"  # the image key of the backbone's own levels
FINETUNE = ("finetune_shared", "finetune_separate")
COLUMN_MASKS = ("xbm", "xma", "xma2")


# --- where cells sit -----------------------------------------------------------------------------


def mapping_digest(mapping: Mapping) -> str:
    """sha256 of the crossbar spec and every mapped layer (name, kind, shape, groups)."""
    desc = {"spec": asdict(mapping.spec),
            "layers": [[lm.name, lm.kind, list(lm.shape), lm.groups] for lm in mapping.layers]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def levels_digest(levels: dict[str, torch.Tensor]) -> str:
    """sha256 of weight levels by layer (the backbone the chip was deployed with)."""
    h = hashlib.sha256()
    for name in sorted(levels):
        t = levels[name].to(torch.int8).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def weight_cells(lm: LayerMap) -> torch.Tensor:
    """Where each weight's cells sit: int64 [*weight shape, cells_per_weight] indices into the chip's
    flattened backbone PEs, pe * cells_per_pe + (crossbar in PE * rows + row) * cols + column."""
    spec, k = lm.spec, lm.kernel
    cout, cin_g, cpw = lm.out_channels, lm.cin_per_group, spec.cells_per_weight
    cout_g, opc = cout // lm.groups, spec.outputs_per_crossbar
    out = torch.arange(cout).view(cout, 1, 1)
    chan = torch.arange(cin_g).view(1, cin_g, 1)
    pos = torch.arange(k).view(1, 1, k)
    group, o_in_g = out // cout_g, out % cout_g
    if lm.packed:
        crossbar = group // lm.groups_per_crossbar + 0 * chan + 0 * pos
    else:
        if k <= spec.rows:
            rt = chan // (spec.rows // k) + 0 * pos
        else:
            rt = chan * math.ceil(k / spec.rows) + pos // spec.rows
        crossbar = (group * lm.row_tiles_per_group + rt) * math.ceil(cout_g / opc) + o_in_g // opc
    row_start = torch.tensor([x["row_start"] for x in lm.crossbars], dtype=torch.int64)
    out_start = torch.tensor([x["out_start"] for x in lm.crossbars], dtype=torch.int64)
    row = group * (cin_g * k) + chan * k + pos - row_start[crossbar]  # unrolled row within the crossbar
    col = (out - out_start[crossbar]) * cpw
    pe = lm.first_pe + crossbar // spec.crossbars_per_pe
    cell = ((crossbar % spec.crossbars_per_pe) * spec.rows + row) * spec.cols + col
    flat = (pe * spec.cells_per_pe + cell).reshape(*lm.shape, 1)
    return flat + torch.arange(cpw)  # bit slices in adjacent columns, MSB first


class ChipLayout:
    """The mapping's cell positions (computed per layer on first use) and images built from levels."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self.spec = mapping.spec
        self.digest = mapping_digest(mapping)
        self._cells: dict[str, torch.Tensor] = {}

    def cells(self, name: str) -> torch.Tensor:
        if name not in self._cells:
            self._cells[name] = weight_cells(self.mapping.layer(name))
        return self._cells[name]

    def image(self, levels: dict[str, torch.Tensor], pes: torch.Tensor | None = None) -> torch.Tensor:
        """Cell levels of the backbone PEs (uint8 [n_pes, cells_per_pe], blank 0 where no weight sits)
        for weight levels by layer; with `pes`, only those PEs' layers are filled in."""
        spec = self.spec
        out = torch.zeros(self.mapping.n_pes * spec.cells_per_pe, dtype=torch.uint8)
        wanted = None if pes is None else set(pes.tolist())
        for lm in self.mapping.layers:
            if wanted is not None and not wanted.intersection(range(lm.first_pe, lm.first_pe + lm.n_pes)):
                continue
            if lm.name not in levels:
                raise UserError(f"levels: no weight levels for mapped layer {lm.name}")
            w = levels[lm.name]
            if tuple(w.shape) != lm.shape:
                raise UserError(f"levels: layer {lm.name} has shape {tuple(w.shape)}, the mapping {lm.shape}")
            try:
                out[self.cells(lm.name).reshape(-1)] = spec.cell_levels(w).reshape(-1)
            except ValueError as err:
                raise UserError(f"levels: layer {lm.name}: {err}") from None
        return out.view(self.mapping.n_pes, spec.cells_per_pe)

    def used(self) -> torch.Tensor:
        """bool [n_pes, cells_per_pe]: which cells of the backbone PEs hold a weight."""
        out = torch.zeros(self.mapping.n_pes * self.spec.cells_per_pe, dtype=torch.bool)
        for lm in self.mapping.layers:
            out[self.cells(lm.name).reshape(-1)] = True
        return out.view(self.mapping.n_pes, self.spec.cells_per_pe)


# --- what a task needs on the chip ----------------------------------------------------------------


@dataclass(frozen=True)
class TaskImage:
    """What the chip must hold to run one task."""

    task: str
    method: str
    backbone_key: str  # which image the backbone PEs must hold: BACKBONE or a task's name
    backbone: torch.Tensor | None  # that image (uint8 [n_pes, cells_per_pe]); None: the backbone's own
    spares: dict[int, torch.Tensor] = field(default_factory=dict)  # backbone PE -> its spare PE's cells
    mask_bits: int = 0  # column mask bits to load into the mask buffers


def task_image(name: str, task: dict, layout: ChipLayout, backbone_levels: dict[str, torch.Tensor],
               shared_from: tuple[str, dict] | None = None) -> TaskImage:
    """The TaskImage of a task.pt (docs/artifacts.md).

    `backbone_levels`: levels.pt's levels by layer. `shared_from`: for a finetune_shared task evaluated
    after later shared tasks, (name, task.pt) of the latest one: its weights are what the task runs on.
    """
    method = task.get("method")
    mapping = layout.mapping
    if method in FINETUNE:
        key, source = (name, task) if shared_from is None else shared_from
        return TaskImage(name, method, key, layout.image(source["levels"]))
    if method == "piggyback":
        masked = {}
        for lm in mapping.layers:
            keep = task["element_masks"].get(lm.name)
            w = backbone_levels[lm.name]
            masked[lm.name] = w if keep is None else torch.where(keep.bool(), w, torch.zeros_like(w))
        return TaskImage(name, method, name, layout.image(masked))
    if method not in COLUMN_MASKS:
        raise UserError(f"task {name}: task.pt has unknown method {method!r}")
    spare = task.get("spare_pes", torch.zeros(0, dtype=torch.int64)).to(torch.int64)
    if spare.numel() and (int(spare.min()) < 0 or int(spare.max()) >= mapping.n_pes):
        raise UserError(f"task {name}: spare PE ids outside 0..{mapping.n_pes - 1} (task.pt made for another mapping)")
    spares = {}
    if spare.numel():
        image = layout.image(task["levels"], spare)
        spares = {int(p): image[int(p)].clone() for p in spare}
    frozen_columns = sum(int((~torch.isin(column_pes(lm), spare)).sum()) for lm in mapping.layers
                         if lm.name in task.get("column_masks", {}))
    bits = mask_bits_for(len(task.get("mask_values", ())))
    return TaskImage(name, method, BACKBONE, None, spares, frozen_columns * bits)


# --- the chip ---------------------------------------------------------------------------------------


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


def assign_slots(targets: torch.Tensor, care: torch.Tensor, slots: torch.Tensor,
                 levels: int) -> tuple[np.ndarray, np.ndarray]:
    """HA3M-style placement: the spare PE (slot) for each target minimising the total level steps
    written over the targets' cells. Returns (slot of each target, the cost matrix)."""
    from scipy.optimize import linear_sum_assignment

    cost = _pairwise_steps(targets, care, slots, levels)
    rows, cols = linear_sum_assignment(cost)
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
            phase: str = "program") -> ProgramReport:
    """Bring `chip` to `image`, writing only the cells that change.

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
        order, cost = assign_slots(targets, care, chip.levels[n_pes:], 2**chip.spec.cell_bits)
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
        saving = {"spare_pes": len(pes), "cells_in_spare_pes": cells_in, "spare_cells_written": written,
                  "cells_saved_share": 1 - written / cells_in if cells_in else 0.0,
                  "level_steps_in_order": in_order, "level_steps_assigned": assigned,
                  "steps_saved_by_placement_share": 1 - assigned / in_order if in_order else 0.0,
                  "spare_pes_reusing_same_pe": reused}

    mask_bits = 0
    if image.mask_bits and chip.masks != image.task:
        mask_bits = image.mask_bits
        chip.masks = image.task
    chip.serving = image.task

    table = pl.DataFrame(rows, schema=ROW_SCHEMA)
    summary = {"phase": phase, "task": image.task, "method": image.method,
               "cells_written": int(table["cells_written"].sum()), "level_steps": int(table["level_steps"].sum()),
               "pulses": float(table["pulses"].sum()), "energy_j": float(table["energy_j"].sum()),
               "backbone_cells_written": int(table.filter(pl.col("kind") == "backbone")["cells_written"].sum()),
               "mask_bits_loaded": mask_bits, "mask_load_j": mask_bits * preset.buffer_j_per_bit, **saving}
    chip.history.append({k: summary[k] for k in ("phase", "task", "cells_written", "pulses", "energy_j")})
    return ProgramReport(table, summary)


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
        """Cell writes and mask loads of the programming and of the switches."""
        s, w = self.program.summary, self.switch
        return s["energy_j"] + s["mask_load_j"] + w["energy_j"] + w["mask_load_j"]

    @property
    def rows(self) -> pl.DataFrame:
        return pl.concat([r.rows for r in [self.program, *self.switches]])


def learn_on_chip(chip: Chip, layout: ChipLayout, tasks: dict[str, dict], backbone_levels: dict[str, torch.Tensor],
                  preset: EnergyPreset) -> TaskProgramming:
    """Program the last task of `tasks` (name -> task.pt, in learning order) onto `chip`, then switch the
    chip to every earlier task in turn and back to the new one; in place.

    A finetune_shared task runs on the latest shared network (that is its forgetting), so switching
    between shared tasks writes nothing.
    """
    names = list(tasks)
    shared = [n for n in names if tasks[n].get("method") == "finetune_shared"]

    def image(name: str) -> TaskImage:
        latest = (shared[-1], tasks[shared[-1]]) if name in shared and name != shared[-1] else None
        return task_image(name, tasks[name], layout, backbone_levels, shared_from=latest)

    used, task = layout.used(), names[-1]
    programmed = program(chip, image(task), preset, used, "program")
    switches = [program(chip, image(earlier), preset, used, "switch") for earlier in names[:-1]]
    if switches:
        switches.append(program(chip, image(task), preset, used, "switch_back"))
    return TaskProgramming(programmed, switches)


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
    chip.backbone_key, chip.serving, chip.masks = meta["backbone_image"], meta["serving"], meta["masks_in_buffer"]
    chip.history = list(meta.get("history", []))
    return chip


# --- the backbone of a pipeline ----------------------------------------------------------------------


def backbone_mapping(model_params, crossbar_params, levels: dict) -> Mapping:  # noqa: ANN001 (xbar.params models)
    """The crossbar mapping of the pipeline's backbone (the model of params.yaml, its head excluded),
    built on the meta device; `levels` is levels.pt, whose first layer gives the input channels."""
    from xbar.crossbar import map_model
    from xbar.models import build_model

    if not levels:
        raise UserError("levels.pt: holds no layer (re-run the quantize stage)")
    first = next(iter(levels.values()))["levels"]
    with torch.device("meta"):
        model = build_model(model_params, num_classes=2, in_channels=int(first.shape[1]))
    mapping = map_model(model, CrossbarSpec.from_params(crossbar_params))
    for lm in mapping.layers:
        if lm.name not in levels or tuple(levels[lm.name]["levels"].shape) != lm.shape:
            raise UserError(f"levels.pt: does not match model {model_params.name!r} at layer {lm.name} "
                            "(model parameters changed: re-run the quantize stage)")
    return mapping


def chip_spare_pes(spare_pe_ratio: float, n_pes: int) -> int:
    """Spare PEs the chip is built with (params crossbar.spare_pe_ratio of the backbone's PEs)."""
    from xbar.memory import spare_pe_count

    return spare_pe_count(n_pes, spare_pe_ratio)
