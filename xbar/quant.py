"""4-bit quantization: what the crossbar cells and the DACs can represent.

Weights: symmetric, L = 2**(bits-1) - 1 integer levels each side of zero (15
levels in [-7, 7] at 4 bits), one learnable clip `alpha` per layer, scale
alpha / L. Activations: 2**bits - 1 levels above zero, learnable clip (PACT),
unsigned where they follow a ReLU; where the first tensor a quantizer sees has
negative values (normalized images, a linear bottleneck's residual stream) it is
signed: sign and magnitude, 2**bits - 1 levels each side, which the chip applies
as two unsigned passes, the positive part and the negative part (xbar.chip.evaluate). Rounding is
straight-through; the clip gets the LSQ/PACT gradient (the rounding error
inside the range, +-1 where the value saturates), scaled by 1/sqrt(N * L) as
in LSQ so that one learning rate suits both weights and clips.

Clips start where the quantization error is smallest (a short search over
candidate clips), on the first tensor a quantizer sees, or explicitly with
`calibrate(model, images)`; the `ready` buffer records that, so a checkpoint
carries its clips. `QuantConv2d` / `QuantLinear` mirror `torch.nn` and quantize
their weights (cells) and inputs (DACs) on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLIP_CANDIDATES = 64  # clip search: fractions of max|x| tried at initialization
CLIP_SAMPLE = 1 << 16  # at most this many values enter the clip search


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward, gradient times `factor` backward (LSQ's step-size gradient scale)."""
    return x * factor + (x - x * factor).detach()


def _best_clip(x: torch.Tensor, levels: int, signed: bool) -> float:
    """The clip (among fractions of max|x|) with the least squared quantization error on x."""
    x = x.detach().flatten().float()
    if x.numel() > CLIP_SAMPLE:  # a fixed stride, not random: initialization stays deterministic
        x = x[:: x.numel() // CLIP_SAMPLE + 1]
    x = x.cpu()  # the search on the CPU: the same clip whichever device the layer runs on
    top = float(x.abs().max()) if signed else float(x.clamp_min(0).max())
    if top <= 0:
        return 1e-3
    clips = torch.linspace(top / CLIP_CANDIDATES, top, CLIP_CANDIDATES)
    steps = (clips / levels).unsqueeze(1)  # [candidates, 1]: all candidates in one pass
    q = torch.clamp(torch.round(x / steps), -levels if signed else 0, levels) * steps
    return float(clips[int((q - x).pow(2).sum(1).argmin())])


class WeightQuantizer(nn.Module):
    """Symmetric weight quantizer: levels in [-L, L] times scale = alpha / L."""

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if bits < 2:
            raise ValueError(f"weight bits must be >= 2 (a sign and a magnitude), got {bits}")
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1
        self.alpha = nn.Parameter(torch.tensor(1.0))  # clip: weights beyond +-alpha saturate
        self.register_buffer("ready", torch.tensor(False))

    @property
    def scale(self) -> torch.Tensor:
        return self.alpha.abs().clamp_min(1e-8) / self.levels

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        self.alpha.fill_(_best_clip(w, self.levels, signed=True))
        self.ready.fill_(True)

    def _levels_and_scale(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ready:
            self.init_from(w)
        alpha = scale_grad(self.alpha, (w.numel() * self.levels) ** -0.5)
        scale = alpha.abs().clamp_min(1e-8) / self.levels
        return round_ste(torch.clamp(w / scale, -self.levels, self.levels)), scale

    def to_levels(self, w: torch.Tensor) -> torch.Tensor:
        """Integer levels in [-L, L] (float dtype, STE rounded): what the cells hold."""
        return self._levels_and_scale(w)[0]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels, scale = self._levels_and_scale(w)
        return levels * scale


class ActQuantizer(nn.Module):
    """Activation quantizer (PACT): codes 0..2**bits - 1 (signed: -(2**bits - 1)..2**bits - 1) times
    alpha / (2**bits - 1). Signed or not is decided with the clip, on the first tensor seen."""

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = bits
        self.levels = 2**bits - 1
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("ready", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        self.signed.fill_(bool((x < 0).any()))
        self.alpha.fill_(_best_clip(x, self.levels, signed=bool(self.signed)))
        self.ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            self.init_from(x)
        features = x[0].numel() if x.dim() > 1 else x.numel()  # LSQ: features per sample
        alpha = scale_grad(self.alpha, (features * self.levels) ** -0.5)
        scale = alpha.abs().clamp_min(1e-8) / self.levels
        return round_ste(torch.clamp(x / scale, -self.levels if self.signed else 0, self.levels)) * scale


class _Quantized:
    """What QuantConv2d and QuantLinear share: a weight quantizer (cell levels) and an input quantizer
    (DAC levels) next to torch.nn's own parameters."""

    def __init__(self, *args, weight_bits: int = 4, act_bits: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = WeightQuantizer(weight_bits)
        self.act_quant = ActQuantizer(act_bits)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)


class QuantConv2d(_Quantized, nn.Conv2d):
    """nn.Conv2d with quantized weights (cell levels) and quantized inputs (DAC levels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.quantized_weight(), self.bias)


class QuantLinear(_Quantized, nn.Linear):
    """nn.Linear with quantized weights and inputs (a linear layer is a 1x1 conv on crossbars)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.quantized_weight(), self.bias)


def quantize_model(model: nn.Module, weight_bits: int = 4, act_bits: int = 4) -> nn.Module:
    """Replace every Conv2d / Linear by its quantized twin, in place, keeping the weights."""
    for name, child in list(model.named_children()):
        if isinstance(child, QuantConv2d | QuantLinear):
            continue
        if isinstance(child, nn.Conv2d):
            q: nn.Module = QuantConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                       child.padding, child.dilation, child.groups, child.bias is not None,
                                       child.padding_mode, weight_bits=weight_bits, act_bits=act_bits)
        elif isinstance(child, nn.Linear):
            q = QuantLinear(child.in_features, child.out_features, child.bias is not None,
                            weight_bits=weight_bits, act_bits=act_bits)
        else:
            quantize_model(child, weight_bits, act_bits)
            continue
        # strict=False: the quantizers' clips are new; they initialize on the first forward
        q.load_state_dict(child.state_dict(), strict=False)
        q.to(child.weight.device, child.weight.dtype)
        q.train(child.training)
        setattr(model, name, q)
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The quantized layers by qualified name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}


def clip_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable clips (`alpha`) of every quantizer: no weight decay on these."""
    return [m.alpha for m in model.modules() if isinstance(m, WeightQuantizer | ActQuantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Set every clip from one batch (weights: their own values; activations: what they see, and
    whether they are signed).

    Runs in eval mode so BN uses its running statistics, as at inference.
    """
    was_training = model.training
    for m in model.modules():
        if isinstance(m, WeightQuantizer | ActQuantizer):
            m.ready.fill_(False)
    model.eval()
    model(x)
    model.train(was_training)


@torch.no_grad()
def export_levels(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: the integer weight levels (int8, what the cells hold) and the scale (0-d float)."""
    out = {}
    for name, layer in quant_layers(model).items():
        levels = layer.weight_quant.to_levels(layer.weight)
        out[name] = {"levels": levels.to(torch.int8).contiguous(),
                     "scale": layer.weight_quant.scale.detach().clone().float()}
    return out
