"""Every torchvision classification model by its name (torchvision.models.list_models), built without
weights (nothing is downloaded: `model.weights` is a local state_dict of the same architecture)."""

from __future__ import annotations

import warnings

from xbar.backbones.registry import TORCHVISION_STATS, Backbone
from xbar.backbones.wrap import module_backbone


def torchvision_backbone(name: str) -> Backbone:
    """The registry entry of torchvision's `name`: its classifier found by the wrapper, its ImageNet
    statistics torchvision's."""

    def make():  # noqa: ANN202
        import torchvision

        with warnings.catch_warnings():  # e.g. GoogLeNet's notice about its future default initialization
            warnings.simplefilter("ignore", FutureWarning)
            return torchvision.models.get_model(name, weights=None)

    return module_backbone(name, make, imagenet_stats=TORCHVISION_STATS)
