"""Six torchvision families (plus ConvNeXt and ViT), each tiny, through the whole chain in memory:
quantize -> deploy -> rank -> learn (xma2, piggyback) -> the chip (programmed, read back) -> energy, with
zero forgetting: every earlier task predicts after a later one is learned exactly as when it was learned."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_families import LEARNING, register_families

SIZE = 16  # pixels: optdigits' 8x8 digits upsampled; every tiny family takes it
EPOCHS = 1  # each task
PRETRAIN = 4  # fp32 epochs on the source (one-cycle SGD), then one of QAT
# a fifth of the default lrs: at the defaults (tuned on the default benchmark) several tiny families diverge,
# which the divergence guard reports as such; the lr is the user's knob for a new backbone (docs/scale.md)
LRS = {"lr": 0.01, "mask_lr": 0.1}


def deployed_backbone(name: str, plugins: tuple[str, ...] = ()):  # noqa: ANN201
    """(params, Backbone): the family pretrained on optdigits (fp32, one-cycle SGD), quantized (calibrated)
    and its cell levels exported, as the pretrain / quantize / deploy stages do; params.yaml's defaults else."""
    from xbar.crossbar import mapped_layers
    from xbar.data import load_task_data
    from xbar.models import build_model
    from xbar.params import parse_params
    from xbar.quant import calibrate, export_levels, quantize_model
    from xbar.step import Backbone
    from xbar.training import as_input, fit, seed_everything

    digits = {"source": "optdigits", "image_size": SIZE}
    task = {"epochs": EPOCHS, "rank_batch_size": 32}
    raw = {"plugins": list(plugins), "model": {"name": name}, "source": {"dataset": digits, "epochs": 1},
           "train": {"threads": 1, **LRS},
           "tasks": {"t1": {"after": "backbone", "dataset": {**digits, "max_train": 1024}, **task},
                     "t2": {"after": "t1", "dataset": {"source": "mnist5k", "image_size": SIZE, "max_train": 1024},
                            **task}}}
    params = parse_params(raw)
    seed_everything(0, 1)
    data = load_task_data(params.source.dataset, 0)
    net = build_model(params.model, data.num_classes, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=PRETRAIN * math.ceil(len(data.train) / 64))
    fit(net, data.train, [opt], PRETRAIN, 64, 0, "source", after_step=sched.step)
    quantize_model(net, params.crossbar.weight_bits, params.quant.act_bits)
    calibrate(net, as_input(torch.stack([data.train[i][0] for i in range(256)])))
    opt = torch.optim.SGD(net.parameters(), lr=params.quant.lr, momentum=0.9, nesterov=True)  # QAT, as the stage
    fit(net, data.train, [opt], 1, 64, 0, "quantize")
    mapped = {n for n, _ in mapped_layers(net)}
    levels = {k: v for k, v in export_levels(net).items() if k in mapped}
    quant = {"state_dict": net.state_dict(), "num_classes": data.num_classes, "channels": 1}
    return params, Backbone(quant, levels)


def learns_without_forgetting(name: str, params, backbone, methods=("xma2", "piggyback")) -> None:  # noqa: ANN001
    from xbar.compare import Configuration, run_configuration

    for method in methods:
        result = run_configuration(params, Configuration(method, 0.1 if method == "xma2" else None), backbone)
        assert getattr(result, "failure", None) is None, result.failure
        rows = {r["task"]: r for r in result.tasks.iter_rows(named=True)}
        assert set(rows) == {"t1", "t2"}
        assert rows["t1"]["accuracy_at_learn"] > 100 / 10 + 10, (name, method)  # well above chance on 10 digits
        assert all(r["inference_j"] > 0 and r["program_j"] >= 0 for r in rows.values())
        if method == "xma2":
            assert all(r["spare_pes"] >= 1 for r in rows.values())
        after = result.matrix.filter(result.matrix["after"] == "t2")
        assert dict(zip(after["task"], after["accuracy"]))["t1"] == rows["t1"]["accuracy_at_learn"], (name, method)


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNING)
def test_a_family_learns_tasks_on_the_chip_without_forgetting(name):
    register_families()
    learns_without_forgetting(name, *deployed_backbone(name))


PLUGIN = """
from torch import nn

from xbar.backbones import module_backbone, register


class Block(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                               nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return (self.f(x) + self.skip(x)).relu()


class LabNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16, 16, 1, 1), Block(16, 32, 2, 2), Block(32, 64, 2, 4))
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.blocks(self.stem(x)).mean((2, 3)))


register(module_backbone("lab_net", LabNet, head="out", usual=(10, 1)))
"""


@pytest.mark.slow
def test_a_user_module_through_plugins_learns_tasks_on_the_chip(tmp_path, monkeypatch):
    """A lab's own nn.Module, in a module of its own named in `plugins:`, learns tasks end to end."""
    from xbar.backbones import unregister

    (tmp_path / "lab_backbone.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        params, backbone = deployed_backbone("lab_net", plugins=("lab_backbone",))
        assert params.model.name == "lab_net" and "body.blocks.1.f.0" in backbone.levels  # grouped
        learns_without_forgetting("lab_net", params, backbone, methods=("xma2",))
    finally:
        unregister("lab_net")
