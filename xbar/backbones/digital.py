"""What a backbone computes digitally, beside the crossbars: only Conv2d and Linear weights are mapped
(xbar.crossbar); the operations below multiply activations by activations, or by statistics of the
activations, so no cell can hold their operand:

| kind | what | digital operations per image (`digital_ops`) |
|---|---|---|
| `attention` | q k^T, softmax, x v of self-attention (`MappedAttention`; its projections are mapped) | 2 n^2 d multiply-adds + h n^2 exponentials |
| `layer_norm` | LayerNorm / GroupNorm: per-token or per-group statistics of the activations | 4 per element (mean, variance, scale) |
| `squeeze_excitation` | the channel gate of squeeze-excitation (its two 1x1 convs are mapped) | 1 multiply per element |

BatchNorm is a per-channel affine with fixed statistics: it is counted with the task's BN
(xbar.memory), not here. `digital_ops` is what the energy model would book as digital work (it does not
yet: xbar.energy counts the mapped layers' crossbars, ADCs and buffers, and BN's affine).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xbar.backbones.wrap import MappedAttention

KINDS = ("attention", "layer_norm", "squeeze_excitation")


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, MappedAttention):
        return "attention"
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        return "layer_norm"
    if type(module).__name__ in ("SqueezeExcitation", "SElayer"):  # torchvision.ops.SqueezeExcitation
        return "squeeze_excitation"
    return None


def digital_layers(model: nn.Module) -> dict[str, list[str]]:
    """The backbone's digital operations by kind (module doc): the names of the modules that compute them."""
    found: dict[str, list[str]] = {k: [] for k in KINDS}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None and not name.startswith("head"):
            found[kind].append(name)
    return found


def digital_ops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Digital operations per image by kind (module doc), from one forward of a (C, H, W) input with hooks;
    the model may live on the meta device (shapes only)."""
    counts = {k: 0 for k in KINDS}

    def hook(kind: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple, output) -> None:  # noqa: ANN001
            out = output[0] if isinstance(output, tuple) else output
            if kind == "attention":
                x = inputs[0] if module.batch_first else inputs[0].transpose(0, 1)
                n, d = x.shape[1], x.shape[2]
                counts[kind] += 2 * n * n * d + module.heads * n * n
            elif kind == "layer_norm":
                counts[kind] += 4 * math.prod(out.shape[1:])
            else:
                counts[kind] += math.prod(out.shape[1:])
        return record

    handles = [m.register_forward_hook(hook(kind)) for m in model.modules() if (kind := _kind(m)) is not None]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts
