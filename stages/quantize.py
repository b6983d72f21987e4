"""Stage quantize: 4-bit QAT fine-tune of the fp32 backbone on the source task.

Clips start at their least-error values on one calibration batch, so the
4-bit model is already close before training (post-training quantization);
one short QAT epoch (cosine-decayed lr) then recovers the rest. BN keeps
training on batch statistics, so its running statistics follow the quantized
activations (frozen BN statistics gave no gain in a trial on the default
benchmark: 88.0% vs 88.2%). Clips get LSQ's gradient scale inside the
quantizers, so they share the weights' learning rate, without weight decay.
"""

from __future__ import annotations

import math
import time

import torch
from torch.utils.data import Subset

from workflow.io import BACKBONE, METRICS, load_torch, save_torch, stage_main, write_json
from xbar.crossbar import mapped_layers
from xbar.data import TaskData, load_task_data, stratified_subset
from xbar.errors import UserError
from xbar.models import build_model
from xbar.params import Params
from xbar.quant import calibrate, clip_parameters, export_levels, quantize_model
from xbar.runtime import compute_device
from xbar.training import accuracy, as_input, fit, seed_everything

CALIBRATION_IMAGES = 256
WEIGHT_DECAY = 5e-4


def calibration_batch(train: torch.utils.data.Dataset, n: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """n training images spread evenly over the (stratified) training split: deterministic."""
    step = max(1, len(train) // n)
    return as_input(torch.stack([train[i][0] for i in range(0, len(train), step)][:n]))


def qat_subset(data: TaskData, max_train: int | None, seed: int) -> torch.utils.data.Dataset:
    """The source images QAT trains on: a stratified, seeded subset of `max_train` (None: all)."""
    if max_train is None or max_train >= len(data.train):
        return data.fit_train
    return Subset(data.fit_train, stratified_subset(data.train_labels, max_train, seed).tolist())


def quantize(params: Params) -> None:
    seed_everything(params.seed, params.train.threads)
    fp32 = load_torch(BACKBONE / "fp32.pt")
    data = load_task_data(params.source.dataset, params.seed)
    if (fp32["num_classes"], fp32["channels"]) != (data.num_classes, data.channels):
        raise UserError(f"{BACKBONE / 'fp32.pt'}: trained for {fp32['num_classes']} classes / {fp32['channels']} "
                        f"channels, the source task has {data.num_classes} / {data.channels}: run pretrain again")
    model = build_model(params.model, data.num_classes, data.channels)
    try:
        model.load_state_dict(fp32["state_dict"])
    except RuntimeError:
        raise UserError(f"{BACKBONE / 'fp32.pt'}: does not fit model {params.model.name!r} "
                        "(model parameters changed since pretrain: run pretrain again)") from None
    device, workers = compute_device(params.train.device), params.train.workers
    model.to(device)
    start = time.perf_counter()
    fp32_acc = accuracy(model, data.test, params.train.eval_batch_size, workers)

    quantize_model(model, params.crossbar.weight_bits, params.quant.act_bits)
    calibrate(model, calibration_batch(data.train).to(device))
    ptq_acc = accuracy(model, data.test, params.train.eval_batch_size, workers)

    clips = clip_parameters(model)
    clip_ids = {id(p) for p in clips}
    weights = [p for p in model.parameters() if id(p) not in clip_ids]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": WEIGHT_DECAY}, {"params": clips, "weight_decay": 0.0}],
                          lr=params.quant.lr, momentum=params.train.momentum, nesterov=True)
    qat = qat_subset(data, params.quant.max_train, params.seed)
    steps = params.quant.epochs * math.ceil(len(qat) / params.train.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = fit(model, qat, [opt], params.quant.epochs, params.train.batch_size, params.seed, "quantize",
               after_step=sched.step, workers=workers)
    quant_acc = accuracy(model, data.test, params.train.eval_batch_size, workers)

    mapped = {name for name, _ in mapped_layers(model)}
    levels = {name: entry for name, entry in export_levels(model).items() if name in mapped}
    save_torch(BACKBONE / "quant.pt", {"state_dict": model.state_dict(), "num_classes": data.num_classes,
                                       "channels": data.channels})
    save_torch(BACKBONE / "levels.pt", levels)
    write_json(METRICS / "quantize.json", {
        "fp32_accuracy": round(fp32_acc, 2), "ptq_accuracy": round(ptq_acc, 2), "quant_accuracy": round(quant_acc, 2),
        "accuracy_drop": round(fp32_acc - quant_acc, 2), "weight_bits": params.crossbar.weight_bits,
        "act_bits": params.quant.act_bits, "epochs": params.quant.epochs, "qat_images": len(qat), "qat_loss": round(loss, 4),
        "mapped_layers": len(levels), "seconds": round(time.perf_counter() - start, 1), "data_digest": data.digest,
    })
    print(f"quantize: fp32 {fp32_acc:.2f}%, {params.crossbar.weight_bits}-bit after calibration {ptq_acc:.2f}%, "
          f"after QAT {quant_acc:.2f}% (drop {fp32_acc - quant_acc:+.2f} points)")


if __name__ == "__main__":
    stage_main(quantize)
