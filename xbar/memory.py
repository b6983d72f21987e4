"""Per-task mask memory of each method, from a crossbar Mapping.

What a task stores beyond the frozen backbone cells (bits; bytes = ceil(bits / 8)):

* Piggyback: a binary mask per weight: `weights` bits.
* Column binary mask (XBM): one bit per column: `columns` bits.
* Column shift mask (XMA) with N shift levels: N + 2 values per column
  (0, 1/2**N .. 1/2, 1). Unpacked, each column takes ceil(log2(N + 2)) bits;
  packed (three columns' values coded together as one base-(N+2) number:
  3 values of 5 levels in 7 bits), ceil(3 log2(N + 2)) bits per three columns
  (`column_mask_bytes`, also a trained task's mask bytes). N = 0 is XBM.
* XMA2: the tier-1 PE mask (one bit per PE), the packed column shift mask of
  the frozen PEs only, the spare PEs' weights at weight_bits each, and the
  task's head and BN parameters at `param_bits` (fp32, digital).

All-in per-task storage (`task_storage`, one definition for every registered
method): masks + re-programmed cells (spare PEs, or every weight of a
fine-tune, at weight_bits) + the task's BN when its rule is `per_task` (a folded
scale and shift per channel, fp32) + the head (fp32). Under `bn: frozen` the
task stores no BN: it runs on the backbone's.

The backbone's `head` is not mapped; `head_params` / `bn_params` are counted
by the caller (BN as a folded scale and shift per channel). Which PEs become
spare PEs is a per-task ranking; without it, the estimate takes the
ceil(spare_ratio * PEs) fullest PEs, an upper bound for the spare weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from xbar.crossbar import CrossbarSpec, Mapping, map_model, spare_pe_count
from xbar.errors import UserError

HEAD_NAMES = ("head",)  # every backbone's per-task classifier (xbar.backbones: the registry's contract)
AUX_NAMES: tuple[str, ...] = ()  # training-only classifiers: xbar.backbones.wrap drops them before mapping


def shift_values(shift_levels: int) -> int:
    """Values a column shift mask takes: 0, 1 and the N shifts 1/2 .. 1/2**N (N: xbar.params ShiftLevels)."""
    return shift_levels + 2


PACK = 3  # mask codes packed together: 3 codes of 5 values in 7 bits (5**3 = 125 <= 2**7)


def mask_bits_for(n_values: int) -> int:
    """Bits one column's mask code takes (unpacked, as the mask buffer reads it): ceil(log2 K); 0 without
    a mask (K <= 1)."""
    return math.ceil(math.log2(n_values)) if n_values > 1 else 0


def column_mask_bytes(columns: int, n_values: int, packed: bool) -> int:
    """Bytes of one task's column mask over `columns` columns of K = `n_values` values each.

    Unpacked: ceil(log2 K) bits per column. Packed: every PACK = 3 columns' codes together as one base-K
    number in ceil(3 log2 K) bits (5 values: 3 codes in 7 bits, 2.33 bits per column; 3 values: 3 in 5;
    2 values: 3 in 3, i.e. one bit each), a packing a mask buffer can decode per group of columns.
    """
    if packed:
        bits = math.ceil(columns / PACK) * (math.ceil(PACK * math.log2(n_values)) if n_values > 1 else 0)
    else:
        bits = columns * mask_bits_for(n_values)
    return to_bytes(bits)


def to_bytes(bits: int | float) -> int:
    return math.ceil(bits / 8)


def fullest_pes(mapping: Mapping, n: int) -> torch.Tensor:
    """The n PEs holding most weights (ties: lower id), sorted: without a per-task ranking, the spare
    PEs of an estimate (an upper bound for the spare-PE weights and their writes)."""
    weights = mapping.pe_counts()[1].tolist()
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    return torch.tensor(sorted(order[:n]), dtype=torch.int64)


@dataclass(frozen=True)
class MemoryReport:
    """Per-task mask memory (bytes) and the mapping figures it follows from."""

    weights: int  # mapped weights (conv + linear of the backbone)
    conv_weights: int
    crossbars: int
    pes: int
    columns: int
    weight_bits: int
    shift_levels: int
    shift_values: int
    spare_ratio: float
    spare_pes: int
    spare_pe_weights: int
    head_params: int
    bn_params: int
    piggyback_bytes: int
    column_binary_bytes: int
    column_shift_bytes: int  # unpacked: ceil(log2(N + 2)) bits per column
    column_shift_packed_bytes: int  # packed: 3 columns in ceil(3 log2(N + 2)) bits (column_mask_bytes)
    xma2_pe_mask_bytes: int
    xma2_column_shift_bytes: int  # packed, frozen PEs only
    xma2_spare_weight_bytes: int
    head_bytes: int
    bn_bytes: int
    xma2_bytes: int
    bn_rule: str  # train.bn the all-in figures below assume
    per_task_bytes: dict[str, int]  # every registered method: all in, masks packed (`task_storage`)
    per_task_bytes_unpacked: dict[str, int]

    @property
    def shift_packed_vs_piggyback(self) -> float:
        return self.column_shift_packed_bytes / max(1, self.piggyback_bytes)

    def as_dict(self) -> dict:
        return asdict(self) | {"shift_packed_vs_piggyback": round(self.shift_packed_vs_piggyback, 6)}


@dataclass(frozen=True)
class TaskStorage:
    """One task's storage beyond the frozen backbone cells (bytes), the same definition for every method."""

    masks: int  # column masks of the frozen PEs' columns, element masks, the tier-1 PE mask
    cells: int  # re-programmed weights at weight_bits: the spare PEs', or every weight of a fine-tune
    bn: int  # per-task BN (a folded scale and shift per channel, fp32); 0 under `bn: frozen`
    head: int  # the task head (fp32)

    @property
    def total(self) -> int:
        return self.masks + self.cells + self.bn + self.head


def _spare(mapping: Mapping, spare_ratio: float, spare_pes: list[int] | torch.Tensor | None) -> torch.Tensor:
    if spare_pes is None:  # upper bound: the fullest PEs
        return fullest_pes(mapping, spare_pe_count(spare_ratio, mapping.n_pes))
    spare = torch.as_tensor(spare_pes, dtype=torch.int64).unique()
    if spare.numel() and (spare.min() < 0 or spare.max() >= mapping.n_pes):
        raise UserError(f"spare PEs: ids must lie in [0, {mapping.n_pes}), got {spare.tolist()}")
    return spare


def task_storage(method: str, mapping: Mapping, *, shift_levels: int = 3, spare_ratio: float = 0.1,
                 spare_pes: list[int] | torch.Tensor | None = None, bn_rule: str = "frozen", head_params: int = 0,
                 bn_params: int = 0, packed: bool = True, param_bits: int = 32) -> TaskStorage:
    """All-in storage of one task of `method` on `mapping` (module doc); `bn_rule` is train.bn (a method
    that cannot use it has its own, `Method.bn_rule`), `spare_pes` the ranked PEs when known."""
    from xbar.methods.registry import get  # the registry imports no torch; the methods package imports this

    m = get(method)
    columns_pe, weights_pe = mapping.pe_counts()
    spare = _spare(mapping, spare_ratio, spare_pes) if m.spare_pes else torch.zeros(0, dtype=torch.int64)
    masks = 0
    if m.column_masks:
        frozen_columns = int(columns_pe.sum() - columns_pe[spare].sum())
        masks += column_mask_bytes(frozen_columns, shift_values(m.mask_shift_levels(shift_levels)), packed)
    if m.element_masks:
        masks += to_bytes(mapping.n_weights)
    if m.spare_pes:
        masks += to_bytes(mapping.n_pes)  # the tier-1 PE mask: one bit per PE
    weights = mapping.n_weights if m.trains_all else int(weights_pe[spare].sum())
    own_bn = m.bn_rule(None, bn_rule) == "per_task"
    return TaskStorage(masks=masks, cells=to_bytes(weights * mapping.spec.weight_bits),
                       bn=to_bytes(bn_params * param_bits) if own_bn else 0, head=to_bytes(head_params * param_bits))


def memory_report(mapping: Mapping, shift_levels: int = 3, spare_ratio: float = 0.1, head_params: int = 0,
                  bn_params: int = 0, spare_pes: list[int] | torch.Tensor | None = None,
                  param_bits: int = 32, bn_rule: str = "frozen") -> MemoryReport:
    """Mask memory of one task on `mapping`; `spare_pes` (global PE ids) when the ranking is known."""
    from xbar.methods.registry import names

    columns_pe, weights_pe = mapping.pe_counts()
    spare = _spare(mapping, spare_ratio, spare_pes)
    frozen_columns = int(columns_pe.sum() - columns_pe[spare].sum())
    spare_weights = int(weights_pe[spare].sum())
    wb = mapping.spec.weight_bits
    parts = dict(
        xma2_pe_mask_bytes=to_bytes(mapping.n_pes),
        xma2_column_shift_bytes=column_mask_bytes(frozen_columns, shift_values(shift_levels), packed=True),
        xma2_spare_weight_bytes=to_bytes(spare_weights * wb),
        head_bytes=to_bytes(head_params * param_bits),
        bn_bytes=to_bytes(bn_params * param_bits),
    )
    return MemoryReport(
        weights=mapping.n_weights,
        conv_weights=sum(lm.weights for lm in mapping.layers if lm.kind == "conv"),
        crossbars=mapping.n_crossbars,
        pes=mapping.n_pes,
        columns=mapping.n_columns,
        weight_bits=wb,
        shift_levels=shift_levels,
        shift_values=shift_values(shift_levels),
        spare_ratio=spare_ratio,
        spare_pes=int(spare.numel()),
        spare_pe_weights=spare_weights,
        head_params=head_params,
        bn_params=bn_params,
        piggyback_bytes=to_bytes(mapping.n_weights),
        column_binary_bytes=column_mask_bytes(mapping.n_columns, 2, packed=False),
        column_shift_bytes=column_mask_bytes(mapping.n_columns, shift_values(shift_levels), packed=False),
        column_shift_packed_bytes=column_mask_bytes(mapping.n_columns, shift_values(shift_levels), packed=True),
        **parts,
        xma2_bytes=sum(parts.values()),
        bn_rule=bn_rule,
        **{key: {m: task_storage(m, mapping, shift_levels=shift_levels, spare_pes=spare, bn_rule=bn_rule,
                                 head_params=head_params, bn_params=bn_params, packed=packed,
                                 param_bits=param_bits).total for m in names()}
           for key, packed in (("per_task_bytes", True), ("per_task_bytes_unpacked", False))},
    )


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def head_and_bn_params(model: nn.Module, head: tuple[str, ...] = HEAD_NAMES,
                       skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(head parameters, BN parameters) a task stores: the classifier's weights and biases, and a
    folded scale + shift per channel of every normalization layer outside the head (and `skip`)."""
    head_params = sum(p.numel() for n, p in model.named_parameters() if _under(n, head))
    bn_params = sum(2 * m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
                    and getattr(m, "weight", None) is not None and not _under(n, head + skip))
    return head_params, bn_params


def build_named_model(name: str) -> nn.Module:
    """A backbone by name (xbar.backbones: a registered one, or any torchvision classification model) in its
    usual form (`Backbone.usual`: classes, input channels), without weights, on the meta device (shapes only:
    nothing is allocated)."""
    from xbar.backbones import get, known, unknown_message
    from xbar.models import build_model
    from xbar.params import ModelParams

    if not known(name):
        raise UserError(f"--model: {unknown_message(name)}")
    classes, channels = get(name).usual
    with torch.device("meta"):
        return build_model(ModelParams(name=name), num_classes=classes, in_channels=channels)


def named_model_report(name: str, spec: CrossbarSpec, shift_levels: int = 3, spare_ratio: float = 0.1,
                       bn_rule: str = "frozen", classes: int | None = None) -> tuple[Mapping, MemoryReport]:
    """Map a model by name (its classifier head excluded) and account one task's mask memory; the task's
    head has `classes` outputs (None: the model's own head, e.g. ImageNet's 1000)."""
    model = build_named_model(name)
    mapping = map_model(model, spec, exclude=HEAD_NAMES)
    if not mapping.layers:
        raise UserError(f"--model: {name} has no Conv2d / Linear layer to map")
    head_params, bn_params = head_and_bn_params(model, HEAD_NAMES)
    if classes is not None:
        head_params += (classes - model.head.out_features) * (model.head.in_features + 1)
    return mapping, memory_report(mapping, shift_levels, spare_ratio, head_params, bn_params, bn_rule=bn_rule)
