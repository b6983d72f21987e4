"""The default backbone: a small ResNet for 28x28 single-channel images (`model.width`, `model.blocks`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xbar.backbones.wrap import InputNorm, load_state


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-20 style (3 stages of `blocks` basic blocks, widths w, 2w, 4w).

    The stride-2 stem brings 28x28 to 14x14 so a 2-core CPU trains it in
    seconds per epoch; width 16 / 3 blocks maps onto 126 PEs of 72x72 crossbars.
    """

    def __init__(self, num_classes: int, width: int = 16, blocks: int = 3, in_channels: int = 1) -> None:
        super().__init__()
        self.input_norm = InputNorm(in_channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and stage > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layers(self.stem(self.input_norm(x))), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(params, num_classes: int, in_channels: int, weights: Path | None) -> SmallResNet:  # noqa: ANN001
    net = SmallResNet(num_classes, params.width, params.blocks, in_channels)
    if weights is not None:  # a state_dict of this very network (head included)
        load_state(net, weights, "small_resnet")
    return net
