"""Re-programming energy (per cell).

Write-and-step programming moves a cell one level per `pulses_per_level`
pulses, so a cell going from level a to b costs |a - b| * pulses_per_level
pulses of `write_pulse_j`, plus `verify_reads_per_pulse` verify reads of
`verify_read_j` each. A cell already at its target level costs nothing
(xbar.chip.deployment only writes cells that change).
"""

from __future__ import annotations

from xbar.energy.presets import EnergyPreset


def write_energy(pulses: float, preset: EnergyPreset) -> float:
    """Energy of `pulses` programming pulses (verify reads included)."""
    return float(pulses) * preset.write_j_per_pulse()


def level_pulses(steps: float, preset: EnergyPreset) -> float:
    """Pulses to move cells by `steps` levels in total."""
    return float(steps) * preset.pulses_per_level
