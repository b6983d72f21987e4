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
        with hardware_aware(model, NOISY, AdcConfig(5, "per_column"), levels, seed=0):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("aware", ["chip", "noise"])
def test_hw_aware_learn_is_deterministic_and_trains_on_the_chip(pretrained, aware):
    """The per-task step with train.hw_aware: the same params give the same masks; the chip's noise changes
    what the task learns (the same step without it learns other masks)."""
    params, quant, levels = pretrained
    data = TaskData(random_task(96, seed=2), random_task(48, seed=3), 3, 1, "train", "test")

    def masks(hw_aware: bool) -> dict:
        p = params.model_copy(update={"train": params.train.model_copy(update={"hw_aware": hw_aware,
                                                                               "device": "cpu"})})
        p = p.model_copy(update={"chip": p.chip.model_copy(update={"device": "paper", "aware": aware})})
        spec = TaskSpec(dataset="optdigits", method="xma", epochs=2)
        seed_everything(0, 2)
        learned = learn(p, spec, Backbone(quant, levels), data, "hw")
        # what the task learned: its column-mask codes and its trained state (head, clips)
        return learned.task["column_masks"] | learned.task["model_state"]

    first, again, plain = masks(True), masks(True), masks(False)
    assert first.keys() == again.keys() == plain.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], plain[k]) for k in first)


# --- noise-aware training (chip.aware: noise, xbar.chip.noise_aware) ----------------------------------


def test_noise_aware_forward_perturbs_weights_by_the_cells_sigma_and_keeps_the_ideal_gradient(xma2):
    """Training forwards see W + dW with dW ~ N(0, sigma_w^2) from the cells' programming error; the
    gradient reaches the trainables through the ideal layer; eval mode and the block's exit are ideal."""
    from xbar.chip.noise_aware import noise_aware, weight_noise_sigma

    model, _ = xma2
    layer = next(iter(model.layers().values()))
    x = as_input(random_task(8, seed=1).tensors[0])
    model.net.eval()
    with torch.no_grad():
        ideal = model.net(x)
    spec = model.mapping.spec
    for signed in ("offset", "differential"):
        sigma = weight_noise_sigma(layer.task_levels().round(), spec, DEVICES["paper"], signed)
        # by definition, for a zero weight: offset cells (1, 3), differential (0, 0) (0, 0)
        s = DEVICES["paper"].sigma_levels(torch.tensor([0, 1, 3]), 3)
        zero = (layer.task_levels().round() == 0)
        want = torch.sqrt((4 * s[1]) ** 2 + s[2] ** 2) if signed == "offset" else torch.sqrt(2 * 17 * s[0] ** 2)
        assert torch.allclose(sigma[zero], want.expand(int(zero.sum())), rtol=1e-5)
    with noise_aware(model, DEVICES["paper"], "offset", seed=0):
        model.net.eval()
        with torch.no_grad():
            assert torch.equal(model.net(x), ideal)  # eval stays ideal
        model.net.train()
        torch.manual_seed(5)  # the same Gumbel sample of the column masks for both forwards
        out1 = model.net(x)
        torch.manual_seed(5)
        out2 = model.net(x)
        assert not torch.allclose(out1, out2)  # fresh weight noise per forward
        out1.sum().backward()
        grads = [p.grad for p in model.net.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    with noise_aware(model, DEVICES["ideal"], "offset", seed=0):  # an ideal device: the ideal forward
        model.net.train()
        torch.manual_seed(5)
        a = model.net(x)
    model.net.train()
    torch.manual_seed(5)
    assert torch.allclose(a, model.net(x), atol=1e-6)
    model.net.eval()
    assert "forward" not in layer.__dict__
