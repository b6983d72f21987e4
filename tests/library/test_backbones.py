"""The backbone registry: any torchvision classification model by name, a user's module, and each bad
input as one line naming the thing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xbar.backbones import get, module_backbone, names, register, unregister
from xbar.crossbar import CrossbarSpec, map_model
from xbar.errors import UserError
from xbar.models import build_model, imagenet_stats
from xbar.params import ModelParams, ParamsError, parse_params


def test_a_torchvision_name_builds_maps_and_runs():
    """Depthwise and grouped convs and the Linear layers of the classifier's hidden part are mapped; the
    last Linear is the per-task head."""
    net = build_model(ModelParams(name="mobilenet_v3_small"), num_classes=3, in_channels=1)
    assert net.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 3) and net.head.out_features == 3
    mapping = map_model(net, CrossbarSpec())
    kinds = {(lm.kind, lm.groups > 1) for lm in mapping.layers}
    assert {("conv", True), ("conv", False), ("linear", False)} <= kinds
    assert "body.classifier.0" in {lm.name for lm in mapping.layers}  # MobileNetV3's hidden Linear
    assert imagenet_stats("regnet_x_400mf") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert "regnet_x_400mf" in names() and "small_resnet" in names()


def test_local_weights_load_and_another_architecture_names_the_first_key(tmp_path):
    import torchvision

    ref = torchvision.models.regnet_x_400mf(weights=None)
    torch.save(ref.state_dict(), tmp_path / "regnet.pt")
    net = build_model(ModelParams(name="regnet_x_400mf", weights=str(tmp_path / "regnet.pt")), 5, in_channels=3)
    assert torch.equal(net.body.trunk_output.block1[0].f.b[0].weight, ref.trunk_output.block1[0].f.b[0].weight)
    with pytest.raises(UserError, match=r"^model\.weights: .*does not fit mobilenet_v3_small \(key 'stem.0.weight'"):
        build_model(ModelParams(name="mobilenet_v3_small", weights=str(tmp_path / "regnet.pt")), 5, in_channels=3)


def test_an_unknown_name_gets_the_nearest_valid_names():
    with pytest.raises(ParamsError, match=r"model\.name: unknown model 'mobilenet_v3_smal' \(nearest: mobilenet_v3_small"):
        parse_params({"model": {"name": "mobilenet_v3_smal"}, "source": {"dataset": "optdigits"}})


def test_a_model_without_a_classifier_head_is_refused():
    with pytest.raises(UserError, match=r"^model\.name: squeezenet1_0: no classifier head found"):
        build_model(ModelParams(name="squeezenet1_0"), 3, in_channels=3)


class Audio(nn.Module):
    """A Conv1d front end: a weight the crossbars cannot hold as a layer xbar maps."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.front(x.flatten(2)).mean(-1))


def test_a_layer_that_cannot_be_mapped_is_named_with_its_type():
    register(module_backbone("audio_net", Audio))
    try:
        with pytest.raises(UserError, match=r"^model: layer front \(Conv1d\) .*cannot be mapped"):
            build_model(ModelParams(name="audio_net"), 2, in_channels=3)
    finally:
        unregister("audio_net")


def test_attention_projections_are_mapped_and_compute_as_before():
    """A ViT's attention: in_proj and out_proj become Linear layers on crossbars, the products stay digital;
    the converted block computes what torch's MultiheadAttention computes."""
    from xbar.backbones.wrap import MappedAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.rand(2, 5, 8)
    assert torch.allclose(MappedAttention(mha).eval()(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6)


def test_plugins_that_cannot_be_imported_or_register_nothing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "empty_lab.py").write_text("x = 1\n")
    source = {"dataset": "optdigits"}
    with pytest.raises(UserError, match=r"^plugins: cannot import 'no_such_lab'"):
        parse_params({"plugins": ["no_such_lab"], "source": source})
    with pytest.raises(UserError, match=r"^plugins: 'empty_lab' registers no method and no backbone"):
        parse_params({"plugins": ["empty_lab"], "source": source})


def test_a_plugin_registers_its_own_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_lab_net.py").write_text(
        "from torch import nn\n"
        "from xbar.backbones import module_backbone, register\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 4, 3)\n"
        "        self.out = nn.Linear(4, 10)\n"
        "    def forward(self, x):\n"
        "        return self.out(self.conv(x).mean((2, 3)))\n"
        "register(module_backbone('my_lab_net', Net, head='out', usual=(10, 1)))\n")
    try:
        params = parse_params({"plugins": ["my_lab_net"], "model": {"name": "my_lab_net"},
                               "source": {"dataset": "optdigits"}})
        net = build_model(params.model, 3, in_channels=1)
        assert net(torch.rand(2, 1, 8, 8)).shape == (2, 3)
        assert [lm.name for lm in map_model(net, CrossbarSpec()).layers] == ["body.conv"]
        assert get("my_lab_net").usual == (10, 1)
    finally:
        unregister("my_lab_net")


def test_what_stays_digital_is_listed_and_counted():
    """A ViT's attention products and LayerNorms, MobileNetV3's SE gates: not on crossbars; `xbar memory` says so,
    and the per-image counts follow from the shapes (5 tokens of 16 values, 2 heads, one encoder layer)."""
    import json

    from typer.testing import CliRunner

    from xbar.backbones.digital import digital_ops
    from xbar.cli import app

    from tiny_families import tiny_vit

    register(module_backbone("vit_tiny_digital", lambda: tiny_vit(3)))
    try:
        net = build_model(ModelParams(name="vit_tiny_digital"), 3, in_channels=3)
        n, d, heads = 16 // 8 * (16 // 8) + 1, 16, 2
        assert digital_ops(net, (3, 16, 16)) == {"attention": 2 * n * n * d + heads * n * n,
                                                 "layer_norm": 3 * 4 * n * d, "squeeze_excitation": 0}
    finally:
        unregister("vit_tiny_digital")
    out = CliRunner().invoke(app, ["memory", "--model", "mobilenet_v3_small", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["digital_layers"] == {"squeeze_excitation": 9}
    table = CliRunner().invoke(app, ["memory", "--model", "vit_b_16"])
    assert "digital, not on crossbars: 12 attention, 25 layer norm" in table.stdout
