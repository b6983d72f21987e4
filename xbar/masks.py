"""Task masks, one module per idea (in the spirit of Piggyback's modnets/layers.py).

* `ColumnShiftMask` (XMA; XBM when shift_levels = 0): one real value m_r per
  crossbar column. Binary part: Gumbel-sigmoid of sigma(m_r) at temperature T,
  hard 0.5 threshold forward, straight-through backward. Shift part: m_r
  normalized to [0, 1] (by sigma, the same probability the binary part samples
  from) and rounded to the nearest of {1/2, ..., 1/2**N} or 0. The column's
  multiplier is 1 where the binary part is 1, else the shift value: the
  shift-adder applies it to the whole column, so no cell is re-programmed.
* `ElementBinaryMask` (Piggyback): one real value per weight, initialized to
  1e-2, thresholded at 5e-3, straight-through gradient.

Both are deterministic in eval mode (no Gumbel noise) and export integer codes:
a column mask exports uint8 level codes into `mask_values(N)`, Piggyback a bool
mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_SHIFT_LEVELS = 3  # 1/2, 1/4, 1/8: what the shift-adder offers besides 0 and 1


def shift_values(shift_levels: int) -> torch.Tensor:
    """The values a column in the "0" state of the binary part may take: 0 and 1/2 .. 1/2**N (ascending)."""
    return torch.tensor([0.0] + [2.0**-k for k in range(shift_levels, 0, -1)])


def mask_values(shift_levels: int) -> torch.Tensor:
    """Code -> multiplier table of the column mask, e.g. [0, 1/8, 1/4, 1/2, 1] for N = 3, [0, 1] for N = 0."""
    return torch.cat([shift_values(shift_levels), torch.ones(1)])


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft sample of Bernoulli(sigma(logits)): sigma((logits + g0 - g1) / T), g0, g1 ~ Gumbel(0, 1).

    log(pi0 / (1 - pi0)) with pi0 = sigma(m_r) is m_r itself, so the logits are the real mask.
    The difference of two Gumbel samples is a logistic sample: log(u) - log(1 - u).
    `generator`: the noise stream (None: torch's global one), drawn on its own device (a seeded CPU
    generator gives the same noise whether the mask trains on the CPU or a GPU).
    """
    where = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=where).to(logits.device)
    u = u.clamp_(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)


# a column starts "on" and a Gumbel sample turns it off with P = START_OFF_SHARE: training starts from the
# backbone's function (docs/decisions.md, "Masks that learn")
START_OFF_SHARE = 0.01
START_LOGIT = math.log((1 - START_OFF_SHARE) / START_OFF_SHARE)  # ln 99 = 4.6


class ColumnShiftMask(nn.Module):
    """One multiplier per crossbar column: 1 (binary part on) or a shift level (0, 1/2 .. 1/2**N).

    `init` starts every column at "1" in eval (m_r > 0) and under the training noise at "1" with
    P = sigma(init) (START_LOGIT: 99%). The hard sample depends on m_r only, not on the temperature.
    """

    def __init__(self, n_columns: int, shift_levels: int = 3, temperature: float = 1.0,
                 init: float = START_LOGIT) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.shift_levels, self.temperature = shift_levels, temperature
        self.real = nn.Parameter(torch.full((n_columns,), float(init)))
        self.register_buffer("values", mask_values(shift_levels), persistent=False)
        # the Gumbel noise stream; train_task gives every mask of a task one seeded generator, so
        # trainings running side by side in one process (threads) do not share torch's global one
        self.generator: torch.Generator | None = None

    def _shift_index(self, normalized: torch.Tensor) -> torch.Tensor:
        """Index into `shift_values` of the nearest shift level to each normalized value."""
        shifts = self.values[:-1]
        return (normalized.detach().unsqueeze(-1) - shifts).abs().argmin(-1)

    def shift_part(self) -> torch.Tensor:
        normalized = torch.sigmoid(self.real)
        rounded = self.values[:-1][self._shift_index(normalized)]
        return normalized + (rounded - normalized).detach()  # straight-through rounding

    def binary_part(self) -> torch.Tensor:
        soft = gumbel_sigmoid(self.real, self.temperature, self.generator)
        hard = (soft.detach() > 0.5).to(soft.dtype)
        return soft + (hard - soft.detach())  # straight-through hard threshold

    def codes(self) -> torch.Tensor:
        """Deterministic level codes (uint8) into `values`: the last code is 1, the others shift levels."""
        with torch.no_grad():
            binary = self.real > 0  # sigma(m_r) > 0.5 without noise
            code = self._shift_index(torch.sigmoid(self.real))
            return torch.where(binary, len(self.values) - 1, code).to(torch.uint8)

    def forward(self) -> torch.Tensor:
        """The column multipliers [n_columns]: sampled in training, exact table values in eval."""
        if not self.training:
            return self.values[self.codes().long()]
        binary, shift = self.binary_part(), self.shift_part()
        return shift + binary * (1 - shift)  # = 1 where binary is 1, else the shift value


class ElementBinaryMask(nn.Module):
    """Piggyback's mask: one real value per weight, binary by threshold, straight-through gradient."""

    INIT, THRESHOLD = 1e-2, 5e-3

    def __init__(self, shape: torch.Size | tuple[int, ...]) -> None:
        super().__init__()
        self.real = nn.Parameter(torch.full(tuple(shape), self.INIT))

    def binary(self) -> torch.Tensor:
        """Bool mask (the exported form)."""
        return self.real.detach() > self.THRESHOLD

    def forward(self) -> torch.Tensor:
        hard = self.binary().to(self.real.dtype)
        if not self.training:
            return hard
        return self.real + (hard - self.real).detach()
