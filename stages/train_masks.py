"""Stage train_masks (per task): learn the task with its method on the frozen backbone; write task.pt.

Reads quant.pt / levels.pt, ranking.parquet (a method with spare PEs: the
selected PEs become spare PEs) and the previous task's task.pt (a method that
continues from it, finetune_shared). The step (`xbar.step.learn`) checks that
the model rebuilt from the exported task.pt predicts exactly as the trained
one; accuracies are those of the rebuilt model, i.e. what evaluation of this
task will see later.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from workflow.attempts import stage_attempt
from workflow.backbone import load_backbone
from workflow.io import (atomic_write_bytes, load_torch, save_torch, stage_main, task_dir, task_metrics,
                         write_json)
from xbar import step
from xbar.data import load_task_data
from xbar.errors import UserError
from xbar.crossbar import spare_pe_count
from xbar.methods import check_spec, get, layer_mask_levels, mask_report
from xbar.params import FIRST_AFTER, Params
from xbar.plots import mask_levels, png
from xbar.training import seed_everything


def spare_pes_from(path: Path, n_pes: int, spare_ratio: float) -> torch.Tensor:
    """The selected PEs of ranking.parquet, checked against the mapping and the task's spare ratio."""
    if not path.exists():
        raise UserError(f"{path}: missing (run the rank_pes stage for this task first: dvc repro)")
    try:
        table = pl.read_parquet(path)
        pes = step.selected_pes(table)
    except Exception as err:  # corrupt file or wrong columns
        raise UserError(f"{path}: unreadable ranking ({type(err).__name__}); re-run rank_pes") from None
    want = spare_pe_count(spare_ratio, n_pes)
    if table.height != n_pes or len(pes) != want:
        raise UserError(f"{path}: ranks {table.height} PEs and selects {len(pes)}, but the model has {n_pes} PEs "
                        f"and spare_ratio {spare_ratio} needs {want}; re-run rank_pes")
    return pes


def run(params: Params, task: str) -> None:
    spec = params.tasks[task]
    method = get(spec.method)
    seed_everything(params.seed, params.train.threads)
    data = load_task_data(spec.dataset, params.seed)
    check_spec(spec, len(data.train), data.num_classes)  # before reading the backbone: a user's mistake comes first
    backbone = load_backbone()
    mapping = backbone.mapping(params)
    previous = None
    if method.continues_previous and spec.after != FIRST_AFTER:
        previous = load_torch(task_dir(spec.after) / "task.pt")
    spare = spare_pes_from(task_dir(task) / "ranking.parquet", mapping.n_pes, spec.spare_ratio) \
        if method.spare_pes else None
    learned = step.learn(params, spec, backbone, data, f"{task} ({spec.method})", spare, previous,
                         train_accuracy=True)

    exported, model = learned.task, learned.model
    masks = mask_report(exported, mapping)
    per_layer = {} if not exported["column_masks"] else {
        name: {f"{v:g}": int(c) for v, c in zip(exported["mask_values"].tolist(), counts)}
        for name, counts in layer_mask_levels(exported, mapping).items()}
    atomic_write_bytes(task_dir(task) / "mask_levels.png", png(mask_levels(per_layer, task)))
    save_torch(task_dir(task) / "task.pt", exported)
    write_json(task_metrics(task, "train"), {
        "method": spec.method, "train_accuracy": round(learned.train_accuracy, 2),
        "test_accuracy": round(learned.test_accuracy, 2), "final_loss": round(learned.final_loss, 4),
        "epochs": spec.epochs, "optimizer_steps": model.steps, "kept_step": model.kept_step, "curve": model.curve,
        "head_fit": model.head_fit,
        "seconds": round(learned.seconds, 1),
        "spare_pes_used": int(exported["spare_pes"].numel()), "spare_pes": exported["spare_pes"].tolist(),
        "pes": mapping.n_pes, "shift_levels": model.shift_levels,
        "continued_from_previous_task": learned.continued,
        "trainable_parameters": sum(p.numel() for p in model.net.parameters() if p.requires_grad),
        **masks, "train_images": len(data.train), "test_images": len(data.test), "data_digest": data.digest,
    })
    kept = "" if model.kept_step is None else f", kept the checkpoint of step {model.kept_step} of {model.steps}"
    print(f"train_masks {task} ({spec.method}): test accuracy {learned.test_accuracy:.2f}% "
          f"(train {learned.train_accuracy:.2f}%{kept})")


if __name__ == "__main__":
    stage_main(run, task_arg=True, around=stage_attempt)
