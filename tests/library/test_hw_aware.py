"""Hardware-aware training (train.hw_aware, xbar.chip.aware): the training forward is the chip's, the gradient
the ideal layer's (straight through), every training forward a fresh chip; eval mode stays ideal; the step
trains with it deterministically."""

import pytest
import torch

from tiny_backbone import random_task, tiny_backbone
from xbar.chip.aware import hardware_aware
from xbar.chip.devices import DEVICES, resolve_device
from xbar.chip.forward import AdcConfig
from xbar.data import TaskData
from xbar.errors import UserError
from xbar.methods import build_task_model
from xbar.params import TaskSpec
from xbar.step import Backbone, learn
from xbar.training import as_input, seed_everything

NOISY = resolve_device("paper", {"noise_scale": 3.0})


@pytest.fixture(scope="module")
def xma2():
    params, quant, levels = tiny_backbone(width=8)
    seed_everything(0)
    model = build_task_model(params, TaskSpec(dataset="optdigits", method="xma2", epochs=1), quant, levels, 3,
                             spare_pes=torch.tensor([0, 3]))
    return model, levels


def first_layer_run(model, x, seed=0):
    """The first mapped layer's output in training mode for input `x`, one Gumbel sample (seeded), and the
    gradient of a fixed linear loss with respect to its column-mask logits and spare-PE weights."""
    layer = next(iter(model.layers().values()))
    layer.train()
    layer.column_mask.generator = torch.Generator().manual_seed(seed)
    for p in (layer.column_mask.real, layer.latent):
        p.grad = None
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), layer.column_mask.real.grad.clone(), layer.latent.grad.clone()


def test_training_forward_is_the_chips_and_the_gradient_the_ideal_layers(xma2):
    model, levels = xma2
    x = as_input(random_task(8, seed=1).tensors[0])
    ideal = first_layer_run(model, x)
    with hardware_aware(model, DEVICES["ideal"], AdcConfig(16, "full"), levels, seed=0):
        exact = first_layer_run(model, x)
    with hardware_aware(model, NOISY, AdcConfig(4, "full"), levels, seed=0):
        model.net.train()
        model.net(x)  # a network forward draws this forward's chip
        noisy = first_layer_run(model, x)
        model.net(x)
        other = first_layer_run(model, x)
        layer = next(iter(model.layers().values()))
        layer.eval()
        with torch.no_grad():
            in_eval = layer(x)
    # an exact ADC on an ideal device computes the ideal layer (float rounding of the scale apart)
    assert torch.allclose(exact[0], ideal[0], rtol=1e-5, atol=1e-6)
    # a 4-bit ADC on a noisy device does not, and another chip computes differently again ...
    assert not torch.allclose(noisy[0], ideal[0], atol=1e-3)
    assert not torch.allclose(noisy[0], other[0], atol=1e-3)
    # ... but the gradient is the ideal layer's: straight through
    for got in (exact, noisy):
        assert torch.equal(got[1], ideal[1]) and torch.equal(got[2], ideal[2])
    with torch.no_grad():
        assert torch.equal(in_eval, type(layer).forward(layer, x))  # eval mode is ideal
    assert "forward" not in layer.__dict__  # the ideal forward is back after the block


def test_calibrated_adc_needs_calibration_images(xma2):
    model, levels = xma2
    with pytest.raises(UserError, match="calibration images"):
        with hardware_aware(model, NOISY, AdcConfig(5, "calibrated"), levels, seed=0):
            pass


@pytest.mark.slow
def test_hw_aware_learn_is_deterministic_and_trains_on_the_chip(pretrained):
    """The per-task step with train.hw_aware: the same params give the same masks; the chip's noise changes
    what the task learns (the same step without it learns other masks)."""
    params, quant, levels = pretrained
    data = TaskData(random_task(96, seed=2), random_task(48, seed=3), 3, 1, "train", "test")

    def masks(hw_aware: bool) -> dict:
        p = params.model_copy(update={"train": params.train.model_copy(update={"hw_aware": hw_aware,
                                                                               "device": "cpu"})})
        p = p.model_copy(update={"chip": p.chip.model_copy(update={"device": "paper",
                                                                   "overrides": {"noise_scale": 3.0}})})
        spec = TaskSpec(dataset="optdigits", method="xma", epochs=2)
        seed_everything(0, 2)
        learned = learn(p, spec, Backbone(quant, levels), data, "hw")
        return learned.task["column_masks"]

    first, again, plain = masks(True), masks(True), masks(False)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], plain[k]) for k in first)
