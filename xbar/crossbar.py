"""Mapping of a network's layers onto crossbars, PEs and columns.

Conventions (DESIGN.md, "Map to crossbars"):

* A conv weight [Cout, Cin/groups, kh, kw] is unrolled to Cin*kh*kw rows by
  Cout outputs; a linear weight [out, in] is a 1x1 conv.
* A **row tile** holds G = rows // (kh*kw) input channels with all their kernel
  positions (G = 8 for 3x3 on 72 rows, 72 for 1x1). A kernel with more than
  `rows` positions (e.g. 11x11 on 72 rows) is split across ceil(kh*kw / rows)
  row tiles per channel.
* Each weight takes cells_per_weight = weight_bits / cell_bits cells in
  adjacent columns (bit slices); a crossbar holds cols // cells_per_weight outputs.
* A **column** -- the mask unit -- is one output channel within one row tile,
  i.e. all its bit-slice columns: the shift-adder applies one shift to them.
* Grouped and depthwise convs are packed block-diagonally: as many groups as
  fit in both the rows and the columns share a crossbar.
* A **PE** is `crossbars_per_pe` crossbars of the same layer.

Signed weights use **offset encoding**: a weight level w in [-L, L] (L = 7 at 4
bits) is stored as w + L in [0, 2L] written in base 2**cell_bits over the
cells_per_weight cells (most significant slice first); the shift-adder
subtracts L * sum(inputs), taken from one reference column per crossbar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import polars as pl
import torch
from torch import nn

from xbar.errors import UserError


@dataclass(frozen=True)
class CrossbarSpec:
    rows: int = 72
    cols: int = 72
    cell_bits: int = 2
    weight_bits: int = 4
    crossbars_per_pe: int = 1

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "cell_bits", "weight_bits", "crossbars_per_pe"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"crossbar.{name}: expected a positive integer, got {value!r}")
        if self.weight_bits % self.cell_bits:
            raise UserError(f"crossbar.cell_bits: {self.cell_bits} does not divide weight_bits ({self.weight_bits})")
        if self.cols < self.cells_per_weight:
            raise UserError(f"crossbar.cols: {self.cols} cannot hold one weight ({self.cells_per_weight} cells)")

    @property
    def cells_per_weight(self) -> int:
        return self.weight_bits // self.cell_bits

    @property
    def outputs_per_crossbar(self) -> int:
        return self.cols // self.cells_per_weight

    @property
    def weight_levels(self) -> int:
        """L: weights take integer levels in [-L, L]."""
        return 2 ** (self.weight_bits - 1) - 1

    def cell_levels(self, weight_levels: torch.Tensor) -> torch.Tensor:
        """Offset-encoded cell levels, shape [..., cells_per_weight], MSB slice first (uint8)."""
        u = weight_levels.to(torch.int64) + self.weight_levels
        base = 2**self.cell_bits
        digits = [(u // base**k) % base for k in reversed(range(self.cells_per_weight))]
        return torch.stack(digits, -1).to(torch.uint8)


@dataclass(frozen=True)
class LayerMap:
    """How one layer sits on crossbars. Index tensors are built on demand (small models)."""

    name: str
    kind: str  # "conv" | "linear"
    shape: tuple[int, ...]  # weight shape
    groups: int
    spec: CrossbarSpec
    first_crossbar: int  # global index of this layer's first crossbar
    first_pe: int
    crossbars: list[dict] = field(repr=False)  # one dict per crossbar (local order)

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def cin_per_group(self) -> int:
        return self.shape[1]

    @property
    def kernel(self) -> int:
        return math.prod(self.shape[2:]) if len(self.shape) > 2 else 1

    @property
    def weights(self) -> int:
        return math.prod(self.shape)

    @property
    def packed(self) -> bool:
        """Several groups share one crossbar (grouped / depthwise convs)."""
        return self.groups > 1 and self._groups_per_crossbar > 1

    @cached_property
    def _groups_per_crossbar(self) -> int:
        cout_g = self.out_channels // self.groups
        rows_g = self.cin_per_group * self.kernel
        if rows_g > self.spec.rows or cout_g > self.spec.outputs_per_crossbar:
            return 1
        return min(self.spec.rows // rows_g, self.spec.outputs_per_crossbar // cout_g, self.groups)

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
    def n_columns(self) -> int:
        """Mask units: one per output channel per row tile."""
        return self.out_channels if self.packed else self.out_channels * self.row_tiles_per_group

    def index_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(column, pe) of every weight, both int64 of the weight's shape; pe is global."""
        cout, cin_g, k = self.out_channels, self.cin_per_group, self.kernel
        cout_g = cout // self.groups
        out = torch.arange(cout).view(cout, 1, 1)
        chan = torch.arange(cin_g).view(1, cin_g, 1)
        pos = torch.arange(k).view(1, 1, k)
        if self.packed:
            column = out.expand(cout, cin_g, k)
            crossbar = (out // cout_g // self._groups_per_crossbar).expand(cout, cin_g, k)
        else:
            rt = _row_tile_of(chan, pos, k, self.spec.rows)  # within the group
            n_rt = self.row_tiles_per_group
            n_ct = math.ceil(cout_g / self.spec.outputs_per_crossbar)
            group, o_in_g = out // cout_g, out % cout_g
            column = (rt * cout + out).expand(cout, cin_g, k)
            crossbar = ((group * n_rt + rt) * n_ct + o_in_g // self.spec.outputs_per_crossbar).expand(cout, cin_g, k)
        pe = self.first_pe + crossbar // self.spec.crossbars_per_pe
        return column.reshape(self.shape).contiguous(), pe.reshape(self.shape).contiguous()


def _row_tiles(cin: int, kernel: int, rows: int) -> int:
    if kernel <= rows:
        return math.ceil(cin / (rows // kernel))
    return cin * math.ceil(kernel / rows)


def _row_tile_of(chan: torch.Tensor, pos: torch.Tensor, kernel: int, rows: int) -> torch.Tensor:
    if kernel <= rows:
        return chan // (rows // kernel) + 0 * pos
    return chan * math.ceil(kernel / rows) + pos // rows


def _layer_crossbars(shape: tuple[int, ...], groups: int, spec: CrossbarSpec, packed_gpc: int) -> list[dict]:
    """Rows, outputs and weights held by each crossbar of one layer (local order)."""
    cout, cin_g = shape[0], shape[1]
    kernel = math.prod(shape[2:]) if len(shape) > 2 else 1
    cout_g = cout // groups
    if groups > 1 and packed_gpc > 1:
        blocks = []
        for g0 in range(0, groups, packed_gpc):
            ng = min(packed_gpc, groups - g0)
            blocks.append(dict(rows_used=ng * cin_g * kernel, outputs=ng * cout_g, weights=ng * cin_g * kernel * cout_g))
        return blocks
    # rows per row tile (same for every group)
    if kernel <= spec.rows:
        g = spec.rows // kernel
        tile_rows = [min(g, cin_g - c0) * kernel for c0 in range(0, cin_g, g)]
    else:
        per = math.ceil(kernel / spec.rows)
        tile_rows = [min(spec.rows, kernel - p * spec.rows) for _ in range(cin_g) for p in range(per)]
    o = spec.outputs_per_crossbar
    outs = [min(o, cout_g - o0) for o0 in range(0, cout_g, o)]
    return [dict(rows_used=r, outputs=n, weights=r * n) for _ in range(groups) for r in tile_rows for n in outs]


@dataclass(frozen=True)
class Mapping:
    spec: CrossbarSpec
    layers: list[LayerMap]

    @property
    def n_crossbars(self) -> int:
        return sum(l.n_crossbars for l in self.layers)

    @property
    def n_pes(self) -> int:
        return sum(l.n_pes for l in self.layers)

    @property
    def n_columns(self) -> int:
        return sum(l.n_columns for l in self.layers)

    def layer(self, name: str) -> LayerMap:
        return next(l for l in self.layers if l.name == name)

    def crossbar_table(self) -> pl.DataFrame:
        """One row per crossbar: layer, pe, crossbar, row tile usage, cells, utilization."""
        s = self.spec
        rows = []
        for lm in self.layers:
            for i, xb in enumerate(lm.crossbars):
                cols_used = xb["outputs"] * s.cells_per_weight
                rows.append(dict(layer=lm.name, pe=lm.first_pe + i // s.crossbars_per_pe,
                                 crossbar=lm.first_crossbar + i, rows_used=xb["rows_used"],
                                 outputs=xb["outputs"], cols_used=cols_used, weights=xb["weights"],
                                 cells_used=xb["weights"] * s.cells_per_weight))
        df = pl.DataFrame(rows, schema=dict(layer=pl.String, pe=pl.Int64, crossbar=pl.Int64, rows_used=pl.Int64,
                                            outputs=pl.Int64, cols_used=pl.Int64, weights=pl.Int64, cells_used=pl.Int64))
        return df.with_columns(utilization=pl.col("cells_used") / (s.rows * s.cols))

    def layer_table(self) -> pl.DataFrame:
        """One row per layer: shape, weights, row tiles, columns, crossbars, PEs, cells, utilization."""
        s = self.spec
        rows = [dict(layer=l.name, kind=l.kind, out_channels=l.out_channels, in_per_group=l.cin_per_group,
                     kernel=l.kernel, groups=l.groups, weights=l.weights, row_tiles=l.row_tiles_per_group * l.groups
                     if not l.packed else l.n_crossbars, columns=l.n_columns, crossbars=l.n_crossbars, pes=l.n_pes,
                     first_pe=l.first_pe, cells_used=l.weights * s.cells_per_weight)
                for l in self.layers]
        df = pl.DataFrame(rows)
        return df.with_columns(utilization=pl.col("cells_used") / (pl.col("crossbars") * s.rows * s.cols))


def mapped_layers(model: nn.Module, exclude: tuple[str, ...] = ("head",)) -> list[tuple[str, nn.Module]]:
    """Every Conv2d / Linear of the backbone (the per-task head excluded), in definition order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and not any(n == e or n.startswith(e + ".") for e in exclude)]


def map_layers(shapes: list[tuple[str, str, tuple[int, ...], int]], spec: CrossbarSpec) -> Mapping:
    """Map (name, kind, weight shape, groups) layers in order; PEs never span layers."""
    layers, xb, pe = [], 0, 0
    for name, kind, shape, groups in shapes:
        probe = LayerMap(name, kind, tuple(shape), groups, spec, xb, pe, [])
        crossbars = _layer_crossbars(tuple(shape), groups, spec, probe._groups_per_crossbar)
        lm = LayerMap(name, kind, tuple(shape), groups, spec, xb, pe, crossbars)
        layers.append(lm)
        xb, pe = xb + lm.n_crossbars, pe + lm.n_pes
    return Mapping(spec, layers)


def map_model(model: nn.Module, spec: CrossbarSpec, exclude: tuple[str, ...] = ("head",)) -> Mapping:
    shapes = [(n, "conv" if isinstance(m, nn.Conv2d) else "linear", tuple(m.weight.shape),
               m.groups if isinstance(m, nn.Conv2d) else 1) for n, m in mapped_layers(model, exclude)]
    return map_layers(shapes, spec)
