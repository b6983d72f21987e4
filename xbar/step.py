"""The per-task step, in memory: rank -> learn -> program -> evaluate -> energy.

Written once: the DVC stages call these functions between reading their inputs
and writing their outputs, and the comparison (`xbar.compare`) loops over the
same functions with nothing on disk. The checks live here, so both paths get
them: a learned task is rebuilt from its exported task.pt and must predict
exactly as the trained model did; a task is evaluated only on the data it was
learned with (dataset digest).

Ranking, learning and evaluation run on `train.device` (xbar.runtime): the network is built on the CPU
and moved there; what comes back (rankings, task.pt contents, accuracies) is on the CPU.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from functools import cached_property

import polars as pl
import torch

from xbar.chip.deployment import Chip
from xbar.chip.layout import ChipLayout, backbone_mapping
from xbar.chip.readback import read_back
from xbar.crossbar import Mapping
from xbar.data import TaskData
from xbar.energy.inference import TaskInference, task_inference
from xbar.energy.layer_io import LayerIO, model_io, signed_input_layers
from xbar.energy.presets import EnergyPreset
from xbar.errors import UserError
from xbar.methods import (TaskModel, backbone_net, build_task_model, check_spec, chip_view, crossbar_spec,
                          deploy_cells, export_task, get, load_task_model, train_task)
from xbar.params import Params, TaskSpec
from xbar.methods.fp32 import train_fp32
from xbar.models import build_model
from xbar.ranking import rank_batch, rank_pes
from xbar.runtime import compute_device
from xbar.training import accuracy, predict


@dataclass(frozen=True)
class Backbone:
    """The deployed backbone: quant.pt and levels.pt contents (and fp32.pt's, for the fp32 ceiling)."""

    quant: dict
    levels: dict
    fp32: dict | None = None

    @cached_property
    def cells(self) -> dict[str, torch.Tensor]:
        """Weight levels by mapped layer (what the backbone PEs hold)."""
        return {name: entry["levels"] for name, entry in self.levels.items()}

    def mapping(self, params: Params) -> Mapping:
        return backbone_mapping(params.model, params.crossbar, self.levels)


# --- rank -------------------------------------------------------------------------------------------


def rank(params: Params, spec: TaskSpec, backbone: Backbone, data: TaskData) -> tuple[pl.DataFrame, float]:
    """Tier 1: every backbone PE scored on one seeded mini-batch of the task; the top-P% `selected`.
    Returns (one row per PE, the batch's loss)."""
    check_spec(spec, len(data.train), data.num_classes)
    net = backbone_net(params, backbone.quant)
    deploy_cells(net, backbone.levels, crossbar_spec(params))
    net.to(compute_device(params.train.device))
    images, labels = rank_batch(data.train, spec.rank_batch_size, params.seed)
    return rank_pes(net, images, labels, data.num_classes, spec.spare_ratio)


def selected_pes(ranking: pl.DataFrame) -> torch.Tensor:
    """The PEs a ranking selects as spare PEs, ascending."""
    return torch.tensor(ranking.filter(pl.col("selected"))["pe"].sort().to_list(), dtype=torch.int64)


# --- learn ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Learned:
    """A learned task: its task.pt contents, the trained model, and how training went."""

    task: dict
    model: TaskModel
    final_loss: float
    seconds: float  # build + train + export
    test_accuracy: float  # of the model rebuilt from `task`
    train_accuracy: float | None  # the same on the training split, when asked for
    continued: bool  # started from the previous task's network


def learn(params: Params, spec: TaskSpec, backbone: Backbone, data: TaskData, desc: str,
          spare_pes: torch.Tensor | None = None, previous: dict | None = None,
          train_accuracy: bool = False) -> Learned:
    """Train the task with its method and export it; `spare_pes` from `rank` (a method with spare PEs),
    `previous` the task.pt learned just before (a method that continues from it uses it when it is its own).

    Raises RuntimeError if the model rebuilt from the exported task.pt predicts differently from the
    trained one: a bug, never a task to write.
    """
    check_spec(spec, len(data.train), data.num_classes)
    method = get(spec.method)
    start = previous if method.continues_previous and previous and previous.get("method") == method.name else None
    began = time.perf_counter()
    device = compute_device(params.train.device)
    model = build_task_model(params, spec, backbone.quant, backbone.levels, data.num_classes,
                             spare_pes=spare_pes, start=start)
    model.net.to(device)
    with hardware_aware_training(params, model, backbone, data):
        loss = train_task(model, data.train, spec, params.train, params.seed, desc, data.augmented, data.train_labels)
    task = export_task(model, data.num_classes, data.channels, data.digest)
    seconds = time.perf_counter() - began

    deployed = load_task_model(task, backbone.levels, params)
    deployed.net.to(device)  # the same device as the trained model: the same kernels, the same predictions
    batch, workers = params.train.eval_batch_size, params.train.workers
    trained_preds, labels = predict(model.net, data.test, batch, workers)
    deployed_preds, _ = predict(deployed.net, data.test, batch, workers)
    if not torch.equal(trained_preds, deployed_preds):
        raise RuntimeError(f"{desc}: the model rebuilt from task.pt predicts differently from the trained one")
    test_acc = float((deployed_preds == labels).float().mean() * 100)
    train_acc = accuracy(deployed.net, data.train, batch, workers) if train_accuracy else None
    return Learned(task, model, loss, seconds, test_acc, train_acc, start is not None)


def hardware_aware_training(params: Params, model: TaskModel, backbone: Backbone,
                            data: TaskData) -> AbstractContextManager:
    """With train.hw_aware, the task trains on the chip's forward (xbar.chip.aware) at params.yaml's ADC and
    device; otherwise nothing changes."""
    if not params.train.hw_aware:
        return nullcontext()
    from xbar.chip.aware import hardware_aware
    from xbar.chip.evaluate import calibration_images, chip_settings
    from xbar.chip.noise_aware import noise_aware

    device, adc = chip_settings(params)
    if params.chip.aware == "noise":
        return noise_aware(model, device, adc.signed, params.seed)
    calibration = calibration_images(data.train, params.chip.calibration_images, params.seed) if adc.calibrated else None
    return hardware_aware(model, device, adc, backbone.levels, params.seed, calibration)


def learn_fp32(params: Params, spec: TaskSpec, backbone: Backbone, data: TaskData, desc: str) -> float:
    """The paper's accuracy ceiling (xbar.methods.fp32): the fp32 backbone fine-tuned whole on the task, its own
    copy (it cannot forget); returns its test accuracy. Nothing goes on a chip."""
    if backbone.fp32 is None:
        raise UserError("finetune_fp32 needs the fp32 backbone, artifacts/backbone/fp32.pt (run the pipeline)")
    check_spec(spec, len(data.train), data.num_classes)
    net = build_model(params.model, int(backbone.fp32["num_classes"]), int(backbone.fp32["channels"]))
    net.load_state_dict(backbone.fp32["state_dict"])
    net.head = torch.nn.Linear(net.head.in_features, data.num_classes)
    net.to(compute_device(params.train.device))
    train_fp32(net, data.train, data.fit_train, spec, params.train, params.seed, desc)
    return accuracy(net, data.test, params.train.eval_batch_size, params.train.workers)


# --- evaluate ---------------------------------------------------------------------------------------


def evaluate(params: Params, tasks: dict[str, dict], levels: dict, data: MappingABC[str, TaskData]) -> dict[str, float]:
    """Test accuracy of every task of `tasks` (name -> task.pt, in learning order) as the chip runs it
    once all of them are learned, each on the model rebuilt from its task.pt over the backbone's cells
    (`levels`: levels.pt)."""
    result, device = {}, compute_device(params.train.device)
    for name in tasks:
        task = chip_view(tasks, name)
        if data[name].digest != task["dataset_digest"]:
            raise UserError(f"task {name}: its test data changed since it was learned "
                            f"(digest {data[name].digest} != {task['dataset_digest']}); restore the dataset")
        model = load_task_model(task, levels, params)
        model.net.to(device)
        result[name] = accuracy(model.net, data[name].test, params.train.eval_batch_size, params.train.workers)
    return result


def evaluate_chip(params: Params, chip: Chip, layout: ChipLayout, tasks: dict[str, dict], backbone: Backbone,
                  data: MappingABC[str, TaskData], preset: EnergyPreset) -> dict[str, float]:
    """The no-forgetting gate's accuracies: every task of `tasks` as read back from `chip` (switched to it in
    turn, `xbar.chip.readback`), so a bug in programming the chip changes them."""
    return evaluate(params, read_back(chip, layout, tasks, backbone.cells, preset), backbone.levels, data)


# --- energy -----------------------------------------------------------------------------------------


def task_io(params: Params, mapping: Mapping, task: dict, image_size: int) -> dict[str, LayerIO]:
    """What the energy model needs of a learned task's network (its signed-input layers count twice)."""
    return model_io(params.model, mapping, int(task["num_classes"]), int(task["channels"]), image_size,
                    signed_input_layers(task["model_state"]))


def inference(params: Params, mapping: Mapping, task: dict, image_size: int, preset: EnergyPreset) -> TaskInference:
    """One image's inference energy of a learned task on the chip."""
    return task_inference(task, mapping, task_io(params, mapping, task, image_size), preset, params.quant.act_bits)
