"""Quantizers (levels, STE, clip gradients), QAT wrappers, level export, and the quantize stage."""

import json

import pytest
import torch
from torch import nn

from xbar.quant import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    calibrate,
    clip_parameters,
    export_levels,
    quant_layers,
    quantize_model,
    round_ste,
)


def _ready(q: nn.Module, alpha: float) -> nn.Module:
    with torch.no_grad():
        q.alpha.fill_(alpha)
        q.ready.fill_(True)
    return q


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.2, 0.7, -1.4, 2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 1.0, -1.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_weight_quantizer_has_15_symmetric_levels():
    q = _ready(WeightQuantizer(4), 0.7)  # scale 0.1
    w = torch.linspace(-2, 2, 4001)
    out = q(w).detach()
    levels = torch.unique(torch.round(out / 0.1)).to(torch.int64)
    assert levels.tolist() == list(range(-7, 8))  # 15 levels, saturating at +-alpha
    assert torch.allclose(out, torch.round(out / 0.1) * 0.1, atol=1e-6)
    assert torch.equal(q(-w), -q(w))  # symmetric: -w quantizes to -q(w)
    assert q.to_levels(torch.tensor([0.04, 0.26, -0.9])).tolist() == [0.0, 3.0, -7.0]


def test_weight_ste_and_clip_gradient():
    q = _ready(WeightQuantizer(4), 0.7)  # L = 7, scale 0.1
    w = torch.tensor([0.23, -0.36, 1.5, -2.0], requires_grad=True)  # two inside, two saturated
    q(w).sum().backward()
    # STE: identity inside the clip, zero where the weight saturates
    assert w.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # d q / d alpha = (round(w/s) - w/s) / L inside, sign(w) outside; scaled by 1/sqrt(N * L) (LSQ)
    inside = ((2 - 2.3) + (-4 - -3.6)) / 7
    expected = (inside + 1.0 - 1.0) / (4 * 7) ** 0.5
    assert q.alpha.grad.item() == pytest.approx(expected, abs=1e-6)


def test_act_quantizer_pact_levels_and_gradients():
    q = _ready(ActQuantizer(4), 1.5)  # 15 steps of 0.1
    x = torch.tensor([[-0.3, 0.04, 0.76, 1.2, 3.0]], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([[0.0, 0.0, 0.8, 1.2, 1.5]]), atol=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]  # PACT: no gradient below 0 or above the clip
    inside = ((0 - 0.4) + (8 - 7.6) + (12 - 12.0)) / 15
    expected = (inside + 1.0) / (5 * 15) ** 0.5  # the clipped 3.0 contributes 1
    assert q.alpha.grad.item() == pytest.approx(expected, abs=1e-5)
    many = q(torch.rand(1, 10_000) * 3).detach()
    assert len(torch.unique(many)) <= 16 and many.min() >= 0 and many.max() <= 1.5 + 1e-6


def test_first_tensor_sets_a_least_error_clip():
    torch.manual_seed(0)
    w = torch.randn(20_000)
    w[0] = 12.0  # one outlier: a max-based clip would waste most levels
    q = WeightQuantizer(4)
    err = (q(w).detach() - w).pow(2).mean()
    assert bool(q.ready) and 1.0 < q.alpha.item() < 6.0
    naive = _ready(WeightQuantizer(4), float(w.abs().max()))
    assert err < 0.5 * (naive(w).detach() - w).pow(2).mean()


def test_quantize_model_replaces_layers_and_keeps_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.ReLU()),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    ref = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    x = torch.rand(4, 3, 8, 8)
    y_fp = model(x).detach()
    quantize_model(model, weight_bits=8, act_bits=8)
    layers = list(quant_layers(model).values())
    assert [type(m) for m in layers] == [QuantConv2d, QuantConv2d, QuantLinear]
    assert layers[1].groups == 8 and layers[1].stride == (2, 2) and layers[1].bias is None
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, ref, strict=True))
    y_q = model(x).detach()  # at 8 bits the model must stay close to fp32
    assert (y_q - y_fp).abs().max() < 0.05 * y_fp.abs().max()
    assert len(clip_parameters(model)) == 6  # a weight and an input clip per layer


def test_export_levels_are_the_cell_contents():
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))
    calibrate(model, torch.rand(8, 1, 8, 8))
    out = export_levels(model)
    assert set(out) == {"0", "3"}
    for name, layer in quant_layers(model).items():
        levels, scale = out[name]["levels"], out[name]["scale"]
        assert levels.dtype == torch.int8 and levels.shape == layer.weight.shape and scale.dim() == 0
        assert levels.abs().max() <= 7
        assert torch.allclose(levels.float() * scale, layer.quantized_weight().detach())


def test_checkpoint_restores_clips_without_recalibrating():
    from xbar.models import build_model
    from xbar.params import ModelParams

    torch.manual_seed(0)
    a = quantize_model(build_model(ModelParams(width=4, blocks=1), 3))
    calibrate(a, torch.rand(16, 1, 28, 28))
    a.eval()
    b = quantize_model(build_model(ModelParams(width=4, blocks=1), 3))
    b.load_state_dict(a.state_dict())
    b.eval()
    x = torch.rand(5, 1, 28, 28) * 0.3  # a different range: a re-calibration would change the clips
    assert torch.equal(a(x), b(x))


def test_quantize_stage_writes_the_contract(tmp_path, monkeypatch):
    """The stage on a tiny synthetic source task: files, levels without the head, metrics."""
    from torch.utils.data import TensorDataset

    import stages.quantize as stage
    from workflow.io import save_torch
    from xbar.data import TaskData
    from xbar.models import build_model
    from xbar.params import parse_params

    monkeypatch.chdir(tmp_path)
    params = parse_params({"source": {"dataset": "mnist5k"}, "model": {"width": 4, "blocks": 1},
                           "quant": {"epochs": 1, "lr": 0.01}, "train": {"batch_size": 16}})
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = (torch.rand(64, 1, 28, 28, generator=g) * 100 + y.view(-1, 1, 1, 1) * 120).to(torch.uint8)
    data = TaskData(TensorDataset(x, y), TensorDataset(x, y), 2, 1, "a", "b")
    monkeypatch.setattr(stage, "load_task_data", lambda spec, seed: data)
    model = build_model(params.model, 2, 1)
    save_torch(tmp_path / "artifacts/backbone/fp32.pt", {"state_dict": model.state_dict(), "num_classes": 2,
                                                         "channels": 1})
    stage.quantize(params)
    levels = torch.load(tmp_path / "artifacts/backbone/levels.pt", weights_only=True)
    quant = torch.load(tmp_path / "artifacts/backbone/quant.pt", weights_only=True)
    metrics = json.loads((tmp_path / "metrics/quantize.json").read_text())
    assert "head" not in levels and "stem.0" in levels and levels["stem.0"]["levels"].dtype == torch.int8
    assert {"state_dict", "num_classes", "channels"} <= set(quant)
    net = quantize_model(build_model(params.model, 2, 1))
    net.load_state_dict(quant["state_dict"])  # the contract: quantize_model(build_model(...)) + load
    assert metrics["accuracy_drop"] == pytest.approx(metrics["fp32_accuracy"] - metrics["quant_accuracy"], abs=0.02)
