"""The task model: the frozen backbone's cells on crossbars, and what a method adds to them.

A **task model** is the frozen backbone -- integer cell levels and per-layer
scales from levels.pt -- plus the method's trainables (see each method's file
in this package and the registry's table).

Weights are always quantized with the backbone's per-layer scale, so a
fine-tuned or spare-PE weight is a level the same cells can hold; activations
stay 4-bit with the backbone's clips (trained only by fine-tuning). The head is
digital (not mapped) and 8-bit, as quantization papers keep the last layer.

Each mapped layer becomes a `CrossbarLayer` that builds its weight ONCE per
forward: levels x scale, times the column multipliers (or the element mask),
with the spare PEs' region taken from their own trainable levels -- never per
activation.

Memory (ResNet-50 has 23.5 M mapped weights): the cells are int8 levels (the
arithmetic promotes them to float exactly); the per-weight column and PE
indices stay in the mapping's compact placement (int16 / int32, built once per
layer, `LayerMap.index_tensors`), and the forward needs none of them: a
weight's column is (its row tile) x out_channels + its output, so the column
multipliers reach every weight through the row tile of each unrolled row
(`row_tile`, one int64 per row, not per weight). Only the spare PEs' region
is a per-weight bool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xbar.crossbar import CrossbarSpec, LayerMap, Mapping, map_model
from xbar.errors import UserError
from xbar.masks import ColumnShiftMask, ElementBinaryMask
from xbar.models import build_model
from xbar.params import Params
from xbar.quant import QuantConv2d, QuantLinear, quantize_model, round_ste

# The per-task head is digital (not mapped onto crossbars); like PACT / LSQ / PROFIT
# keep the last layer, it is quantized to 8 bits: a 4-bit head alone costs tens of points.
HEAD_BITS = 8


class CrossbarLayer(nn.Module):
    """One mapped conv/linear layer of a task model: cell levels x scale, masked, plus the task's trainables."""

    def __init__(self, layer: QuantConv2d | QuantLinear, levels: torch.Tensor, scale: torch.Tensor, lm: LayerMap) -> None:
        super().__init__()
        if isinstance(layer, QuantConv2d) and layer.padding_mode != "zeros":
            raise UserError(f"layer {lm.name}: padding_mode {layer.padding_mode!r} is not supported on crossbars")
        self.name, self.is_conv = lm.name, isinstance(layer, QuantConv2d)
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.is_conv else None
        self.max_level = layer.weight_quant.levels
        self.act_quant = layer.act_quant  # the DAC's clip: the backbone's
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        # the cells: never saved in model_state (levels.pt / task.pt "levels" hold them); int8 levels, a
        # quarter of float's bytes, promoted exactly wherever they meet a float
        self.register_buffer("cells", levels.to(torch.int8), persistent=False)
        self.register_buffer("scale", scale.detach().float().reshape(()), persistent=False)
        self.lm = lm
        self.latent: nn.Parameter | None = None  # fine-tuned / spare-PE weights (real, before quantization)
        self.column_mask: ColumnShiftMask | None = None
        self.element_mask: ElementBinaryMask | None = None
        self.register_buffer("row_tile", None, persistent=False)  # int64 [rows]: each unrolled row's row tile
        self.register_buffer("fixed_columns", None, persistent=False)  # deployed column multipliers
        self.register_buffer("fixed_elements", None, persistent=False)  # deployed element mask
        self.register_buffer("spare", None, persistent=False)  # bool, weight shape: inside a spare PE
        self.register_buffer("spare_columns", None, persistent=False)  # bool [n_columns]
        self.pe_mask: torch.Tensor | None = None  # tier-1 PE mask, only while ranking
        self.register_buffer("pe_local", None, persistent=False)

    # --- setting up a method ------------------------------------------------------

    def _row_tiles(self) -> torch.Tensor:
        """The row tile (within its group) of each unrolled row c * kh*kw + p, from the mapping's column index:
        column[o, r] = row_tile[r] * out_channels + o for every output o (xbar.crossbar.place_weights)."""
        if self.row_tile is None:
            column = self.lm.index_tensors()[0].reshape(self.lm.out_channels, -1)[0]
            self.row_tile = (column.long() // self.lm.out_channels).to(self.cells.device)
        return self.row_tile

    def set_spare_columns(self, spare_pes: torch.Tensor) -> torch.Tensor:
        """Leave the columns inside `spare_pes` (global PE ids) unmasked; returns which weights lie in them
        (bool, weight shape, on the CPU)."""
        column, pe = self.lm.index_tensors()  # the placement's compact tensors, on the CPU
        spare = torch.isin(pe, spare_pes.cpu())
        spare_columns = torch.zeros(self.lm.n_columns, dtype=torch.bool)
        spare_columns[column[spare].long()] = True
        self.spare_columns = spare_columns.to(self.cells.device)
        return spare

    def train_weights(self, spare_pes: torch.Tensor | None = None) -> None:
        """Trainable 4-bit weights from the current levels: all of them, or only inside `spare_pes`."""
        self.latent = nn.Parameter(self.cells * self.scale)
        if spare_pes is not None:
            self.spare = self.set_spare_columns(spare_pes).to(self.cells.device)

    def add_column_mask(self, shift_levels: int, temperature: float) -> None:
        self._row_tiles()
        self.column_mask = ColumnShiftMask(self.lm.n_columns, shift_levels, temperature).to(self.cells.device)

    def add_element_mask(self) -> None:
        self.element_mask = ElementBinaryMask(self.cells.shape).to(self.cells.device)

    def attach_pe_mask(self) -> torch.Tensor:
        """A PE mask of ones (one value per PE of this layer) that the weight is multiplied by."""
        # int32: an index op takes it as it is (int16 it would not); kept only while ranking
        self.pe_local = (self.lm.index_tensors()[1].to(self.cells.device, torch.int32) - self.lm.first_pe)
        self.pe_mask = torch.ones(self.lm.n_pes, device=self.cells.device, requires_grad=True)
        return self.pe_mask

    # --- the weight the crossbar computes with -------------------------------------

    def _levels(self) -> torch.Tensor:
        """`task_levels`, the backbone's as the int8 cells themselves (no float copy per forward)."""
        if self.latent is None:
            return self.cells
        q = torch.clamp(self.latent / self.scale, -self.max_level, self.max_level)
        q = round_ste(q) if self.training else q.round()
        return q if self.spare is None else torch.where(self.spare, q, self.cells)

    def task_levels(self) -> torch.Tensor:
        """Integer levels (float dtype) this task's cells hold: the backbone's, fine-tuned, or spare PEs'."""
        return self._levels().float()

    def weight_multipliers(self, m: torch.Tensor) -> torch.Tensor:
        """Column multipliers `m` [n_columns] as one per weight: m[row_tile[r] * out_channels + o] at weight
        [o, r], gathered through the row tiles (a few thousand indices, not one per weight)."""
        cout = self.lm.out_channels
        per_row = m.view(-1, cout).index_select(0, self._row_tiles())  # [rows, cout]
        return per_row.T.reshape(self.cells.shape)

    def column_multipliers(self) -> torch.Tensor | None:
        """One multiplier per column (spare PEs' columns are unmasked: 1)."""
        if self.column_mask is not None:
            m = self.column_mask()
        elif self.fixed_columns is not None:
            m = self.fixed_columns
        else:
            return None
        return m if self.spare_columns is None else torch.where(self.spare_columns, 1.0, m)

    def weight(self, multipliers: torch.Tensor | None = None) -> torch.Tensor:
        """levels x scale, masked; `multipliers`: the column multipliers to use (default: sampled / deployed now)."""
        w = self._levels() * self.scale
        m = self.column_multipliers() if multipliers is None else multipliers
        if m is not None:
            w = w * self.weight_multipliers(m)  # one gather per forward, through the row tiles
        if self.element_mask is not None:
            w = w * self.element_mask()
        elif self.fixed_elements is not None:
            w = w * self.fixed_elements
        if self.pe_mask is not None:
            w = w * self.pe_mask[self.pe_local]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(self.act_quant(x), self.weight())

    def compute(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer's conv / linear of quantized inputs `x` with weight `w` (ideal arithmetic)."""
        if self.is_conv:
            stride, padding, dilation, groups = self.conv_args
            return F.conv2d(x, w, self.bias, stride, padding, dilation, groups)
        return F.linear(x, w, self.bias)


@dataclass
class TaskModel:
    """A network whose mapped layers are `CrossbarLayer`s, and what the method added."""

    net: nn.Module
    method: str
    mapping: Mapping
    spare_pes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    shift_levels: int | None = None  # column-mask methods only
    bn: str = "frozen"  # the task's BN rule (xbar.params.BnRule)
    # what training did (xbar.methods.recipe.train_task): optimizer steps run, the step whose checkpoint was
    # kept on held-out images (0: the closed-form head on the untrained masks; None: no held-out images, the last)
    steps: int = 0
    kept_step: int | None = None
    curve: list[dict] = field(default_factory=list)  # the held-out checks of training (xbar.methods.validation)
    recipe: str = "default"  # the recipe it trained under (xbar.methods.presets.Recipe.label)
    head_fit: str = "ridge head, then SGD"  # the head procedure (the recipe's, the same for every method)

    def layers(self) -> dict[str, CrossbarLayer]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, CrossbarLayer)}


# --- building ---


def crossbar_spec(params: Params) -> CrossbarSpec:
    return CrossbarSpec.from_params(params.crossbar)


def quantized_net(params: Params, num_classes: int, channels: int) -> nn.Module:
    """The architecture of quant.pt (`quantize_model(build_model(...))`), untrained."""
    return quantize_model(build_model(params.model, num_classes, channels), params.crossbar.weight_bits,
                          params.quant.act_bits)


def backbone_net(params: Params, quant: dict) -> nn.Module:
    """The QAT backbone from quant.pt's contents."""
    net = quantized_net(params, quant["num_classes"], quant["channels"])
    net.load_state_dict(quant["state_dict"])
    return net


def deploy_cells(net: nn.Module, levels: dict, spec: CrossbarSpec) -> Mapping:
    """Replace every mapped layer of `net` by a CrossbarLayer holding `levels` (levels.pt format); in place."""
    mapping = map_model(net, spec)
    missing = [lm.name for lm in mapping.layers if lm.name not in levels]
    if missing:
        raise UserError(f"levels: no cell levels for mapped layer(s) {', '.join(missing[:3])} "
                        "(levels.pt does not match the model in params.yaml: re-run the quantize stage)")
    for lm in mapping.layers:
        parent_name, _, child = lm.name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        entry = levels[lm.name]
        if tuple(entry["levels"].shape) != lm.shape:
            raise UserError(f"levels: layer {lm.name} has shape {tuple(entry['levels'].shape)}, the model {lm.shape}")
        setattr(parent, child, CrossbarLayer(getattr(parent, child), entry["levels"], entry["scale"], lm))
    return mapping


def new_head(net: nn.Module, num_classes: int) -> None:
    """A fresh 8-bit linear head for the task (seeded by the caller's torch seed)."""
    net.head = QuantLinear(net.head.in_features, num_classes, weight_bits=HEAD_BITS, act_bits=HEAD_BITS)
