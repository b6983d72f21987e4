"""Every way of learning a new task on the deployed backbone, behind one interface.

A **task model** is the frozen backbone -- integer cell levels and per-layer
scales from levels.pt -- plus the method's trainables:

| method | trainables | BN |
|---|---|---|
| `finetune_shared` | every weight (4-bit QAT), activation clips, head; starts from the previous shared task | trained |
| `finetune_separate` | the same, from the backbone: one copy per task | trained |
| `piggyback` | element-wise binary mask on every mapped layer, head | frozen (backbone) |
| `xbm` | column binary mask (shift_levels = 0), head | per task |
| `xma` | column shift mask, head | per task |
| `xma2` | spare PEs' weights (4-bit QAT from the backbone's levels), column shift masks on every other PE, head | per task |

Weights are always quantized with the backbone's per-layer scale, so a
fine-tuned or spare-PE weight is a level the same cells can hold; activations
stay 4-bit with the backbone's clips (trained only by fine-tuning). The head is
digital (not mapped) and 8-bit, as quantization papers keep the last layer.

Training, the same recipe for every method (`train_task`):
1. methods that train BN first re-estimate its statistics on the new task
   (`recalibrate_bn`), so training and the head fit below see the same features;
2. the head is fit in closed form (ridge regression on up to 4096 training
   images' features, `init_head`): SGD from a random head on raw pooled features
   is badly conditioned and cost every mask method tens of points;
3. SGD (train.lr, cosine) on weights, head, BN, clips; Adam (train.mask_lr) on masks;
4. BN statistics are re-estimated once more with the deterministic (eval) masks:
   during training the column masks are Gumbel samples, the deployed ones are not.

Per-task BN (xbm / xma / xma2, and fine-tuning): a column mask changes a
channel's partial sums, so the backbone's BN statistics no longer match; each
task trains and re-estimates its own BN (4 x channels values per BN layer,
digital, stored in `model_state`). Piggyback keeps the backbone's BN, as in its
paper.

Each mapped layer becomes a `CrossbarLayer` that builds its weight ONCE per
forward: levels x scale, times the column multipliers gathered through the
precomputed column index of every weight (or the element mask), with the spare
PEs' region taken from their own trainable levels -- never per activation.

`export_task` writes the task.pt contract of docs/artifacts.md and
`load_task_model` rebuilds the deployed model from it; the trained model's
eval forward computes exactly what the rebuilt one does, so predictions match
bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xbar.crossbar import CrossbarSpec, LayerMap, Mapping, map_model
from xbar.errors import UserError
from xbar.masks import ColumnShiftMask, ElementBinaryMask, mask_values
from xbar.models import build_model
from xbar.params import METHODS, Params, TaskSpec, TrainParams
from xbar.quant import QuantConv2d, QuantLinear, quantize_model, round_ste
from xbar.training import as_input, fit

COLUMN_MASK_METHODS = ("xbm", "xma", "xma2")
FINETUNE_METHODS = ("finetune_shared", "finetune_separate")
MASK_METHODS = ("piggyback",) + COLUMN_MASK_METHODS  # the backbone's cells never change outside spare PEs
# Piggyback's real mask lives on a fixed, far smaller scale (init 1e-2, threshold
# 5e-3, constants of the method) than the logit-scale column mask, so its Adam lr
# is a constant too, not train.mask_lr: 5e-4 was the best of 1e-4 / 5e-4 / 2e-3 on
# mnist and animals (1e-4 barely flips a mask; 2e-3 collapses the frozen-BN network).
PIGGYBACK_MASK_LR = 5e-4
WEIGHT_DECAY = 5e-4  # head and fine-tuned / spare-PE weights only
# The per-task head is digital (not mapped onto crossbars); like PACT / LSQ / PROFIT
# keep the last layer, it is quantized to 8 bits: a 4-bit head alone costs tens of points.
HEAD_BITS = 8
HEAD_INIT_IMAGES = 4096  # images whose features fit the head in closed form before training
RIDGE = 1e-2  # relative ridge penalty: keeps the solve stable for batches smaller than the feature width


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
        # the cells: never saved in model_state (levels.pt / task.pt "levels" hold them)
        self.register_buffer("cells", levels.float(), persistent=False)
        self.register_buffer("scale", scale.detach().float().reshape(()), persistent=False)
        self.lm = lm
        self.latent: nn.Parameter | None = None  # fine-tuned / spare-PE weights (real, before quantization)
        self.column_mask: ColumnShiftMask | None = None
        self.element_mask: ElementBinaryMask | None = None
        self.register_buffer("column", None, persistent=False)  # column index of every weight
        self.register_buffer("fixed_columns", None, persistent=False)  # deployed column multipliers
        self.register_buffer("fixed_elements", None, persistent=False)  # deployed element mask
        self.register_buffer("spare", None, persistent=False)  # bool, weight shape: inside a spare PE
        self.register_buffer("spare_columns", None, persistent=False)  # bool [n_columns]
        self.pe_mask: torch.Tensor | None = None  # tier-1 PE mask, only while ranking
        self.register_buffer("pe_local", None, persistent=False)

    # --- setting up a method ------------------------------------------------------

    def _column_index(self) -> torch.Tensor:
        if self.column is None:
            self.column = self.lm.index_tensors()[0].to(self.cells.device)
        return self.column

    def train_weights(self, spare_pes: torch.Tensor | None = None) -> None:
        """Trainable 4-bit weights from the current levels: all of them, or only inside `spare_pes`."""
        self.latent = nn.Parameter(self.cells * self.scale)
        if spare_pes is not None:
            pe = self.lm.index_tensors()[1].to(self.cells.device)
            self.spare = torch.isin(pe, spare_pes)
            self.spare_columns = torch.zeros(self.lm.n_columns, dtype=torch.bool, device=self.cells.device)
            self.spare_columns[self._column_index()[self.spare]] = True

    def add_column_mask(self, shift_levels: int, temperature: float) -> None:
        self._column_index()
        self.column_mask = ColumnShiftMask(self.lm.n_columns, shift_levels, temperature).to(self.cells.device)

    def add_element_mask(self) -> None:
        self.element_mask = ElementBinaryMask(self.cells.shape).to(self.cells.device)

    def attach_pe_mask(self) -> torch.Tensor:
        """A PE mask of ones (one value per PE of this layer) that the weight is multiplied by."""
        self.pe_local = self.lm.index_tensors()[1].to(self.cells.device) - self.lm.first_pe
        self.pe_mask = torch.ones(self.lm.n_pes, device=self.cells.device, requires_grad=True)
        return self.pe_mask

    # --- the weight the crossbar computes with -------------------------------------

    def task_levels(self) -> torch.Tensor:
        """Integer levels (float dtype) this task's cells hold: the backbone's, fine-tuned, or spare PEs'."""
        if self.latent is None:
            return self.cells
        q = torch.clamp(self.latent / self.scale, -self.max_level, self.max_level)
        q = round_ste(q) if self.training else q.round()
        return q if self.spare is None else torch.where(self.spare, q, self.cells)

    def column_multipliers(self) -> torch.Tensor | None:
        """One multiplier per column (spare PEs' columns are unmasked: 1)."""
        if self.column_mask is not None:
            m = self.column_mask()
        elif self.fixed_columns is not None:
            m = self.fixed_columns
        else:
            return None
        return m if self.spare_columns is None else torch.where(self.spare_columns, 1.0, m)

    def weight(self) -> torch.Tensor:
        w = self.task_levels() * self.scale
        m = self.column_multipliers()
        if m is not None:
            w = w * m[self.column]  # one gather per forward: the column index was built once
        if self.element_mask is not None:
            w = w * self.element_mask()
        elif self.fixed_elements is not None:
            w = w * self.fixed_elements
        if self.pe_mask is not None:
            w = w * self.pe_mask[self.pe_local]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self.act_quant(x), self.weight()
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

    def layers(self) -> dict[str, CrossbarLayer]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, CrossbarLayer)}


# --- building ------------------------------------------------------------------------


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


def ridge_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) of the least-squares fit of one-hot labels (float64, deterministic)."""
    f = features.detach().double()
    mean = f.mean(0)
    fc = f - mean
    target = F.one_hot(labels, num_classes).double()
    gram = fc.T @ fc
    penalty = RIDGE * (gram.diagonal().mean() + 1e-12)
    w = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype), fc.T @ (target - target.mean(0)))
    b = target.mean(0) - mean @ w
    return w.T.to(features.dtype), b.to(features.dtype)


@torch.no_grad()
def init_head(model: TaskModel, data, seed: int, batch_size: int = 512) -> None:  # noqa: ANN001 (Dataset)
    """Fit the head in closed form on the untrained task model's features (LP-FT's linear probe).

    SGD from a random head on the backbone's raw pooled features (large common
    mean) is badly conditioned and leaves every method tens of points short;
    ridge regression of one-hot labels on up to HEAD_INIT_IMAGES seeded training
    images, with the logit scale that minimizes cross-entropy, starts the head
    where a linear probe ends. Same for every method, so the comparison is fair.
    """
    net = model.net
    was_training = net.training
    net.eval()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:HEAD_INIT_IMAGES]
    feats, labels = [], []
    for chunk in idx.split(batch_size):
        x, y = zip(*(data[int(i)] for i in chunk))
        feats.append(net.features(as_input(torch.stack(x))))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    f, y = torch.cat(feats), torch.cat(labels)
    w, b = ridge_head(f, y, net.head.out_features)
    logits = f @ w.T + b
    scales = torch.logspace(-1, 3, 41)
    best = min(scales.tolist(), key=lambda s: float(F.cross_entropy(logits * s, y)))
    net.head.weight.copy_(w * best)
    net.head.bias.copy_(b * best)
    net.head.weight_quant.ready.fill_(False)  # clips start from the fitted weights / real features
    net.head.act_quant.ready.fill_(False)
    net.train(was_training)


def check_spec(spec: TaskSpec, n_train: int | None = None) -> None:
    """Bad task input, as one line (the parameter model checks most of this already at load)."""
    if spec.method not in METHODS:
        raise UserError(f"method: {spec.method!r} is unknown (one of {', '.join(METHODS)})")
    if not (isinstance(spec.shift_levels, int) and 0 <= spec.shift_levels <= 3):
        raise UserError(f"shift_levels: {spec.shift_levels!r} is outside 0..3")
    if not 0 < spec.spare_ratio <= 1:
        raise UserError(f"spare_ratio: {spec.spare_ratio!r} is outside (0, 1]")
    if n_train is not None and spec.rank_batch_size > n_train:
        raise UserError(f"rank_batch_size: {spec.rank_batch_size} is larger than the task's training set "
                        f"({n_train} images)")


def n_spare_pes(spare_ratio: float, n_pes: int) -> int:
    """Top-P% of the PEs: ceil(P * n_pes) (at least one for any P > 0)."""
    return min(n_pes, math.ceil(spare_ratio * n_pes - 1e-9))


def build_task_model(params: Params, spec: TaskSpec, quant: dict, levels: dict, num_classes: int,
                     spare_pes: torch.Tensor | None = None, start: dict | None = None) -> TaskModel:
    """The trainable task model of `spec.method` on the backbone.

    `levels` is levels.pt; `spare_pes` the ranked PEs (xma2); `start` a previous
    finetune_shared task.pt to continue from (finetune_shared only).
    """
    check_spec(spec)
    method = spec.method
    net = backbone_net(params, quant)
    if start is not None:
        if method != "finetune_shared":
            raise ValueError("only finetune_shared continues from a previous task")
        # the previous task's network (levels, BN, clips) -- its head is replaced below
        levels = {k: {"levels": start["levels"][k], "scale": start["scales"][k]} for k in start["levels"]}
        body = {k: v for k, v in start["model_state"].items() if not k.startswith("head.")}
    new_head(net, num_classes)
    mapping = deploy_cells(net, levels, crossbar_spec(params))
    if start is not None:
        net.load_state_dict(body, strict=False)
    model = TaskModel(net, method, mapping)
    layers = model.layers()
    if method == "xma2":
        if spare_pes is None:
            raise ValueError("xma2 needs the ranked spare PEs")
        model.spare_pes = torch.as_tensor(spare_pes, dtype=torch.int64).sort().values
        for lm in mapping.layers:  # only layers that hold a spare PE get trainable weights
            if bool(((model.spare_pes >= lm.first_pe) & (model.spare_pes < lm.first_pe + lm.n_pes)).any()):
                layers[lm.name].train_weights(model.spare_pes)
    if method in COLUMN_MASK_METHODS:
        model.shift_levels = 0 if method == "xbm" else spec.shift_levels
        for layer in layers.values():
            layer.add_column_mask(model.shift_levels, params.train.temperature)
    elif method == "piggyback":
        for layer in layers.values():
            layer.add_element_mask()
    elif method in FINETUNE_METHODS:
        for layer in layers.values():
            layer.train_weights()
    set_trainable(model)
    return model


def set_trainable(model: TaskModel) -> None:
    """requires_grad exactly on the method's trainables (see the module's table)."""
    net, method = model.net, model.method
    for p in net.parameters():
        p.requires_grad_(method in FINETUNE_METHODS)  # fine-tuning trains everything (BN, clips too)
    for p in net.head.parameters():
        p.requires_grad_(True)
    if method in COLUMN_MASK_METHODS:  # per-task BN
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(True)
    for layer in model.layers().values():
        for p in (layer.latent, layer.column_mask, layer.element_mask):
            if p is not None:
                (p if isinstance(p, nn.Parameter) else p.real).requires_grad_(True)


@dataclass
class ParameterGroups:
    """The trainables by optimizer role."""

    cells: list[nn.Parameter]  # crossbar weights: fine-tuned or spare-PE weights (SGD, decay)
    head: list[nn.Parameter]  # the task head (weight decay on its weight)
    digital: list[nn.Parameter]  # BN affine, activation clips (no decay)
    masks: list[nn.Parameter]  # real-valued masks (Adam)


def parameter_groups(model: TaskModel) -> ParameterGroups:
    groups = ParameterGroups([], [], [], [])
    for layer in model.layers().values():
        for mask in (layer.column_mask, layer.element_mask):
            if mask is not None:
                groups.masks.append(mask.real)
        if layer.latent is not None:
            groups.cells.append(layer.latent)
    groups.head = [p for p in model.net.head.parameters() if p.requires_grad]
    taken = {id(p) for p in groups.cells + groups.head + groups.masks}
    groups.digital = [p for p in model.net.parameters() if p.requires_grad and id(p) not in taken]
    return groups


def trainable_names(model: TaskModel) -> set[str]:
    return {n for n, p in model.net.named_parameters() if p.requires_grad}


def trains_bn(method: str) -> bool:
    return method in FINETUNE_METHODS + COLUMN_MASK_METHODS


@torch.no_grad()
def recalibrate_bn(model: TaskModel, data, seed: int, batch_size: int = 128) -> None:  # noqa: ANN001 (Dataset)
    """Re-estimate BN statistics with the deterministic (eval) masks and levels.

    During training the column masks are Gumbel samples, so the running
    statistics describe a noisy network; the deployed one has no noise. One
    pass over up to HEAD_INIT_IMAGES seeded training images with every mask in
    eval mode and BN averaging (momentum None) fixes the mismatch.
    """
    net = model.net
    net.eval()
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the pass
        bn.train()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))[:HEAD_INIT_IMAGES]
    for chunk in idx.split(batch_size):
        net(as_input(torch.stack([data[int(i)][0] for i in chunk])))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    net.eval()


def train_mode(model: TaskModel):  # noqa: ANN201 (a callable for fit)
    """Training mode, except Piggyback's BN, which keeps the backbone's statistics."""

    def apply(net: nn.Module) -> None:
        net.train()
        if model.method == "piggyback":
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    return apply


def optimizers(model: TaskModel, train: TrainParams) -> list[torch.optim.Optimizer]:
    """SGD (lr, momentum) on weights, head, BN and clips; Adam on the real-valued masks
    (train.mask_lr for column masks, PIGGYBACK_MASK_LR for Piggyback's).

    (Adam on the head and BN was tried: it adapts the head too slowly to the
    masked features, -1 to -4 points for xma / xma2.)
    """
    g = parameter_groups(model)
    head_weight = model.net.head.weight
    groups = [{"params": g.cells + [head_weight], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in g.head if p is not head_weight] + g.digital, "weight_decay": 0.0}]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=train.momentum > 0)]
    if g.masks:
        lr = PIGGYBACK_MASK_LR if model.method == "piggyback" else train.mask_lr
        opts.append(torch.optim.Adam(g.masks, lr=lr))
    return opts


def train_task(model: TaskModel, data, spec: TaskSpec, train: TrainParams, seed: int, desc: str) -> float:  # noqa: ANN001
    """Fit the head in closed form, then train the method's trainables; returns the last epoch's mean loss."""
    if trains_bn(model.method):  # per-task BN starts from the task's own statistics
        recalibrate_bn(model, data, seed)
    init_head(model, data, seed)
    noise = torch.Generator().manual_seed(seed)  # Gumbel noise of its own: no other training draws from it
    for layer in model.layers().values():
        if layer.column_mask is not None:
            layer.column_mask.generator = noise
    opts = optimizers(model, train)
    steps = spec.epochs * math.ceil(len(data) / train.batch_size)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) for opt in opts]

    def after_step() -> None:
        for s in schedules:
            s.step()

    loss = fit(model.net, data, opts, spec.epochs, train.batch_size, seed, desc,
               after_step=after_step, train_mode=train_mode(model))
    if trains_bn(model.method):
        recalibrate_bn(model, data, seed)
    return loss


# --- export / rebuild ------------------------------------------------------------------


def _exported_keys(model: TaskModel) -> set[str]:
    """state_dict keys held by task.pt's levels / masks, not by model_state."""
    keys = set()
    for name, layer in model.layers().items():
        for key, obj in (("latent", layer.latent), ("column_mask.real", layer.column_mask),
                         ("element_mask.real", layer.element_mask)):
            if obj is not None:
                keys.add(f"{name}.{key}")
    return keys


@torch.no_grad()
def export_task(model: TaskModel, num_classes: int, channels: int, dataset_digest: str = "") -> dict:
    """task.pt's contents (docs/artifacts.md)."""
    was_training = model.net.training
    model.net.eval()
    layers = model.layers()
    task = {
        "method": model.method,
        "levels": {n: l.task_levels().to(torch.int8).contiguous() for n, l in layers.items()},
        "scales": {n: l.scale.detach().clone() for n, l in layers.items()},
        "spare_pes": model.spare_pes.clone(),
        "column_masks": {},
        "mask_values": torch.zeros(0),
        "element_masks": {},
        "num_classes": int(num_classes),
        "channels": int(channels),
        "dataset_digest": dataset_digest,
    }
    if model.method in COLUMN_MASK_METHODS:
        values = mask_values(model.shift_levels)
        task["mask_values"] = values
        one = len(values) - 1
        for n, l in layers.items():
            codes = l.column_mask.codes()
            if l.spare_columns is not None:  # a spare PE's columns are not masked
                codes = torch.where(l.spare_columns, one, codes.long()).to(torch.uint8)
            task["column_masks"][n] = codes.contiguous()
    if model.method == "piggyback":
        task["element_masks"] = {n: l.element_mask.binary().clone() for n, l in layers.items()}
    skip = _exported_keys(model)
    task["model_state"] = {k: v.detach().clone() for k, v in model.net.state_dict().items() if k not in skip}
    model.net.train(was_training)
    return task


def load_task_model(task: dict, levels: dict, params: Params) -> TaskModel:
    """Rebuild a learned task's deployed model from task.pt + levels.pt (eval mode).

    Raises UserError if a mask method's cells differ from the backbone's outside
    its spare PEs: that would break the no-forgetting invariant.
    """
    method = task.get("method")
    if method not in METHODS:
        raise UserError(f"task.pt: unknown method {method!r}")
    net = quantized_net(params, task["num_classes"], task["channels"])
    new_head(net, task["num_classes"])
    cells = {k: {"levels": task["levels"][k], "scale": task["scales"][k]} for k in task["levels"]}
    mapping = deploy_cells(net, cells, crossbar_spec(params))
    spare_pes = task["spare_pes"].to(torch.int64)
    model = TaskModel(net, method, mapping, spare_pes)
    for name, layer in model.layers().items():
        if method in MASK_METHODS:
            _check_backbone_cells(name, layer, levels, spare_pes)
        if name in task["column_masks"]:
            layer._column_index()
            layer.fixed_columns = task["mask_values"].float()[task["column_masks"][name].long()]
            if spare_pes.numel():
                pe = layer.lm.index_tensors()[1]
                spare = torch.isin(pe, spare_pes)
                layer.spare_columns = torch.zeros(layer.lm.n_columns, dtype=torch.bool)
                layer.spare_columns[layer.column[spare]] = True
        if name in task["element_masks"]:
            layer.fixed_elements = task["element_masks"][name].float()
    if task["column_masks"]:
        model.shift_levels = len(task["mask_values"]) - 2
    try:
        net.load_state_dict(task["model_state"])
    except RuntimeError as err:
        raise UserError(f"task.pt: model_state does not fit the model in params.yaml ({str(err).splitlines()[0]})") from None
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    return model


def _check_backbone_cells(name: str, layer: CrossbarLayer, levels: dict, spare_pes: torch.Tensor) -> None:
    if name not in levels:
        raise UserError(f"levels.pt: no levels for layer {name}")
    backbone = levels[name]["levels"].float()
    same = layer.cells == backbone
    if spare_pes.numel():
        same |= torch.isin(layer.lm.index_tensors()[1], spare_pes)
    if not bool(same.all()) or not torch.equal(layer.scale, levels[name]["scale"].float().reshape(())):
        raise UserError(f"task.pt: layer {name} changes backbone cells outside its spare PEs "
                        "(the no-forgetting invariant is broken; re-run train_masks)")


def shared_view(earlier: dict, latest: dict) -> dict:
    """What a finetune_shared task computes after later shared tasks: the latest network, its own head.

    (This is where catastrophic forgetting shows: the shared weights moved on.)
    """
    view = dict(earlier)
    view["levels"], view["scales"] = latest["levels"], latest["scales"]
    state = {k: v for k, v in latest["model_state"].items() if not k.startswith("head.")}
    state.update({k: v for k, v in earlier["model_state"].items() if k.startswith("head.")})
    view["model_state"] = state
    return view


def chip_view(tasks: dict[str, dict], name: str) -> dict:
    """Task `name` as the chip runs it once every task of `tasks` (name -> task.pt, in learning order)
    is learned: its own task.pt, except that a finetune_shared task runs on the latest shared network."""
    task = tasks[name]
    if task["method"] != "finetune_shared":
        return task
    latest = [t for t in tasks.values() if t["method"] == "finetune_shared"][-1]
    return shared_view(task, latest)


# --- reporting ------------------------------------------------------------------------


def layer_mask_levels(task: dict, mapping: Mapping) -> dict[str, torch.Tensor]:
    """Per mapped layer, how many columns of frozen PEs hold each mask level code (column masks only)."""
    out = {}
    for lm in mapping.layers:
        codes = task["column_masks"][lm.name].long()
        if task["spare_pes"].numel():  # a spare PE's columns carry no mask
            column, pe = lm.index_tensors()
            frozen = torch.ones(lm.n_columns, dtype=torch.bool)
            frozen[column[torch.isin(pe, task["spare_pes"])]] = False
            codes = codes[frozen]
        out[lm.name] = torch.bincount(codes, minlength=len(task["mask_values"]))
    return out


def mask_report(task: dict, mapping: Mapping) -> dict:
    """Mask level histogram and mask memory (bytes) of a task.pt.

    Column masks count the columns of frozen PEs only (a spare PE's columns
    carry no mask): K = len(mask_values) values per column, unpacked =
    ceil(log2 K) bits each, packed = 3 codes in ceil(3 log2 K) bits (5 values:
    3 in 7 bits). Piggyback: 1 bit per weight.
    """
    if task["column_masks"]:
        values = task["mask_values"].tolist()
        counts = sum(layer_mask_levels(task, mapping).values())
        masked, k = int(counts.sum()), len(values)
        return {"mask_histogram": {f"{v:g}": int(c) for v, c in zip(values, counts)}, "masked_units": masked,
                "mask_bytes_unpacked": math.ceil(masked * math.ceil(math.log2(k)) / 8),
                "mask_bytes_packed": math.ceil(math.ceil(masked / 3) * math.ceil(3 * math.log2(k)) / 8)}
    if task["element_masks"]:
        ones = sum(int(m.sum()) for m in task["element_masks"].values())
        total = sum(m.numel() for m in task["element_masks"].values())
        return {"mask_histogram": {"0": total - ones, "1": ones}, "masked_units": total,
                "mask_bytes_unpacked": math.ceil(total / 8), "mask_bytes_packed": math.ceil(total / 8)}
    return {"mask_histogram": {}, "masked_units": 0, "mask_bytes_unpacked": 0, "mask_bytes_packed": 0}
