"""The backbone registry: one `Backbone` object per network xbar can deploy, looked up by name.

A backbone declares, in one place:

| field | meaning |
|---|---|
| `build` | how to build it: `(model params, classes, input channels, weights file or None) -> net` |
| `head` | its classifier: the dotted path of the Linear whose input is the features (`module_backbone`) |
| `imagenet_stats` | (mean, std) per channel of the [0, 1] image its pretrained weights were trained with |
| `weights_package` | (pip name, "module:function" returning the file): where `model.weights: imagenet` comes from |
| `usual` | (classes, input channels) of its usual form: what `xbar memory --model NAME` maps |

Every built net follows one contract (xbar.backbones.wrap): `input_norm` (the digital per-channel
normalization), `features(x)`, a `head` Linear, and `forward(x) = head(features(x))`; everything but
`head` is the shared backbone mapped onto crossbars.

Names: the registered ones, then every torchvision classification model by its torchvision name
(registered on first use, `torchvision_backbone`). A module named in params.yaml's `plugins:` list
registers its own (`register(module_backbone(...))`), as it does for methods.

This module imports no torch: validating params.yaml asks it for names.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xbar.errors import UserError

# torchvision's ImageNet preprocessing (mean, std of the [0, 1] RGB image): every torchvision
# classification weight was trained with it (torchvision.transforms._presets.ImageClassification)
TORCHVISION_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[..., Any] | str  # (ModelParams, num_classes, in_channels, weights Path | None) -> net
    imagenet_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    weights_package: tuple[str, str] | None = None  # (pip name, "module:function" -> the state_dict's path)
    usual: tuple[int, int] = (1000, 3)  # (classes, input channels) of its usual form
    head: str | None = None  # the classifier Linear's dotted path in the built module (documentation)

    def builder(self) -> Callable[..., Any]:
        if callable(self.build):
            return self.build
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)

    def __repr__(self) -> str:
        return f"<backbone {self.name}>"


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add a backbone; its name must be new and a simple identifier (it appears in params and paths)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", getattr(backbone, "name", "") or ""):
        raise ValueError(f"backbone name {getattr(backbone, 'name', None)!r} is not a simple identifier")
    if backbone.name in _REGISTRY and _REGISTRY[backbone.name] != backbone:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    _REGISTRY[backbone.name] = backbone
    return backbone


def unregister(name: str) -> None:
    """Remove a backbone (tests that register a toy backbone clean up with this)."""
    _REGISTRY.pop(name, None)


def registered() -> tuple[str, ...]:
    """The backbones registered so far (built-ins, plugins, torchvision names already used)."""
    return tuple(_REGISTRY)


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model (torchvision.models.list_models of the top-level module)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def names() -> tuple[str, ...]:
    """Every name `model.name` takes: the registered backbones, then torchvision's classification models."""
    return tuple(dict.fromkeys(registered() + torchvision_names()))


def known(name: str) -> bool:
    """`name` is a backbone (without importing torchvision when it is a registered one)."""
    return name in _REGISTRY or (isinstance(name, str) and name in torchvision_names())


def unknown_message(name: str) -> str:
    """One line for an unknown name, with the nearest valid names (difflib)."""
    near = difflib.get_close_matches(str(name), names(), n=3, cutoff=0.5)
    hint = f"nearest: {', '.join(near)}" if near else f"e.g. {', '.join(registered()[:3])} or a torchvision name"
    return f"unknown model {name!r} ({hint})"


def get(name: str) -> Backbone:
    """The backbone `name`: registered, or a torchvision classification model (registered on first use)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name in torchvision_names():
        from xbar.backbones.torchvision import torchvision_backbone

        return register(torchvision_backbone(name))
    raise UserError(f"model.name: {unknown_message(name)}")


def count() -> int:
    """How many backbones are registered (a plugin must register something: xbar.methods.registry)."""
    return len(_REGISTRY)
