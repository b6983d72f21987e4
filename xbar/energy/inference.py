"""Inference energy (per image) of the crossbar accelerator.

A layer's crossbars are used once per output position (H_out * W_out for a
conv, 1 for a linear layer), with the input applied bit-serially over
`act_bits` cycles. Per crossbar and image:

* cell reads      = positions * act_bits * input_activity * active cells   (x cell_read_j)
* ADC conversions = positions * act_bits * (active outputs x bit slices     (x adc_j)
                    + reference columns); a differential pair is one conversion
* shift-add       = one per ADC conversion                                   (x shift_add_j)
* mask buffer     = positions * masked columns * mask bits                   (x mask_read_j_per_bit)
* interconnect    = positions * (rows_used * act_bits / crossbars sharing the row tile's input
                    + columns * psum_bits)                                   (x interconnect_j_per_bit)

and per layer: the input and output feature maps through the buffer
(`buffer_j_per_bit`), and, for a task with per-task BN (`bn: per_task`), one
digital multiply-add per output activation of a conv layer: the task's own
per-channel affine after the adder tree (`BN_AFFINE_J`). Under `bn: frozen` the
task runs on the backbone's BN, folded into the backbone's deployment as the
paper's chip has it (Figure 3: no per-task per-channel affine). A column whose mask is 0 is switched off (XBM's "off"
column): its cells and its ADC do nothing. A spare PE's columns carry no mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from xbar.crossbar import CrossbarSpec, Mapping
from xbar.energy.layer_io import LayerIO
from xbar.energy.presets import EnergyPreset
from xbar.errors import UserError
from xbar.memory import mask_bits_for


# one fp32 multiply (3.7 pJ) + one fp32 add (0.9 pJ) at 45 nm (M. Horowitz, "Computing's energy problem",
# ISSCC 2014, Figure 1.1.9): the per-task BN affine on one output activation, stored as fp32 (xbar.memory);
# not scaled to smaller nodes, so an upper bound there
BN_AFFINE_J = 3.7e-12 + 0.9e-12


@dataclass(frozen=True)
class ColumnUse:
    """A task's columns in one layer: which compute (mask != 0) and which read a mask from the buffer."""

    active: torch.Tensor  # bool [n_columns]
    masked: torch.Tensor  # bool [n_columns]


def column_use(task: dict, mapping: Mapping) -> dict[str, ColumnUse]:
    """ColumnUse of every layer from a task.pt (docs/artifacts.md): columns with mask value 0 are off,
    masks are read for the columns of frozen PEs (a spare PE's columns are not masked)."""
    out: dict[str, ColumnUse] = {}
    masks, values = task.get("column_masks") or {}, task.get("mask_values")
    spare = task.get("spare_pes", torch.zeros(0, dtype=torch.int64)).to(torch.int64)
    for lm in mapping.layers:
        if lm.name not in masks:
            continue
        codes = masks[lm.name].long()
        if codes.numel() != lm.n_columns:
            raise UserError(f"task.pt: layer {lm.name} has {codes.numel()} column masks, "
                            f"the mapping {lm.n_columns} columns")
        masked = ~torch.isin(lm.placement.column_pe, spare)
        active = (values.float()[codes] != 0) | ~masked
        out[lm.name] = ColumnUse(active, masked)
    return out


COMPONENTS = ("cells_j", "adc_j", "shift_add_j", "mask_j", "interconnect_j")


@dataclass(frozen=True)
class CrossbarUse:
    """Per crossbar (global order, numpy arrays): what one image makes it do."""

    layer: np.ndarray  # str
    pe: np.ndarray
    positions: np.ndarray  # times used per image
    rows_used: np.ndarray
    input_share: np.ndarray  # 1 / crossbars of its row tile: one broadcast of the input feeds them all
    active_columns: np.ndarray  # mask units that compute (all unless a mask switches them off)
    active_cells: np.ndarray  # cells in those columns
    masked_columns: np.ndarray  # mask units that read a mask code from the buffer


def crossbar_use(mapping: Mapping, io: dict[str, LayerIO], columns: dict[str, ColumnUse] | None = None) -> CrossbarUse:
    spec, columns = mapping.spec, columns or {}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in CrossbarUse.__dataclass_fields__}
    for lm in mapping.layers:
        n = lm.n_crossbars
        cols = np.array([x["columns"] for x in lm.crossbars], dtype=np.int64)
        cells = np.array([x["weights"] for x in lm.crossbars], dtype=np.int64) * spec.cells_per_weight
        masked = np.zeros(n, dtype=np.int64)
        if lm.name in columns:
            use, place = columns[lm.name], lm.placement
            xb, col_cells = place.column_crossbar.long(), place.column_weights.long() * spec.cells_per_weight
            active = use.active.to(torch.int64)
            cols = torch.zeros(n, dtype=torch.int64).index_add(0, xb, active).numpy()
            cells = torch.zeros(n, dtype=torch.int64).index_add(0, xb, active * col_cells).numpy()
            masked = torch.zeros(n, dtype=torch.int64).index_add(0, xb, use.masked.to(torch.int64)).numpy()
        parts["layer"].append(np.full(n, lm.name, dtype=object))
        parts["pe"].append(lm.first_pe + np.arange(n) // spec.crossbars_per_pe)
        parts["positions"].append(np.full(n, io[lm.name].positions, dtype=np.int64))
        parts["rows_used"].append(np.array([x["rows_used"] for x in lm.crossbars], dtype=np.int64))
        tiles = np.array([x.get("row_tile", i) for i, x in enumerate(lm.crossbars)], dtype=np.int64)
        parts["input_share"].append(1.0 / np.bincount(tiles)[tiles])
        parts["active_columns"].append(cols)
        rows = np.array([x["rows_used"] for x in lm.crossbars], dtype=np.int64)
        parts["active_cells"].append(cells + rows * spec.reference_cols)  # offset_ref: its reference columns
        parts["masked_columns"].append(masked)
    return CrossbarUse(**{k: np.concatenate(v) for k, v in parts.items()})


def component_energy(use: CrossbarUse, spec: CrossbarSpec, preset: EnergyPreset, act_bits: int,
                     mask_bits: int = 0) -> dict[str, np.ndarray]:
    """Per crossbar and image, joules by component (the formulas of the module docstring)."""
    psum_bits = act_bits + spec.weight_bits + math.ceil(math.log2(spec.rows))  # a column's partial sum
    p, cycles = use.positions.astype(np.float64), float(act_bits)
    # one conversion per bit slice of an output (differential: per subtracted pair), plus the reference columns
    conversions = p * cycles * (use.active_columns * spec.slices + spec.reference_cols)
    return {
        "cells_j": p * cycles * preset.input_activity * use.active_cells * preset.cell_read_j,
        "adc_j": conversions * preset.adc_j,
        "shift_add_j": conversions * preset.shift_add_j,
        "mask_j": p * use.masked_columns * mask_bits * preset.mask_read_j_per_bit,
        "interconnect_j": p * (use.rows_used * cycles * use.input_share + use.active_columns * psum_bits)
        * preset.interconnect_j_per_bit,
    }


def buffer_energy(mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset, act_bits: int) -> np.ndarray:
    """Per layer and image: its input and output feature maps through the activation buffer."""
    return np.array([(io[lm.name].in_elems + io[lm.name].out_elems) * act_bits * preset.buffer_j_per_bit
                     for lm in mapping.layers], dtype=np.float64)


@dataclass(frozen=True)
class InferenceEnergy:
    """One image's inference energy: per crossbar, per PE and per layer tables (joules)."""

    crossbars: pl.DataFrame
    layers: pl.DataFrame
    pes: pl.DataFrame

    @property
    def per_image_j(self) -> float:
        return float(self.layers["total_j"].sum())

    def breakdown(self) -> dict[str, float]:
        return {c: float(self.layers[c].sum()) for c in (*COMPONENTS, "buffer_j", "bn_j")}


def inference_energy(mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset, act_bits: int,
                     columns: dict[str, ColumnUse] | None = None, mask_bits: int = 0,
                     bn_affine: bool = False) -> InferenceEnergy:
    use = crossbar_use(mapping, io, columns)
    energy = component_energy(use, mapping.spec, preset, act_bits, mask_bits)
    xb = pl.DataFrame({"layer": use.layer.astype(str), "pe": use.pe, "crossbar": np.arange(len(use.pe)),
                       "positions": use.positions, "active_columns": use.active_columns,
                       "active_cells": use.active_cells, "masked_columns": use.masked_columns, **energy},
                      schema_overrides={"layer": pl.String, "pe": pl.Int64, "crossbar": pl.Int64})
    xb = xb.with_columns(total_j=pl.sum_horizontal(*COMPONENTS))
    sums = xb.group_by("layer", maintain_order=True).agg(
        pl.col("pe").n_unique().alias("pes"), pl.len().alias("crossbars"), pl.col("positions").first(),
        *[pl.col(c).sum() for c in COMPONENTS])
    bn = [io[lm.name].out_elems * BN_AFFINE_J if bn_affine and lm.kind == "conv" else 0.0 for lm in mapping.layers]
    layers = pl.DataFrame({"layer": [lm.name for lm in mapping.layers],
                           "buffer_j": buffer_energy(mapping, io, preset, act_bits), "bn_j": bn})
    layers = (layers.join(sums, on="layer", how="left", maintain_order="left")
              .with_columns(total_j=pl.sum_horizontal(*COMPONENTS, "buffer_j", "bn_j"))
              .select("layer", "pes", "crossbars", "positions", *COMPONENTS, "buffer_j", "bn_j", "total_j"))
    pes = (xb.group_by("pe", maintain_order=True)
           .agg(pl.col("layer").first(), pl.len().alias("crossbars"), *[pl.col(c).sum() for c in COMPONENTS])
           .with_columns(total_j=pl.sum_horizontal(*COMPONENTS))
           .select("pe", "layer", "crossbars", *COMPONENTS, "total_j"))
    return InferenceEnergy(xb, layers, pes)


@dataclass(frozen=True)
class TaskInference:
    """One image's inference energy of a learned task, and the column masks it follows from."""

    energy: InferenceEnergy
    columns: dict[str, ColumnUse]
    mask_bits: int  # per masked column, read from the mask buffer


def task_inference(task: dict, mapping: Mapping, io: dict[str, LayerIO], preset: EnergyPreset,
                   act_bits: int) -> TaskInference:
    """Inference energy of a task.pt: a column with mask 0 is off, frozen PEs read their mask code, and a
    task with its own BN pays its per-channel affine."""
    columns = column_use(task, mapping)
    bits = mask_bits_for(len(task.get("mask_values", ()))) if columns else 0
    own_bn = task.get("bn") == "per_task"
    return TaskInference(inference_energy(mapping, io, preset, act_bits, columns, bits, own_bn), columns, bits)
