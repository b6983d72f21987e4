"""Stage pretrain: train the fp32 backbone on the source task."""

from __future__ import annotations

import time

import torch

from workflow.io import BACKBONE, METRICS, save_torch, stage_main, write_json
from xbar.data import load_task_data
from xbar.models import build_model
from xbar.params import Params
from xbar.training import accuracy, fit, seed_everything


def pretrain(params: Params) -> None:
    seed_everything(params.seed, params.train.threads)
    data = load_task_data(params.source.dataset, params.seed)
    model = build_model(params.model, data.num_classes, data.channels)
    opt = torch.optim.SGD(model.parameters(), lr=params.source.lr, momentum=params.train.momentum,
                          weight_decay=5e-4, nesterov=True)
    steps = params.source.epochs * -(-len(data.train) // params.train.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, params.source.lr, total_steps=steps)
    start = time.perf_counter()
    fit(model, data.train, [opt], params.source.epochs, params.train.batch_size, params.seed,
        "pretrain", after_step=sched.step)
    acc = accuracy(model, data.test, params.train.eval_batch_size)
    save_torch(BACKBONE / "fp32.pt", {"state_dict": model.state_dict(), "num_classes": data.num_classes,
                                      "channels": data.channels})
    write_json(METRICS / "pretrain.json", {
        "test_accuracy": round(acc, 2), "train_images": len(data.train), "test_images": len(data.test),
        "seconds": round(time.perf_counter() - start, 1), "data_digest": data.digest,
    })
    print(f"pretrain: fp32 test accuracy {acc:.2f}% on {params.source.dataset.source}")


if __name__ == "__main__":
    stage_main(pretrain)
