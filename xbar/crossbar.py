"""Mapping of a network's layers onto crossbars, PEs and columns.

Conventions:

* A conv weight [Cout, Cin/groups, kh, kw] is unrolled to Cin*kh*kw rows by
  Cout outputs, row r = channel * kh*kw + kernel position (the order of
  `weight.reshape(Cout, -1)`); a linear weight [out, in] is a 1x1 conv.
* A **row tile** holds G = rows // (kh*kw) input channels with all their kernel
  positions (G = 8 for 3x3 on 72 rows, 72 for 1x1, 1 for 7x7). A kernel with
  more than `rows` positions (11x11 = 121 on 72 rows) is split per channel into
  ceil(kh*kw / rows) row tiles (72 + 49 rows), so a row tile never mixes the
  positions of two channels.
* Each weight takes cells_per_weight = weight_bits / cell_bits cells in adjacent
  physical columns (bit slices, most significant first); a crossbar holds
  cols // cells_per_weight outputs (36 at 72 columns, 2 cells per weight). A
  layer with more outputs than that takes several column tiles per row tile.
* A **column** -- the mask unit -- is one output channel within one row tile,
  i.e. all its bit-slice columns: the shift-adder merges the slices and applies
  one shift to the result. A layer has out_channels * row_tiles columns.
* Grouped and depthwise convs are packed block-diagonally when a group fits in
  one crossbar: as many groups as fit in both the rows and the outputs share a
  crossbar (8 depthwise 3x3 channels on 72 rows); each output channel is then
  one column. Groups that do not fit are mapped one after another like a
  dense conv each.
* A **PE** is `crossbars_per_pe` consecutive crossbars of one layer (the column
  tiles of one row tile come first, so a PE's crossbars share their inputs);
  a PE never spans two layers. Crossbars and PEs are numbered globally in layer
  order.

Signed weights (**offset encoding**): a weight level w in [-L, L] (L = 7 at 4
bits) is stored as the unsigned u = w + L in [0, 2L] written in base
2**cell_bits over cells_per_weight cells, most significant slice first (-7 ->
(0, 0), 0 -> (1, 3), 7 -> (3, 2) at 2-bit cells). A column then computes
sum((w + L) * x); the shift-adder subtracts L * sum(x), which it gets from the
digital input bits of the row tile (one popcount per row tile, shared by every
column of the crossbar), so no cell or column is spent on the sign and one
column still holds one output. The column mask scales the corrected output.

The signed-weight scheme (`CrossbarSpec.signed`, docs/decisions.md "Signed weights") sets the cells:
`offset` as above; `offset_ref` the same cells plus, per crossbar, one reference weight (a dummy column
per bit slice holding L) whose digitized sums the digital side subtracts (NeuroSim); `differential` a
positive and a negative copy, max(w, 0) and max(-w, 0), each over ceil((weight_bits - 1) / cell_bits)
cells in adjacent columns (positive first), subtracted in analog before one ADC per slice pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import polars as pl
import torch
from torch import nn

from xbar.errors import UserError


SCHEMES = ("offset", "offset_ref", "differential")


def check_scheme(signed: str) -> str:
    if signed not in SCHEMES:
        raise UserError(f"crossbar.signed: {signed!r} is not a signed-weight scheme (one of {', '.join(SCHEMES)})")
    return signed


@dataclass(frozen=True)
class CrossbarSpec:
    rows: int = 72
    cols: int = 72
    cell_bits: int = 2
    weight_bits: int = 4
    crossbars_per_pe: int = 1
    signed: str = "offset"

    @classmethod
    def from_params(cls, params: object) -> CrossbarSpec:
        """The way a spec is made: from `Params.crossbar` (xbar.params.CrossbarParams), which checks
        every range once (the spec itself trusts its numbers)."""
        keys = ("rows", "cols", "cell_bits", "weight_bits", "crossbars_per_pe", "signed")
        return cls(**{k: getattr(params, k) for k in keys if hasattr(params, k)})

    @property
    def slices(self) -> int:
        """Bit-slice columns one weight sends to ADCs: offset digits, or the magnitude digits of differential."""
        if self.signed == "differential":
            return math.ceil((self.weight_bits - 1) / self.cell_bits)
        return self.weight_bits // self.cell_bits

    @property
    def cells_per_weight(self) -> int:
        return 2 * self.slices if self.signed == "differential" else self.slices

    @property
    def reference_cols(self) -> int:
        """Columns per crossbar holding the reference weight (offset_ref), not outputs."""
        return self.slices if self.signed == "offset_ref" else 0

    @property
    def outputs_per_crossbar(self) -> int:
        return (self.cols - self.reference_cols) // self.cells_per_weight

    @property
    def cells_per_pe(self) -> int:
        return self.rows * self.cols * self.crossbars_per_pe

    @property
    def weight_levels(self) -> int:
        """L: weights take integer levels in [-L, L]."""
        return 2 ** (self.weight_bits - 1) - 1

    def _digits(self, u: torch.Tensor) -> list[torch.Tensor]:
        base = 2**self.cell_bits
        return [(u // base**k) % base for k in reversed(range(self.slices))]

    def _number(self, cells: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(cells.shape[:-1], dtype=torch.int64)
        for k in range(cells.shape[-1]):  # MSB first: Horner's rule, as the shift-adder merges slices
            u = u * 2**self.cell_bits + cells[..., k].to(torch.int64)
        return u

    def cell_levels(self, weight_levels: torch.Tensor) -> torch.Tensor:
        """Cell levels of the scheme, shape [..., cells_per_weight], MSB slice first (uint8); differential:
        the positive copy's cells, then the negative copy's."""
        w = weight_levels.to(torch.int64)
        if w.numel() and (w.abs().max() > self.weight_levels):
            raise ValueError(f"weight levels must lie in [-{self.weight_levels}, {self.weight_levels}]")
        if self.signed == "differential":
            digits = self._digits(w.clamp_min(0)) + self._digits((-w).clamp_min(0))
        else:
            digits = self._digits(w + self.weight_levels)
        return torch.stack(digits, -1).to(torch.uint8)

    def reference_levels(self) -> torch.Tensor:
        """Cell levels of the reference weight (offset_ref): L in base 2**cell_bits, MSB first."""
        return torch.stack(self._digits(torch.tensor(self.weight_levels)))

    def weight_from_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """Inverse of `cell_levels`: [..., cells_per_weight] cell levels -> int64 weight levels."""
        if self.signed == "differential":
            return self._number(cells[..., : self.slices]) - self._number(cells[..., self.slices:])
        return self._number(cells) - self.weight_levels


def _row_tiles(cin: int, kernel: int, rows: int) -> int:
    """Row tiles of one group: ceil(cin / G) with G = rows // kernel, or per-channel splits."""
    if kernel <= rows:
        return math.ceil(cin / (rows // kernel))
    return cin * math.ceil(kernel / rows)


def _tile_rows(cin: int, kernel: int, rows: int) -> list[tuple[int, int]]:
    """(first row, row count) of each row tile of one group, rows in unrolled order."""
    if kernel <= rows:
        g = rows // kernel
        return [(c0 * kernel, min(g, cin - c0) * kernel) for c0 in range(0, cin, g)]
    per = math.ceil(kernel / rows)
    return [(c * kernel + p * rows, min(rows, kernel - p * rows)) for c in range(cin) for p in range(per)]


@dataclass(frozen=True)
class LayerMap:
    """How one layer sits on crossbars: the layer's crossbars, PEs and columns."""

    name: str
    kind: str  # "conv" | "linear"
    shape: tuple[int, ...]  # weight shape
    groups: int
    spec: CrossbarSpec
    first_crossbar: int  # global index of this layer's first crossbar
    first_pe: int
    crossbars: list[dict] = field(repr=False, default_factory=list)  # one dict per crossbar (local order)

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def cin_per_group(self) -> int:
        return self.shape[1]

    @property
    def kernel(self) -> int:
        """Kernel positions kh*kw (1 for a linear layer)."""
        return math.prod(self.shape[2:]) if len(self.shape) > 2 else 1

    @property
    def weights(self) -> int:
        return math.prod(self.shape)

    @cached_property
    def groups_per_crossbar(self) -> int:
        """Groups packed block-diagonally into one crossbar (1: each group maps like a dense conv)."""
        if self.groups == 1:
            return 1
        cout_g = self.out_channels // self.groups
        rows_g = self.cin_per_group * self.kernel
        if rows_g > self.spec.rows or cout_g > self.spec.outputs_per_crossbar:
            return 1
        return min(self.spec.rows // rows_g, self.spec.outputs_per_crossbar // cout_g, self.groups)

    @property
    def packed(self) -> bool:
        """Several groups share one crossbar (grouped / depthwise convs)."""
        return self.groups_per_crossbar > 1

    @property
    def n_crossbars(self) -> int:
        return len(self.crossbars)

    @property
    def n_pes(self) -> int:
        return math.ceil(self.n_crossbars / self.spec.crossbars_per_pe)

    @property
    def row_tiles_per_group(self) -> int:
        return _row_tiles(self.cin_per_group, self.kernel, self.spec.rows)

    @property
    def n_row_tiles(self) -> int:
        """Row tiles of the whole layer (a packed crossbar is one row tile for its groups)."""
        if self.packed:
            return math.ceil(self.groups / self.groups_per_crossbar)
        return self.groups * self.row_tiles_per_group

    @property
    def n_columns(self) -> int:
        """Mask units: one per output channel per row tile."""
        return self.out_channels if self.packed else self.out_channels * self.row_tiles_per_group

    @cached_property
    def placement(self) -> Placement:
        """Where every weight's cells sit (`place_weights`), computed once per layer."""
        return place_weights(self)

    def index_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(column, pe) of every weight, of the weight's shape; column is local, pe global. `placement`'s own
        tensors (int16 where they fit, else int32), built once per layer and shared by every caller: convert
        at the point of use where an op wants int64 (`m[column.long()]`), never keep a converted copy."""
        return self.placement.column, self.placement.pe


def _layer_crossbars(lm: LayerMap) -> list[dict]:
    """Row range, output range and usage of each crossbar of one layer (local order)."""
    spec, k, cin_g = lm.spec, lm.kernel, lm.cin_per_group
    cout_g = lm.out_channels // lm.groups
    rows_g = cin_g * k
    xbs = []
    if lm.packed:
        gpc = lm.groups_per_crossbar
        for tile, g0 in enumerate(range(0, lm.groups, gpc)):
            ng = min(gpc, lm.groups - g0)
            xbs.append(dict(row_tile=tile, row_start=g0 * rows_g, rows_used=ng * rows_g,
                            out_start=g0 * cout_g, columns=ng * cout_g, weights=ng * rows_g * cout_g))
        return xbs
    opc = spec.outputs_per_crossbar
    tiles = _tile_rows(cin_g, k, spec.rows)
    for g in range(lm.groups):
        for t, (r0, nr) in enumerate(tiles):
            for o0 in range(0, cout_g, opc):
                no = min(opc, cout_g - o0)
                xbs.append(dict(row_tile=g * len(tiles) + t, row_start=g * rows_g + r0, rows_used=nr,
                                out_start=g * cout_g + o0, columns=no, weights=nr * no))
    return xbs


def _compact(t: torch.Tensor, bound: int) -> torch.Tensor:
    """`t`, whose values lie in [0, bound), as int16 where that holds them, else int32 (ResNet-50 has
    23.5 M weights: per-weight bookkeeping stays small)."""
    return t.to(torch.int16 if bound <= 2**15 else torch.int32).contiguous()


@dataclass(frozen=True)
class Placement:
    """Where each weight of one layer sits (a tensor of the weight's shape per coordinate), then the columns'
    own figures; int16 where it fits, else int32 (int16 cannot index: convert with .int() / .long())."""

    crossbar: torch.Tensor  # the layer's crossbar (local: the global one is LayerMap.first_crossbar + it)
    pe: torch.Tensor  # global PE
    row: torch.Tensor  # row within the crossbar
    column: torch.Tensor  # column (mask unit), local to the layer: one output channel within one row tile
    bit_column: torch.Tensor  # physical column of its first (most significant) cell; the other slices follow
    column_crossbar: torch.Tensor  # [n_columns]: each column's crossbar (local)
    column_pe: torch.Tensor  # [n_columns]: each column's PE (global)
    column_weights: torch.Tensor  # [n_columns]: weights in each column (rows of its row tile)


def place_weights(lm: LayerMap) -> Placement:
    """The one placement of a layer's weights, from its crossbar table; the column and PE indices, the chip's
    cell addresses and the energy model's per-column counts all follow from it. Weight [o, c, p] of group g
    sits at unrolled row r = (g * Cin_g + c) * K + p, in the row tile holding r, in its column tile holding
    output o, its cells from physical column (o - the crossbar's first output) * cells_per_weight on; its
    column is (row tile within its group) * Cout + o (a packed crossbar: one row tile per group)."""
    spec, k, cin_g, cout, xbs = lm.spec, lm.kernel, lm.cin_per_group, lm.out_channels, lm.crossbars
    i32 = torch.int32  # every index of a layer fits; half the memory traffic of int64
    first = torch.tensor([i for i, xb in enumerate(xbs) if i == 0 or xb["row_tile"] != xbs[i - 1]["row_tile"]])
    row_start = torch.tensor([xb["row_start"] for xb in xbs], dtype=i32)  # of each crossbar
    out_start = torch.tensor([xb["out_start"] for xb in xbs], dtype=i32)
    out = torch.arange(cout, dtype=i32).view(cout, 1, 1)
    r = torch.arange(cin_g * k, dtype=i32).view(1, cin_g, k)
    if lm.groups > 1:
        r = out // (cout // lm.groups) * (cin_g * k) + r
    tile = torch.searchsorted(row_start[first], r.contiguous(), right=True, out_int32=True) - 1  # tiles ascend
    crossbar = (first.to(i32)[tile] + (out - out_start[first][tile]) // spec.outputs_per_crossbar)
    crossbar = crossbar.expand(cout, cin_g, k)
    column = (tile % lm.row_tiles_per_group * cout + out).expand(cout, cin_g, k).reshape(-1)
    column_crossbar = torch.zeros(lm.n_columns, dtype=i32).scatter_(0, column.long(), crossbar.reshape(-1))
    pes = lm.first_pe + lm.n_pes
    return Placement(
        crossbar=_compact(crossbar.reshape(lm.shape), lm.n_crossbars),
        pe=_compact((lm.first_pe + crossbar // spec.crossbars_per_pe).reshape(lm.shape), pes),
        row=_compact((r - row_start[crossbar]).reshape(lm.shape), spec.rows),
        column=_compact(column.reshape(lm.shape), lm.n_columns),
        bit_column=_compact(((out - out_start[crossbar]) * spec.cells_per_weight).reshape(lm.shape), spec.cols),
        column_crossbar=_compact(column_crossbar, lm.n_crossbars),  # a column's weights share one crossbar
        column_pe=_compact(lm.first_pe + column_crossbar // spec.crossbars_per_pe, pes),
        column_weights=_compact(torch.bincount(column, minlength=lm.n_columns), spec.rows + 1),
    )


def spare_pe_count(spare_ratio: float, n_pes: int) -> int:
    """Spare PEs for a share `spare_ratio` of `n_pes` PEs: ceil(ratio * PEs), so at least one for any
    ratio > 0 (the 1e-9 keeps a product such as 0.07 * 100 = 7.000000000000001 at 7)."""
    return min(n_pes, math.ceil(spare_ratio * n_pes - 1e-9))


_CROSSBAR_SCHEMA = dict(layer=pl.String, pe=pl.Int64, crossbar=pl.Int64, row_tile=pl.Int64, row_start=pl.Int64,
                        rows_used=pl.Int64, out_start=pl.Int64, columns=pl.Int64, cols_used=pl.Int64,
                        weights=pl.Int64, cells_used=pl.Int64, utilization=pl.Float64)


@dataclass(frozen=True)
class Mapping:
    spec: CrossbarSpec
    layers: list[LayerMap]

    @property
    def n_crossbars(self) -> int:
        return sum(lm.n_crossbars for lm in self.layers)

    @property
    def n_pes(self) -> int:
        return sum(lm.n_pes for lm in self.layers)

    @property
    def n_columns(self) -> int:
        return sum(lm.n_columns for lm in self.layers)

    @property
    def n_weights(self) -> int:
        return sum(lm.weights for lm in self.layers)

    @property
    def n_cells_used(self) -> int:
        return self.n_weights * self.spec.cells_per_weight

    @property
    def utilization(self) -> float:
        """Cells holding a weight over the cells of every crossbar used."""
        return self.n_cells_used / max(1, self.n_crossbars * self.spec.rows * self.spec.cols)

    def release_placements(self) -> None:
        """Drop every layer's cached placement (235 MB on ResNet-50): a task model needs it only while its
        method attaches (row tiles, spare-PE regions); whoever asks for it later rebuilds it."""
        for lm in self.layers:
            lm.__dict__.pop("placement", None)

    def layer(self, name: str) -> LayerMap:
        for lm in self.layers:
            if lm.name == name:
                return lm
        raise KeyError(f"layer {name!r} is not mapped (mapped: {', '.join(x.name for x in self.layers)})")

    def crossbar_table(self) -> pl.DataFrame:
        """One row per crossbar: layer, pe, crossbar, row tile, row range [row_start, +rows_used),
        output range [out_start, +columns), columns (mask units = outputs held), cols_used
        (physical columns, bit slices included), weights, cells used, utilization."""
        s = self.spec
        data: dict[str, list] = {k: [] for k in _CROSSBAR_SCHEMA if k not in ("cols_used", "cells_used", "utilization")}
        for lm in self.layers:
            for i, xb in enumerate(lm.crossbars):
                data["layer"].append(lm.name)
                data["pe"].append(lm.first_pe + i // s.crossbars_per_pe)
                data["crossbar"].append(lm.first_crossbar + i)
                for key in ("row_tile", "row_start", "rows_used", "out_start", "columns", "weights"):
                    data[key].append(xb[key])
        df = pl.DataFrame(data, schema={k: _CROSSBAR_SCHEMA[k] for k in data})
        return df.with_columns(
            cols_used=pl.col("columns") * s.cells_per_weight,
            cells_used=pl.col("weights") * s.cells_per_weight,
            utilization=pl.col("weights") * s.cells_per_weight / (s.rows * s.cols),
        ).select(list(_CROSSBAR_SCHEMA))

    def pe_table(self) -> pl.DataFrame:
        """One row per PE: layer, pe, crossbars, columns, weights, cells used, utilization of its
        crossbars_per_pe crossbars (a layer's last PE may leave crossbars empty)."""
        s = self.spec
        return (self.crossbar_table().group_by("pe", maintain_order=True)
                .agg(pl.col("layer").first(), pl.len().alias("crossbars"), pl.col("columns").sum(),
                     pl.col("weights").sum(), pl.col("cells_used").sum())
                .with_columns(utilization=pl.col("cells_used") / s.cells_per_pe)
                .select("layer", "pe", "crossbars", "columns", "weights", "cells_used", "utilization"))

    def layer_table(self) -> pl.DataFrame:
        """One row per layer: shape, weights, row tiles, columns, crossbars, PEs, rows/cols/cells used,
        utilization of the layer's crossbars."""
        s = self.spec
        rows = []
        for lm in self.layers:
            rows.append(dict(
                layer=lm.name, kind=lm.kind, out_channels=lm.out_channels, in_per_group=lm.cin_per_group,
                kernel=lm.kernel, groups=lm.groups, weights=lm.weights, row_tiles=lm.n_row_tiles,
                columns=lm.n_columns, crossbars=lm.n_crossbars, pes=lm.n_pes, first_crossbar=lm.first_crossbar,
                first_pe=lm.first_pe, rows_used=sum(x["rows_used"] for x in lm.crossbars),
                cols_used=sum(x["columns"] for x in lm.crossbars) * s.cells_per_weight,
                cells_used=lm.weights * s.cells_per_weight))
        schema = dict(layer=pl.String, kind=pl.String, **{k: pl.Int64 for k in (
            "out_channels", "in_per_group", "kernel", "groups", "weights", "row_tiles", "columns", "crossbars",
            "pes", "first_crossbar", "first_pe", "rows_used", "cols_used", "cells_used")})
        df = pl.DataFrame(rows, schema=schema)
        return df.with_columns(utilization=pl.col("cells_used") / (pl.col("crossbars") * s.rows * s.cols))

    def pe_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, weights) held by each PE, two int64 tensors of length n_pes."""
        pes = self.pe_table()  # one row per PE, in PE order
        return pes["columns"].to_torch().to(torch.int64), pes["weights"].to_torch().to(torch.int64)


def mapped_layers(model: nn.Module, exclude: tuple[str, ...] = ("head",)) -> list[tuple[str, nn.Module]]:
    """Every Conv2d / Linear of the backbone (the per-task head excluded), in definition order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and not any(n == e or n.startswith(e + ".") for e in exclude)]


def map_layers(shapes: list[tuple[str, str, tuple[int, ...], int]], spec: CrossbarSpec) -> Mapping:
    """Map (name, kind, weight shape, groups) layers in order; PEs never span layers."""
    layers, xb, pe = [], 0, 0
    for name, kind, shape, groups in shapes:
        shape = tuple(int(d) for d in shape)
        if len(shape) not in (2, 4) or groups < 1 or shape[0] % groups:
            raise UserError(f"layer {name}: cannot map weight shape {shape} with {groups} groups")
        lm = LayerMap(name, kind, shape, groups, spec, xb, pe)
        lm.crossbars.extend(_layer_crossbars(lm))  # the list is the dataclass's own: filled once, here
        layers.append(lm)
        xb, pe = xb + lm.n_crossbars, pe + lm.n_pes
    return Mapping(spec, layers)


def layer_shapes(model: nn.Module, exclude: tuple[str, ...] = ("head",)) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, kind, weight shape, groups) of every mapped layer (works on the meta device too)."""
    return [(n, "conv" if isinstance(m, nn.Conv2d) else "linear", tuple(m.weight.shape),
             m.groups if isinstance(m, nn.Conv2d) else 1) for n, m in mapped_layers(model, exclude)]


def map_model(model: nn.Module, spec: CrossbarSpec, exclude: tuple[str, ...] = ("head",)) -> Mapping:
    return map_layers(layer_shapes(model, exclude), spec)
