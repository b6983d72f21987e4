"""Named presets: one way to look up a preset, apply overrides and cite every constant.

Two tables of presets use it: the energy constants (`xbar.energy.presets.PRESETS`)
and the device models (`xbar.chip.devices.DEVICES`). A preset is a frozen
dataclass with `name`, `description`, `sources` ((constant, where its value comes
from) pairs) and `check()`; every other field is a constant.

Where an energy preset and a device preset describe the same device they carry
the same name (`paper`, `neurosim-22nm`, `mnsim-45nm`), so one name selects
both: params.yaml's `energy.preset` also picks the chip's device model unless
`chip.device` names another (`technology`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any, TypeVar

from xbar.errors import UserError

P = TypeVar("P")
META = ("name", "description", "sources")


class Sourced:
    """What a preset dataclass shares: its constants and the source of each."""

    @property
    def constants(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in META}  # type: ignore[arg-type]

    @property
    def source(self) -> dict[str, str]:
        return dict(self.sources)  # type: ignore[attr-defined]


def resolve(table: Mapping[str, P], name: str, overrides: Mapping[str, Any] | None, *, what: str,
            where: str, note: str = "override", fixed: Mapping[str, str] | None = None,
            prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> P:
    """`table[name]` with `overrides` (constant -> value) applied and checked; bad input -> one-line UserError.

    `what` names the preset's setting in messages (e.g. "energy.preset"), `where` the overrides'
    ("energy.overrides"); `fixed`: constants no override may set, with the reason; `prepare` normalizes
    the overrides' values (e.g. a number to a 1-term polynomial). An overridden constant's source is `note`.
    """
    if name not in table:
        raise UserError(f"{what}: unknown preset {name!r} (one of {', '.join(table)})")
    preset = table[name]
    overrides = dict(overrides or {})
    constants = preset.constants  # type: ignore[attr-defined]
    unknown = sorted(set(overrides) - set(constants))
    if unknown:
        raise UserError(f"{where}: unknown constant {unknown[0]!r} (constants: {', '.join(constants)})")
    for key, reason in (fixed or {}).items():
        if key in overrides:
            raise UserError(f"{where}: {key} cannot be overridden ({reason})")
    if not overrides:
        return preset
    if prepare is not None:
        overrides = prepare(overrides)
    sources = tuple((k, v) for k, v in preset.sources if k not in overrides)  # type: ignore[attr-defined]
    return replace(preset, **overrides, sources=sources + tuple((k, note) for k in overrides)).check()


def technology(params) -> tuple[str, str]:  # noqa: ANN001 (Params)
    """(energy preset, device preset) names of params: `chip.device` defaults to `energy.preset`'s name."""
    return params.energy.preset, params.chip.device or params.energy.preset
