import torch

from xbar.crossbar import CrossbarSpec, map_model
from xbar.models import SmallResNet, build_model
from xbar.params import ModelParams


def test_small_resnet_shapes_and_enough_pes():
    model = build_model(ModelParams(), num_classes=7)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    assert model.features(torch.rand(2, 1, 28, 28)).shape == (2, 64)
    assert map_model(model, CrossbarSpec()).n_pes >= 100  # the floor for the default backbone


def test_small_resnet_width_changes_size():
    small, wide = SmallResNet(10, width=8, blocks=1), SmallResNet(10, width=16, blocks=1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide) > 3 * count(small)


def test_torchvision_resnet18_by_configuration(tmp_path):
    model = build_model(ModelParams(name="resnet18"), num_classes=5, in_channels=1)
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 5)
    assert model.body.conv1.in_channels == 1 and hasattr(model, "head")
    # a local state_dict (e.g. ImageNet weights) is loaded by path
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    loaded = build_model(ModelParams(name="resnet18", weights=str(tmp_path / "w.pt")), 5, in_channels=3)
    assert torch.equal(loaded.body.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
