"""Where the chip's cells sit: each weight's cell addresses (from the mapping's one placement,
`xbar.crossbar.place_weights`), the images of weight levels they make, and digests of what a chip was
made for.

The chip has the backbone's PEs (`mapping.n_pes`, in mapping order) and, after
them, its spare PEs (xbar.chip.deployment). Each PE is `crossbars_per_pe`
crossbars of rows x cols cells; a weight's cells sit at a physical position
(crossbar, row, column), so two PEs' contents can be compared cell by cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch

from xbar.crossbar import CrossbarSpec, LayerMap, Mapping, map_model
from xbar.errors import UserError


def mapping_digest(mapping: Mapping) -> str:
    """sha256 of the crossbar spec and every mapped layer (name, kind, shape, groups)."""
    spec = asdict(mapping.spec)
    if spec["signed"] == "offset":  # the scheme joined the spec later: offset chips keep their digest
        del spec["signed"]
    desc = {"spec": spec,
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
    """Where each weight's cells sit: [*weight shape, cells_per_weight] indices into the chip's
    flattened backbone PEs, pe * cells_per_pe + (crossbar in PE * rows + row) * cols + column, bit
    slices in adjacent columns, MSB first (the layer's placement). int32 (int64 past 2**31 cells)."""
    spec, place = lm.spec, lm.placement
    cells = (lm.first_pe + lm.n_pes) * spec.cells_per_pe
    dtype = torch.int32 if cells <= torch.iinfo(torch.int32).max else torch.int64
    crossbar = place.crossbar.to(dtype) % spec.crossbars_per_pe  # within its PE
    cell = (crossbar * spec.rows + place.row.to(dtype)) * spec.cols + place.bit_column.to(dtype)
    flat = (place.pe.to(dtype) * spec.cells_per_pe + cell).unsqueeze(-1)
    return flat + torch.arange(spec.cells_per_weight, dtype=dtype)


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


def backbone_mapping(model_params, crossbar_params, levels: dict) -> Mapping:  # noqa: ANN001 (xbar.params models)
    """The crossbar mapping of the pipeline's backbone (the model of params.yaml, its head excluded),
    built on the meta device; `levels` is levels.pt, whose first layer gives the input channels."""
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

