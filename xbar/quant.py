"""4-bit quantization: what the crossbar cells and the DACs can represent.

Weights: symmetric, 2**(bits-1) - 1 levels each side of zero (15 levels at 4
bits), one learnable clip per layer (LSQ/PACT style gradient through the
scale), straight-through rounding. Activations: unsigned (they follow a ReLU,
or are images in [0, 1]), 2**bits - 1 levels, learnable clip (PACT).
`QuantConv2d` / `QuantLinear` mirror `torch.nn` and quantize both on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


class WeightQuantizer(nn.Module):
    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.levels = 2 ** (bits - 1) - 1
        self.alpha = nn.Parameter(torch.tensor(1.0))  # clip: weights beyond +-alpha saturate
        self.register_buffer("ready", torch.tensor(False))

    @property
    def scale(self) -> torch.Tensor:
        return self.alpha.abs() / self.levels

    def to_levels(self, w: torch.Tensor) -> torch.Tensor:
        """Integer levels in [-levels, levels] (float dtype, STE rounded)."""
        if not self.ready:  # LSQ's initial step: s = 2 mean|w| / sqrt(levels)
            with torch.no_grad():
                self.alpha.fill_(float(2 * w.abs().mean() * self.levels**0.5))
                self.ready.fill_(True)
        return round_ste(torch.clamp(w / self.scale, -self.levels, self.levels))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.to_levels(w) * self.scale


class ActQuantizer(nn.Module):
    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.levels = 2**bits - 1
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("ready", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:  # start the clip at the 99.9th percentile of the first batch
            with torch.no_grad():
                sample = x.detach().flatten()[:100_000].float()
                self.alpha.fill_(max(float(torch.quantile(sample, 0.999)), 1e-3))
                self.ready.fill_(True)
        scale = self.alpha.abs() / self.levels
        return round_ste(torch.clamp(x / scale, 0, self.levels)) * scale


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d with 4-bit weights (cells) and 4-bit inputs (bit-serial DAC)."""

    def __init__(self, *args, weight_bits: int = 4, act_bits: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = WeightQuantizer(weight_bits)
        self.act_quant = ActQuantizer(act_bits)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.quantized_weight(), self.bias)


class QuantLinear(nn.Linear):
    def __init__(self, *args, weight_bits: int = 4, act_bits: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = WeightQuantizer(weight_bits)
        self.act_quant = ActQuantizer(act_bits)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.quantized_weight(), self.bias)


def quantize_model(model: nn.Module, weight_bits: int = 4, act_bits: int = 4) -> nn.Module:
    """Replace every Conv2d / Linear by its quantized twin, in place, keeping the weights."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d) and not isinstance(child, QuantConv2d):
            q = QuantConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                            child.padding, child.dilation, child.groups, child.bias is not None,
                            weight_bits=weight_bits, act_bits=act_bits)
        elif isinstance(child, nn.Linear) and not isinstance(child, QuantLinear):
            q = QuantLinear(child.in_features, child.out_features, child.bias is not None,
                            weight_bits=weight_bits, act_bits=act_bits)
        else:
            quantize_model(child, weight_bits, act_bits)
            continue
        q.load_state_dict(child.state_dict(), strict=False)
        setattr(model, name, q)
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The quantized layers by qualified name, in forward-definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}


@torch.no_grad()
def export_levels(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: the integer weight levels (int8, what the cells hold) and the scale."""
    out = {}
    for name, layer in quant_layers(model).items():
        levels = layer.weight_quant.to_levels(layer.weight)
        out[name] = {"levels": levels.to(torch.int8), "scale": layer.weight_quant.scale.detach().clone()}
    return out
