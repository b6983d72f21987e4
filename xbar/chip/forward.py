"""The chip forward: what the crossbars, ADCs and shift-adders compute for one mapped layer.

Ideal mode (xbar.methods.CrossbarLayer) computes conv(x_q, levels x scale x
column multiplier) in floating point. The chip computes, per output position:

1. **Bit-serial inputs.** The input's activation codes c = x_q / step (0 ..
   2**act_bits - 1) enter over act_bits cycles; in cycle j every row gets bit j
   of its code (1-bit row inputs, the energy model's assumption).
2. **Column partial sums.** In each row tile, each bit-slice column k of output
   o sums its cells: psum[j, t, k, o] = sum over the tile's rows of cell_level *
   input_bit (at most rows x (2**cell_bits - 1) = 216 at 72 rows, 2-bit cells).
   Cells are in level units above g_min (see xbar.chip.devices); device effects
   are in the cell levels (per programming) and in read noise (per read).
3. **ADC** of `adc_bits` per column and cycle: code = clamp(round(psum /
   delta), 0, 2**adc_bits - 1), value = code x delta. The step delta =
   max(1, R / (2**adc_bits - 1)) never goes below one cell level (an ADC with
   at least as many codes as the partial sum has values reads it exactly; a
   finer step would only add fractional digits). R, the ADC's range:
   * `full`: the full scale of the column, rows in the tile x top cell level
     (data-independent, no clipping: a 5-bit ADC then steps 216 / 31 ~ 7 levels);
   * `calibrated`: the largest partial sum each bit slice of the layer saw on
     calibration images (NeuroSim's inference wrapper scales its ADC to the
     min..max of the partial sums of every batch -- `LinearQuantizeOut`; here
     the range is fixed once, on calibration images, as a chip would), or the
     `clip_percentile`-th percentile of them; larger sums saturate.
4. **Shift-add.** value x 2**j (cycle) x B**(K-1-k) (slice, B = 2**cell_bits),
   summed per column; the column mask multiplies this digitized sum (the
   shift-adder's shift, or 0 / 1), as the paper's Figure 3 places it.
5. **Signed weights.** `offset` (the mapping's encoding, xbar.crossbar): cells
   hold u = w + L, so the digital side subtracts L x sum(codes) of the tile's
   rows, a popcount of the input bits, exact. The ADC pays for it: a weight 0
   is stored as u = 7 = (1, 3), so every driven row adds 1 to the MSB slice and
   3 to the LSB slice whatever the weight; the partial sums sit on a large
   data-dependent pedestal and the ADC spends its codes on it.
   `differential`: a positive and a negative array hold max(w, 0) and
   max(-w, 0); their columns are subtracted in analog (MNSIM's `Sub_Position =
   0`) and one signed ADC (codes -(2**(b-1) - 1) .. 2**(b-1) - 1) reads the
   difference, which is centred on 0: no pedestal, no digital correction, but
   twice the cells (chip forward only: the mapping and the energy model stay
   offset-encoded).
6. **Row tiles** are summed digitally; the layer's scale, the input step and
   the bias apply last.

Vectorized as one grouped convolution per input cycle: the input channels of
each row tile are gathered into one conv group whose outputs are the tile's
bit-slice columns (plus one all-ones column: the tile's input popcount), so
no Python loop runs over output positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xbar.chip.instance import LayerCells, check_scheme
from xbar.crossbar import LayerMap
from xbar.errors import UserError

ADC_RANGES = ("full", "calibrated")
CHUNK_ELEMENTS = 1 << 23  # partial sums held at once (float32: 32 MiB)


@dataclass(frozen=True)
class AdcConfig:
    """The periphery: ADC bits, the ADC's range and the signed-weight scheme."""

    bits: int = 5
    range: str = "calibrated"
    signed: str = "offset"
    clip_percentile: float = 100.0  # calibrated range: this percentile of |partial sums| (100: the largest)

    def check(self) -> AdcConfig:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise UserError(f"adc_bits: expected an integer in 1..16, got {self.bits!r}")
        if isinstance(self.clip_percentile, bool) or not isinstance(self.clip_percentile, int | float) \
                or not 50 <= self.clip_percentile <= 100:
            raise UserError(f"adc_clip_percentile: expected a percentile in 50..100, got {self.clip_percentile!r}")
        if self.range not in ADC_RANGES:
            raise UserError(f"adc_range: {self.range!r} is not an ADC range (one of {', '.join(ADC_RANGES)})")
        check_scheme(self.signed)
        return self

    @property
    def top_code(self) -> int:
        """Largest ADC code: unsigned for offset, symmetric signed for differential."""
        return 2**self.bits - 1 if self.signed == "offset" else 2 ** (self.bits - 1) - 1


class LayerPlan:
    """Row tiles of one layer as conv groups: which input channels and kernel positions each tile holds.

    Derived from the mapping's column of every weight (column = row tile x out
    channels + output, or the output alone when groups are packed), so every
    layout of xbar.crossbar -- dense, grouped, packed depthwise, kernels split
    over several row tiles -- runs through the same code.
    """

    def __init__(self, lm: LayerMap) -> None:
        cout, cin_g, kernel, groups = lm.out_channels, lm.cin_per_group, lm.kernel, lm.groups
        column = lm.index_tensors()[0].long().reshape(cout, cin_g, kernel)  # a local int64 copy: index ops below
        tile = column // cout  # the weight's row tile within its group
        self.tiles = int(tile.max()) + 1
        chans = [sorted(set(torch.nonzero((tile == t).any(2).any(0)).flatten().tolist())) for t in range(self.tiles)]
        self.width = max(len(c) for c in chans)  # input channels per conv group (padded)
        slot = torch.zeros(self.tiles, self.width, dtype=torch.int64)
        valid = torch.zeros(self.tiles, self.width, dtype=torch.bool)
        for t, c in enumerate(chans):
            slot[t, : len(c)] = torch.tensor(c, dtype=torch.int64)
            valid[t, : len(c)] = True
        self.slot = slot  # [T, width]: channel within the group
        # input channel gathered into conv group (t, g), slot s: g * cin_g + slot[t, s]
        self.gather = (torch.arange(groups).view(1, groups, 1) * cin_g + slot.unsqueeze(1)).reshape(-1)
        picked = tile[:, slot.reshape(-1), :].reshape(cout, self.tiles, self.width, kernel)
        self.mask = ((picked == torch.arange(self.tiles).view(1, -1, 1, 1)) & valid.view(1, self.tiles, -1, 1)
                     ).permute(1, 0, 2, 3).float()  # [T, Cout, width, kernel]: the cell is in the tile
        self.rows = self.mask.sum((2, 3)).amax(1)  # [T]: rows a column of the tile sums over
        col = torch.full((self.tiles, cout), -1, dtype=torch.int64)
        t_idx, o_idx = tile.reshape(cout, -1).T, torch.arange(cout).expand(cin_g * kernel, cout)
        col[t_idx, o_idx] = column.reshape(cout, -1).T  # every weight of (tile, output) has one column
        self.column = col  # [T, Cout]: the mask unit of (row tile, output)
        self.groups, self.cout, self.kernel, self.shape = groups, cout, kernel, lm.shape


class ChipLayer:
    """One mapped layer on one chip instance: cells laid out as conv weights once, then run per batch."""

    def __init__(self, plan: LayerPlan, cells: LayerCells, adc: AdcConfig, cell_bits: int, weight_levels: int,
                 multipliers: torch.Tensor | None = None, read_sigma: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        self.plan, self.adc, self.generator = plan, adc.check(), generator
        self.base, self.offset = 2**cell_bits, weight_levels if adc.signed == "offset" else 0
        lv = cells.levels  # [arrays, *shape, K]
        self.arrays, self.k = lv.shape[0], lv.shape[-1]
        g = lv[0] if adc.signed == "offset" else lv[0] - lv[1]  # differential: currents subtract in analog
        self.weight = self._conv_weight(g.reshape(plan.cout, -1, plan.kernel, self.k))
        self.gain = cells.drift_gain
        self.integer_cells = bool((lv == lv.round()).all())
        self.read_sigma = read_sigma  # level units, per cell and read
        m = torch.ones(plan.tiles, plan.cout) if multipliers is None else multipliers.float()[plan.column.clamp_min(0)]
        self.mask = m.reshape(plan.tiles, plan.groups, -1)  # [T, G, cout_g]
        top = self.base - 1
        self.full_scale = plan.rows * top  # [T]
        self.clip: torch.Tensor | None = None  # calibrated range per slice [K]
        self.bins = int(self.full_scale.max()) + 1
        self.seen = torch.zeros(self.k, self.bins, dtype=torch.int64)  # |partial sum| histogram per slice
        self.calibrating = False

    def _conv_weight(self, g: torch.Tensor) -> torch.Tensor:
        """[T * G * (K * cout_g + 1), width, kh, kw]: per (tile, group) the K slices of its outputs, then ones."""
        p, k = self.plan, self.k
        cout_g = p.cout // p.groups
        cells = g[:, p.slot.reshape(-1)].reshape(p.cout, p.tiles, p.width, p.kernel, k)
        cells = cells.permute(1, 0, 4, 2, 3) * p.mask.unsqueeze(2)  # [T, Cout, K, width, kernel]
        cells = cells.reshape(p.tiles, p.groups, cout_g, k, p.width, p.kernel).transpose(2, 3)
        cells = cells.reshape(p.tiles, p.groups, k * cout_g, p.width, p.kernel)
        ones = p.mask.reshape(p.tiles, p.groups, cout_g, p.width, p.kernel).amax(2, keepdim=True)
        w = torch.cat([cells, ones], 2)
        kh, kw = p.shape[2:] if len(p.shape) == 4 else (1, 1)
        return w.reshape(-1, p.width, kh, kw).contiguous()

    def delta(self) -> torch.Tensor:
        """ADC step per (tile, slice), [T, 1, K, 1, 1] (broadcast over groups, outputs, positions)."""
        top = self.adc.top_code
        if self.adc.range == "calibrated" and self.clip is not None:
            r = self.clip.view(1, -1).expand(self.plan.tiles, -1)
        else:
            r = self.full_scale.view(-1, 1).expand(-1, self.k)
        return (r / max(top, 1)).clamp_min(1.0).view(self.plan.tiles, 1, self.k, 1, 1)

    def start_calibration(self) -> None:
        self.calibrating, self.seen = True, torch.zeros_like(self.seen)

    def finish_calibration(self) -> None:
        """The range of each slice's ADC: the clip_percentile-th percentile of the |partial sums| seen."""
        self.calibrating = False
        cdf = self.seen.cumsum(1).double() / self.seen.sum(1, keepdim=True).clamp_min(1)
        self.clip = (cdf < self.adc.clip_percentile / 100 - 1e-12).sum(1).float().clamp_min(1.0)

    def __call__(self, codes: torch.Tensor, act_bits: int, conv_args: tuple | None) -> torch.Tensor:
        """Integer-domain output sum_t m_t * sum_rows w * code, [N, Cout, (Ho, Wo)], for input codes."""
        p = self.plan
        x = codes.to(torch.int32)
        x = x.reshape(*x.shape, 1, 1) if conv_args is None else x
        stride, padding, dilation, _ = conv_args or (1, 0, 1, 1)
        x = x.index_select(1, p.gather)
        cout_g = p.cout // p.groups
        per_image = p.tiles * p.groups * (self.k * cout_g + 1) * self._positions(x, stride, padding, dilation)
        chunk = max(1, CHUNK_ELEMENTS // max(per_image, 1))
        out = [self._run(x[i: i + chunk], act_bits, stride, padding, dilation) for i in range(0, len(x), chunk)]
        y = torch.cat(out)
        return y.reshape(len(codes), p.cout) if conv_args is None else y

    def _positions(self, x: torch.Tensor, stride, padding, dilation) -> int:  # noqa: ANN001
        """Output positions per image (a conv on the meta device: any padding form torch accepts)."""
        probe = torch.empty(1, *x.shape[1:], device="meta")
        groups = self.plan.tiles * self.plan.groups
        out = F.conv2d(probe, self.weight.to("meta"), None, stride, padding, dilation, groups)
        return out.shape[2] * out.shape[3]

    def _run(self, x: torch.Tensor, act_bits: int, stride, padding, dilation) -> torch.Tensor:  # noqa: ANN001
        p, k, n = self.plan, self.k, len(x)
        cout_g = p.cout // p.groups
        step = self.delta()  # [T, 1, K, 1, 1] against psum [n, T, G, K, cout_g, P]
        top = self.adc.top_code
        lowest = 0 if self.adc.signed == "offset" else -top
        exact = self.calibrating or self.exact_adc()
        # the shift-adder's weight of slice s: B**(K-1-s), times the ADC step (codes -> partial sums)
        slice_w = self.base ** torch.arange(k - 1, -1, -1, dtype=torch.float32).view(1, 1, k, 1, 1)
        slice_w = slice_w if exact else slice_w * step
        acc = ones = None
        for j in range(act_bits):  # input cycles, LSB first
            bits = torch.bitwise_right_shift(x, j).bitwise_and_(1).float()
            out = F.conv2d(bits, self.weight, None, stride, padding, dilation, p.tiles * p.groups)
            hw = out.shape[2:]
            out = out.reshape(n, p.tiles, p.groups, k * cout_g + 1, -1)
            psum = out[:, :, :, : k * cout_g].unflatten(3, (k, cout_g))  # a view: ops below work in place
            pop = out[:, :, :, k * cout_g:]  # [n, T, G, 1, P]: driven rows of the tile (digital popcount)
            if self.read_sigma:
                noise = torch.randn(psum.shape, generator=self.generator)
                psum.add_(noise.mul_((self.read_sigma * (self.arrays * pop).sqrt()).unsqueeze(3)))
            if self.calibrating:  # a histogram of the rounded |partial sums| of each slice
                seen = psum.abs().round().clamp_max(self.bins - 1).long()
                for s in range(k):
                    self.seen[s] += torch.bincount(seen[:, :, :, s].flatten(), minlength=self.bins)
            elif not exact:  # the ADC: codes
                psum.div_(step).round_().clamp_(lowest, top)
            if acc is None:
                acc, ones = torch.zeros(psum[:, :, :, 0].shape), torch.zeros(pop.shape)
            for s in range(k):  # shift-add: slice and cycle significance
                acc.addcmul_(psum[:, :, :, s], slice_w[:, :, s] * 2.0**j)
            ones.add_(pop, alpha=2.0**j)  # the sum of the input codes, digital
        if self.gain != 1.0:  # global drift compensation, on the digitized sums
            acc.mul_(self.gain)
        if self.offset:
            acc.sub_(ones, alpha=self.offset)
        y = torch.einsum("ntgop,tgo->ngop", acc, self.mask)  # the column mask, then the row tiles
        return y.reshape(n, p.cout, *hw)

    def exact_adc(self) -> bool:
        """The ADC reads every possible partial sum exactly: integer cells, no read noise, step 1, no clip."""
        if self.read_sigma or not self.integer_cells:
            return False
        return bool((self.delta() == 1).all()) and float(self.full_scale.max()) <= self.adc.top_code
