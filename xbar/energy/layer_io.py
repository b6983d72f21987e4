"""What the energy model needs to know about the network: per mapped layer and image, the output
positions (times its crossbars are used) and the input and output feature-map sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from xbar.crossbar import Mapping
from xbar.errors import UserError


@dataclass(frozen=True)
class LayerIO:
    """Per image: output positions (times the layer's crossbars are used), input and output elements."""

    positions: int
    in_elems: int
    out_elems: int


def layer_io(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, LayerIO]:
    """Run one dummy image (C, H, W) through `model` with forward hooks on the named layers.

    The model may live on the meta device (shapes only, nothing computed).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise UserError(f"model: no layer named {missing[0]!r}")
    found: dict[str, LayerIO] = {}

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            out, x = output.shape, inputs[0].shape
            positions = math.prod(out[2:]) if isinstance(module, nn.Conv2d) else math.prod(out[1:-1])
            found[name] = LayerIO(int(positions), int(math.prod(x[1:])), int(math.prod(out[1:])))
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"input shape {tuple(input_shape)} does not fit the model ({first})") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unused = [n for n in names if n not in found]
    if unused:
        raise UserError(f"model: layer {unused[0]!r} is not used in the forward pass; cannot place its energy")
    return found



def model_io(model_params, mapping: Mapping, num_classes: int, channels: int,  # noqa: ANN001 (params.ModelParams)
             image_size: int, signed_inputs: frozenset[str] = frozenset()) -> dict[str, LayerIO]:
    """`layer_io` of the mapped layers of params' model for one channels x size x size image (meta device).

    A layer in `signed_inputs` takes signed activations (xbar.quant), which the chip applies in two
    unsigned passes: its crossbars are used twice per output position."""
    from xbar.models import build_model

    with torch.device("meta"):
        model = build_model(model_params, num_classes, channels)
    io = layer_io(model, [lm.name for lm in mapping.layers], (channels, image_size, image_size))
    return {n: LayerIO(2 * x.positions, x.in_elems, x.out_elems) if n in signed_inputs else x for n, x in io.items()}


def signed_input_layers(state: dict[str, torch.Tensor]) -> frozenset[str]:
    """The layers of a saved network whose activation quantizer is signed (its `act_quant.signed` buffer)."""
    suffix = ".act_quant.signed"
    return frozenset(k[: -len(suffix)] for k, v in state.items() if k.endswith(suffix) and bool(v))
