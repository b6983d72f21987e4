"""Backbones: a small ResNet for 28x28 single-channel images, and torchvision
ResNet-18/50 for real-scale users. Every backbone has a `head` (the per-task
linear classifier); everything else is the shared backbone mapped onto crossbars.

Every backbone starts its `features` with `input_norm`: the per-channel (x - mean) / std
of the [0, 1] image, computed digitally before the first layer's DACs (its statistics are
buffers, saved with the backbone; stages/pretrain.py sets them, docs/scale.md says how).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from xbar.data import channel_stats
from xbar.errors import UserError
from xbar.params import ModelParams

# torchvision's ImageNet statistics of images in [0, 1] (the transforms its ResNet weights were trained with)
IMAGENET_STATS = {"resnet18": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "resnet50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def input_statistics(params: ModelParams, source_train: Dataset, channels: int) -> tuple[tuple[float, ...], ...]:
    """(mean, std) per channel of the backbone's input normalization (`model.normalize`).

    `auto`: the statistics the weights were trained with when model.weights is set, else the source
    training split's own; `none`: the identity."""
    rule = params.normalize
    if rule == "auto":
        rule = "imagenet" if params.weights else "source"
    if rule == "none":
        return (0.0,) * channels, (1.0,) * channels
    if rule == "imagenet":
        if params.name not in IMAGENET_STATS:
            raise UserError(f"model.normalize: no ImageNet statistics are known for model {params.name!r}; "
                            "give them as {mean: [...], std: [...]}")
        return IMAGENET_STATS[params.name]
    if rule == "source":
        return channel_stats(source_train)
    return rule.mean, rule.std


def weights_file(params: ModelParams) -> Path | None:
    """The state_dict file `model.weights` names (None: no pretrained weights)."""
    return Path(params.weights) if params.weights else None


def weights_lineage(params: ModelParams) -> dict[str, str]:
    """The pretrained weights' file name and sha256, for the backbone's lineage (empty without weights)."""
    path = weights_file(params)
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"model.weights: {str(path)!r} is not a file")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"weights_file": path.name, "weights_sha256": digest.hexdigest()}


class InputNorm(nn.Module):
    """Per-channel (x - mean) / std, digital, ahead of the first layer's DACs (identity until set)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def set(self, mean: list[float] | torch.Tensor, std: list[float] | torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


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


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet with its `fc` renamed `head` (and `conv1` adapted to 1 channel if asked)."""

    def __init__(self, arch: str, num_classes: int, in_channels: int = 3, weights: str | None = None) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if weights:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as err:  # missing, truncated, not a torch file, or pickled code (refused)
                raise UserError(f"model.weights: cannot read {weights!r} as a torch state_dict ({type(err).__name__})") from None
            try:
                net.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as err:  # another architecture, or not a dict
                why = " ".join(str(err).split())[:160] or type(err).__name__  # one line: the keys that differ
                raise UserError(f"model.weights: {weights!r} does not fit torchvision's {arch} ({why})") from None
        if in_channels != 3:  # average the RGB filters: a grey image is all three channels at once
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
            net.conv1.weight.data = old.weight.data.mean(1, keepdim=True).repeat(1, in_channels, 1, 1)
        self.input_norm = InputNorm(in_channels)
        self.head = nn.Linear(net.fc.in_features, num_classes)
        net.fc = nn.Identity()
        self.body = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(params: ModelParams, num_classes: int, in_channels: int = 1) -> nn.Module:
    if params.name == "small_resnet":
        return SmallResNet(num_classes, params.width, params.blocks, in_channels)
    return TorchvisionResNet(params.name, num_classes, in_channels, params.weights)
