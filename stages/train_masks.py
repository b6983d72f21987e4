"""Stage train_masks (per task): learn the task with its method on the frozen backbone; write task.pt.

Reads quant.pt / levels.pt, recomputes the crossbar mapping from the model,
reads ranking.parquet (xma2: the selected PEs become spare PEs) and, for
finetune_shared, the previous task's task.pt when that task is finetune_shared
too. Accuracies are measured on the model rebuilt from the exported task.pt,
i.e. exactly what evaluation of this task will see later.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import torch

from workflow.io import (BACKBONE, atomic_write_bytes, load_torch, save_torch, stage_main, task_dir, task_metrics,
                           write_json)
from xbar.crossbar import map_model
from xbar.data import load_task_data
from xbar.errors import UserError
from xbar.methods import (backbone_net, build_task_model, check_spec, crossbar_spec, export_task, layer_mask_levels,
                          load_task_model, mask_report, n_spare_pes, train_task)
from xbar.params import Params
from xbar.plots import mask_levels, png
from xbar.training import accuracy, predict, seed_everything


def spare_pes_from(path: Path, n_pes: int, spare_ratio: float) -> torch.Tensor:
    """The selected PEs of ranking.parquet, checked against the mapping and the task's spare ratio."""
    if not path.exists():
        raise UserError(f"{path}: missing (run the rank_pes stage for this task first: dvc repro)")
    try:
        table = pl.read_parquet(path)
        pes = table.filter(pl.col("selected"))["pe"].sort()
    except Exception as err:  # corrupt file or wrong columns
        raise UserError(f"{path}: unreadable ranking ({type(err).__name__}); re-run rank_pes") from None
    want = n_spare_pes(spare_ratio, n_pes)
    if table.height != n_pes or pes.len() != want:
        raise UserError(f"{path}: ranks {table.height} PEs and selects {pes.len()}, but the model has {n_pes} PEs "
                        f"and spare_ratio {spare_ratio} needs {want}; re-run rank_pes")
    return torch.tensor(pes.to_list(), dtype=torch.int64)


def previous_shared(params: Params, task: str) -> dict | None:
    """finetune_shared continues from the task learned just before, if that one is finetune_shared too."""
    names = list(params.tasks)
    i = names.index(task)
    if i == 0 or params.tasks[names[i - 1]].method != "finetune_shared":
        return None
    return load_torch(task_dir(names[i - 1]) / "task.pt")


def run(params: Params, task: str) -> None:
    spec = params.tasks[task]
    seed_everything(params.seed, params.train.threads)
    data = load_task_data(spec.dataset, params.seed)
    check_spec(spec, len(data.train))
    quant, levels = load_torch(BACKBONE / "quant.pt"), load_torch(BACKBONE / "levels.pt")
    start = previous_shared(params, task) if spec.method == "finetune_shared" else None
    spare = None
    if spec.method == "xma2":
        n_pes = map_model(backbone_net(params, quant), crossbar_spec(params)).n_pes
        spare = spare_pes_from(task_dir(task) / "ranking.parquet", n_pes, spec.spare_ratio)
    began = time.perf_counter()
    model = build_task_model(params, spec, quant, levels, data.num_classes, spare_pes=spare, start=start)
    loss = train_task(model, data.train, spec, params.train, params.seed, f"{task} ({spec.method})")
    exported = export_task(model, data.num_classes, data.channels, data.digest)
    seconds = time.perf_counter() - began

    deployed = load_task_model(exported, levels, params)
    batch = params.train.eval_batch_size
    trained_preds, _ = predict(model.net, data.test, batch)
    deployed_preds, _ = predict(deployed.net, data.test, batch)
    if not torch.equal(trained_preds, deployed_preds):  # a bug, not a user error: never write such a task.pt
        raise RuntimeError(f"{task}: the model rebuilt from task.pt predicts differently from the trained one")
    train_acc, test_acc = accuracy(deployed.net, data.train, batch), accuracy(deployed.net, data.test, batch)
    masks = mask_report(exported, model.mapping)
    per_layer = {} if not exported["column_masks"] else {
        name: {f"{v:g}": int(c) for v, c in zip(exported["mask_values"].tolist(), counts)}
        for name, counts in layer_mask_levels(exported, model.mapping).items()}
    atomic_write_bytes(task_dir(task) / "mask_levels.png", png(mask_levels(per_layer, task)))
    save_torch(task_dir(task) / "task.pt", exported)
    write_json(task_metrics(task, "train"), {
        "method": spec.method, "train_accuracy": round(train_acc, 2), "test_accuracy": round(test_acc, 2),
        "final_loss": round(loss, 4), "epochs": spec.epochs, "seconds": round(seconds, 1),
        "spare_pes_used": int(exported["spare_pes"].numel()), "spare_pes": exported["spare_pes"].tolist(),
        "pes": model.mapping.n_pes, "shift_levels": model.shift_levels,
        "continued_from_previous_task": start is not None,
        "trainable_parameters": sum(p.numel() for p in model.net.parameters() if p.requires_grad),
        **masks, "train_images": len(data.train), "test_images": len(data.test), "data_digest": data.digest,
    })
    print(f"train_masks {task} ({spec.method}): test accuracy {test_acc:.2f}% (train {train_acc:.2f}%)")


if __name__ == "__main__":
    stage_main(run, task_arg=True)
