"""Stage pretrain: the fp32 backbone of the source task.

Its input normalization is set first (`model.normalize`, xbar.models.input_statistics). With
`source.epochs` > 0 the backbone trains on the source task; with 0 it is `model.weights` as they
are, and only the source head is fit, in closed form on the backbone's features.
"""

from __future__ import annotations

import time

import torch

from workflow.io import BACKBONE, METRICS, save_torch, stage_main, write_json
from xbar.data import load_task_data
from xbar.models import build_model, input_statistics, weights_lineage
from xbar.params import Params
from xbar.runtime import compute_device
from xbar.training import accuracy, fit, fit_head, head_images, seed_everything


def pretrain(params: Params) -> None:
    seed_everything(params.seed, params.train.threads)
    data = load_task_data(params.source.dataset, params.seed)
    model = build_model(params.model, data.num_classes, data.channels)
    mean, std = input_statistics(params.model, data.train, data.channels)
    model.input_norm.set(mean, std)
    model.to(compute_device(params.train.device))
    start = time.perf_counter()
    if params.source.epochs:
        opt = torch.optim.SGD(model.parameters(), lr=params.source.lr, momentum=params.train.momentum,
                              weight_decay=5e-4, nesterov=True)
        steps = params.source.epochs * -(-len(data.train) // params.train.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, params.source.lr, total_steps=steps)
        fit(model, data.fit_train, [opt], params.source.epochs, params.train.batch_size, params.seed,
            "pretrain", after_step=sched.step, workers=params.train.workers,
            mixed_precision=params.train.mixed_precision)
    else:
        model.eval()  # the head in closed form on the body as it is
        fit_head(model, data.train, head_images(len(data.train), params.seed), workers=params.train.workers)
    acc = accuracy(model, data.test, params.train.eval_batch_size, params.train.workers)
    save_torch(BACKBONE / "fp32.pt", {"state_dict": model.state_dict(), "num_classes": data.num_classes,
                                      "channels": data.channels})
    write_json(METRICS / "pretrain.json", {
        "test_accuracy": round(acc, 2), "train_images": len(data.train), "test_images": len(data.test),
        "epochs": params.source.epochs, "seconds": round(time.perf_counter() - start, 1), "data_digest": data.digest,
        "input_mean": [round(v, 5) for v in mean], "input_std": [round(v, 5) for v in std],
        **weights_lineage(params.model),
    })
    how = f"{params.source.epochs} epochs" if params.source.epochs else "model.weights as they are, closed-form head"
    print(f"pretrain: fp32 test accuracy {acc:.2f}% on {params.source.dataset.source} ({how})")


if __name__ == "__main__":
    stage_main(pretrain)
