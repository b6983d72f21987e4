"""`xbar energy`: the five methods' typical energy on an architecture by name (the command's glue:
the model, its input image and its mapping, then `typical_methods`)."""

from __future__ import annotations

from xbar.crossbar import CrossbarSpec, map_model
from xbar.energy.layer_io import layer_io
from xbar.energy.presets import resolve_preset
from xbar.energy.scenarios import energy_scenario
from xbar.energy.typical import typical_methods
from xbar.errors import UserError


def input_shape_for(name: str) -> tuple[int, int, int]:
    """The image the energy of a named model is computed for: 1x28x28 for the project's small ResNet,
    3x299x299 for Inception v3, else ImageNet's 3x224x224."""
    if name == "small_resnet":
        return (1, 28, 28)
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def named_energy(name: str, preset: str, spare_ratio: float = 0.1, inferences: int = 1,
                 spec: CrossbarSpec | None = None, act_bits: int = 4, adc_bits: int | None = None,
                 scenario: str = "steady") -> dict:
    """`xbar energy`: the five methods' typical energy on an architecture by name (no weights needed), the
    ADC booked at `adc_bits` (None: the preset's own precision), writes counted as the energy `scenario`
    (xbar.energy.scenarios) says."""
    from xbar.memory import AUX_NAMES, HEAD_NAMES, build_named_model

    chosen = resolve_preset(preset, adc_bits=adc_bits)  # a bad preset or scenario fails before the model is built
    how = energy_scenario(scenario, what="--scenario")
    model = build_named_model(name)
    skip = tuple(n for n, _ in model.named_children() if n in HEAD_NAMES + AUX_NAMES)
    mapping = map_model(model, spec or CrossbarSpec(), exclude=skip)
    if not mapping.layers:
        raise UserError(f"--model: {name} has no Conv2d / Linear layer to map")
    try:
        io = layer_io(model, [lm.name for lm in mapping.layers], input_shape_for(name))
    except (UserError, NotImplementedError):  # an operator without a meta kernel: run it for real
        model = model.to_empty(device="cpu")
        io = layer_io(model, [lm.name for lm in mapping.layers], input_shape_for(name))
    result = typical_methods(mapping, io, chosen, act_bits, spare_ratio, inferences, scenario=how)
    result["assumptions"] = {"model": name, "input_shape": list(input_shape_for(name)),
                             "excluded_layers": list(skip), **result["assumptions"]}
    return result
