"""A task's life as data: build its trainable model, export task.pt, rebuild the deployed model.

`export_task` writes the task.pt contract of docs/artifacts.md and
`load_task_model` rebuilds the deployed model from it; the trained model's
eval forward computes exactly what the rebuilt one does, so predictions match
bit for bit. What differs between methods comes from the registry
(`attach`, `export_masks`, `keeps_backbone`, `chip_view`).
"""

from __future__ import annotations

import torch

from xbar.crossbar import Mapping
from xbar.errors import UserError
from xbar.memory import TaskStorage, column_mask_bytes, task_storage
from xbar.methods.layers import CrossbarLayer, TaskModel, backbone_net, crossbar_spec, deploy_cells, new_head, quantized_net
from xbar.methods.recipe import set_trainable
from xbar.methods.registry import get, known, names
from xbar.params import Params, TaskSpec
from xbar.runtime import to_cpu


def check_spec(spec: TaskSpec, n_train: int, num_classes: int) -> None:
    """What params.yaml cannot check: the task against its training set (one line)."""
    if n_train < num_classes:
        raise UserError(f"dataset: {n_train} training image(s) for {num_classes} classes (a task needs at least "
                        "one per class: add images or raise max_train)")
    if spec.rank_batch_size > n_train:
        raise UserError(f"rank_batch_size: {spec.rank_batch_size} is larger than the task's training set "
                        f"({n_train} images)")


def build_task_model(params: Params, spec: TaskSpec, quant: dict, levels: dict, num_classes: int,
                     spare_pes: torch.Tensor | None = None, start: dict | None = None) -> TaskModel:
    """The trainable task model of `spec.method` on the backbone.

    `levels` is levels.pt; `spare_pes` the ranked PEs (a method with spare PEs);
    `start` a previous task.pt to continue from (a method that `continues_previous`).
    """
    method = get(spec.method)
    net = backbone_net(params, quant)
    body = None
    if start is not None:
        if not method.continues_previous:
            raise ValueError(f"{method.name} does not continue from a previous task")
        # the previous task's network (levels, BN, clips) -- its head is replaced below
        levels = {k: {"levels": start["levels"][k], "scale": start["scales"][k]} for k in start["levels"]}
        body = {k: v for k, v in start["model_state"].items() if not k.startswith("head.")}
    new_head(net, num_classes)
    mapping = deploy_cells(net, levels, crossbar_spec(params))
    if body is not None:
        net.load_state_dict(body, strict=False)
    from xbar.methods.presets import recipe_for

    model = TaskModel(net, method.name, mapping, bn=recipe_for(params.train.recipe, method.name).bn or params.bn_rule(spec))
    if method.spare_pes:
        if spare_pes is None:
            raise ValueError(f"{method.name} needs the ranked spare PEs")
        model.spare_pes = torch.as_tensor(spare_pes, dtype=torch.int64).sort().values
    method.attach(model, spec, params.train)
    set_trainable(model)
    mapping.release_placements()  # not resident while the task trains (xbar.crossbar)
    return model


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
    """task.pt's contents (docs/artifacts.md), CPU tensors whatever device the model trained on."""
    was_training = model.net.training
    model.net.eval()
    layers = model.layers()
    task = {
        "method": model.method,
        "bn": model.bn,
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
    get(model.method).export_masks(model, task)
    skip = _exported_keys(model)
    task["model_state"] = {k: v.detach().clone() for k, v in model.net.state_dict().items() if k not in skip}
    model.net.train(was_training)
    return to_cpu(task)


def load_task_model(task: dict, levels: dict, params: Params) -> TaskModel:
    """Rebuild a learned task's deployed model from task.pt + levels.pt (eval mode).

    Raises UserError if a mask method's cells differ from the backbone's outside
    its spare PEs: that would break the no-forgetting invariant.
    """
    method = task.get("method")
    if not known(method):
        raise UserError(f"task.pt: unknown method {method!r} (one of {', '.join(names())})")
    keeps_backbone = get(method).keeps_backbone
    net = quantized_net(params, task["num_classes"], task["channels"])
    new_head(net, task["num_classes"])
    cells = {k: {"levels": task["levels"][k], "scale": task["scales"][k]} for k in task["levels"]}
    mapping = deploy_cells(net, cells, crossbar_spec(params))
    spare_pes = task["spare_pes"].to(torch.int64)
    model = TaskModel(net, method, mapping, spare_pes, bn=task["bn"])
    for name, layer in model.layers().items():
        if keeps_backbone:
            _check_backbone_cells(name, layer, levels, spare_pes)
        if name in task["column_masks"]:
            layer.fixed_columns = task["mask_values"].float()[task["column_masks"][name].long()]
            if spare_pes.numel():
                layer.set_spare_columns(spare_pes)
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
    same = layer.cells == levels[name]["levels"]  # int8 against int8 (or any integer / float dtype: exact)
    if spare_pes.numel():
        same |= torch.isin(layer.lm.index_tensors()[1], spare_pes)
    if not bool(same.all()) or not torch.equal(layer.scale, levels[name]["scale"].float().reshape(())):
        raise UserError(f"task.pt: layer {name} changes backbone cells outside its spare PEs "
                        "(the no-forgetting invariant is broken; re-run train_masks)")


def chip_view(tasks: dict[str, dict], name: str) -> dict:
    """Task `name` as the chip runs it once every task of `tasks` (name -> task.pt, in learning order)
    is learned: its own task.pt, unless its method says otherwise (finetune_shared: the latest shared network)."""
    return get(tasks[name]["method"]).chip_view(tasks, name)


# --- reporting ---


def layer_mask_levels(task: dict, mapping: Mapping) -> dict[str, torch.Tensor]:
    """Per mapped layer, how many columns of frozen PEs hold each mask level code (column masks only)."""
    out = {}
    for lm in mapping.layers:
        codes = task["column_masks"][lm.name].long()
        if task["spare_pes"].numel():  # a spare PE's columns carry no mask
            column, pe = lm.index_tensors()
            frozen = torch.ones(lm.n_columns, dtype=torch.bool)
            frozen[column[torch.isin(pe, task["spare_pes"])].long()] = False
            codes = codes[frozen]
        out[lm.name] = torch.bincount(codes, minlength=len(task["mask_values"]))
    return out


def mask_report(task: dict, mapping: Mapping) -> dict:
    """Mask level histogram, mask memory and all-in storage (bytes: `stored_bytes`) of a task.pt."""
    return _masks(task, mapping) | {"bn": task["bn"], "task_bytes": stored_bytes(task, mapping).total,
                                    "task_bytes_unpacked": stored_bytes(task, mapping, packed=False).total}


def _masks(task: dict, mapping: Mapping) -> dict:
    """Mask level histogram, the share of masks at each level (column masks: of the frozen PEs' columns;
    Piggyback: "0" is the share flipped) and mask memory (bytes) of a task.pt (`mask_report`).

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
                "mask_shares": {f"{v:g}": round(int(c) / max(masked, 1), 6) for v, c in zip(values, counts)},
                "mask_bytes_unpacked": column_mask_bytes(masked, k, packed=False),
                "mask_bytes_packed": column_mask_bytes(masked, k, packed=True)}
    if task["element_masks"]:
        ones = sum(int(m.sum()) for m in task["element_masks"].values())
        total = sum(m.numel() for m in task["element_masks"].values())
        return {"mask_histogram": {"0": total - ones, "1": ones}, "masked_units": total,  # "0": flipped
                "mask_shares": {"0": round((total - ones) / max(total, 1), 6), "1": round(ones / max(total, 1), 6)},
                "mask_bytes_unpacked": column_mask_bytes(total, 2, packed=False),
                "mask_bytes_packed": column_mask_bytes(total, 2, packed=False)}  # 1 bit a weight: nothing to pack
    return {"mask_histogram": {}, "mask_shares": {}, "masked_units": 0, "mask_bytes_unpacked": 0,
            "mask_bytes_packed": 0}


def stored_bytes(task: dict, mapping: Mapping, packed: bool = True) -> TaskStorage:
    """A learned task's all-in storage (xbar.memory.task_storage) from its task.pt: its masks, spare PEs,
    BN rule, head and BN channels."""
    state = task["model_state"]
    head = sum(v.numel() for k, v in state.items() if k in ("head.weight", "head.bias"))
    bn = sum(2 * v.numel() for k, v in state.items() if k.endswith(".running_mean"))  # folded scale + shift
    shift_levels = len(task["mask_values"]) - 2 if task["column_masks"] else 0
    return task_storage(task["method"], mapping, shift_levels=shift_levels, spare_pes=task["spare_pes"],
                        bn_rule=task["bn"], head_params=head, bn_params=bn, packed=packed)
