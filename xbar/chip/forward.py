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
3. **ADC** of `adc_bits` per column and cycle, its range set by the rule of xbar.chip.adc
   (`full`, or calibrated `per_layer` / `per_crossbar` / `per_column` with a percentile or MSE clip).
4. **Shift-add.** value x 2**j (cycle) x B**(K-1-k) (slice, B = 2**cell_bits),
   summed per column; the column mask multiplies this digitized sum (the
   shift-adder's shift, or 0 / 1), as the paper's Figure 3 places it.
5. **Signed weights** (xbar.crossbar). `offset`: cells hold u = w + L, so the
   digital side subtracts L x sum(codes) of the tile's rows, a popcount of the
   input bits, exact; the ADC pays for it: a weight 0 is stored as u = 7 = (1, 3),
   so the partial sums sit on a data-dependent pedestal. `offset_ref` (NeuroSim):
   the same cells, and per row tile a reference column per slice holding L's
   digit; its partial sums are digitized like any column, shift-added and
   subtracted from every output of the tile after the ADC (the reference's own
   device error and ADC error enter). `differential`: a positive and a negative
   array hold max(w, 0) and max(-w, 0); their columns are subtracted in analog
   (MNSIM's `Sub_Position = 0`) and one signed ADC (codes -(2**(b-1) - 1) ..
   2**(b-1) - 1) reads the difference, centred on 0: no pedestal, no digital
   correction.
6. **Row tiles** are summed digitally; the layer's scale, the input step and
   the bias apply last.

Vectorized as one grouped convolution per input cycle: the input channels of
each row tile are gathered into one conv group whose outputs are the tile's
bit-slice columns (plus one all-ones column: the tile's input popcount), so
no Python loop runs over output positions. (offset_ref adds K reference
columns per conv group.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xbar.chip.adc import AdcConfig, adc_step, clip_ranges
from xbar.chip.instance import LayerCells
from xbar.crossbar import CrossbarSpec, LayerMap

__all__ = ["AdcConfig", "ChipLayer", "LayerPlan", "reference_targets"]

CHUNK_ELEMENTS = 1 << 23  # partial sums held at once (float32: 32 MiB)


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
        self.crossbar = lm.placement.column_crossbar.long()[col.clamp_min(0)]  # [T, Cout]: its crossbar (local)
        self.groups, self.cout, self.kernel, self.shape = groups, cout, kernel, lm.shape


def reference_targets(plan: LayerPlan, spec: CrossbarSpec) -> torch.Tensor:
    """Target levels of a layer's reference columns (offset_ref): L's digit per slice on every row slot of
    every row tile and conv group, [T, G, K, width, kernel]."""
    digits = spec.reference_levels().to(torch.int64)
    return digits.view(1, 1, -1, 1, 1).expand(plan.tiles, plan.groups, -1, plan.width, plan.kernel).clone()


class ChipLayer:
    """One mapped layer on one chip instance: cells laid out as conv weights once, then run per batch."""

    def __init__(self, plan: LayerPlan, cells: LayerCells, adc: AdcConfig, cell_bits: int, weight_levels: int,
                 multipliers: torch.Tensor | None = None, read_sigma: float = 0.0,
                 generator: torch.Generator | None = None, reference: torch.Tensor | None = None) -> None:
        self.plan, self.adc, self.generator = plan, adc.check(), generator
        self.base, self.offset = 2**cell_bits, weight_levels if adc.signed == "offset" else 0
        lv = cells.levels  # [arrays, *shape, K]
        self.arrays, self.k = lv.shape[0], lv.shape[-1]
        cout_g = plan.cout // plan.groups
        self.refs = self.k if adc.signed == "offset_ref" else 0  # reference columns per conv group
        if self.refs and reference is None:  # exact reference cells: L's digits
            digits = torch.tensor([(weight_levels // self.base**i) % self.base for i in reversed(range(self.k))])
            reference = digits.view(1, 1, -1, 1, 1).expand(plan.tiles, plan.groups, -1, plan.width, plan.kernel)
        g = lv[0] if adc.signed != "differential" else lv[0] - lv[1]  # differential: currents subtract in analog
        self.weight = self._conv_weight(g.reshape(plan.cout, -1, plan.kernel, self.k), reference)
        self.gain = cells.drift_gain
        self.integer_cells = bool((lv == lv.round()).all()) and (reference is None or
                                                                 bool((reference == reference.round()).all()))
        self.read_sigma = read_sigma  # level units, per cell and read
        m = torch.ones(plan.tiles, plan.cout) if multipliers is None else multipliers.float()[plan.column.clamp_min(0)]
        self.mask = m.reshape(plan.tiles, plan.groups, -1)  # [T, G, cout_g]
        self.full_scale = plan.rows * (self.base - 1)  # [T]
        self.unit, self.ref_unit, self.units = self._units(cout_g)
        self.ranges: torch.Tensor | None = None  # calibrated range per unit
        self.bins = int(self.full_scale.max()) + 1
        self.seen = torch.zeros(self.units, self.bins, dtype=torch.int64)  # |partial sum| histogram per unit
        self.peak = torch.zeros(self.units)  # the largest |partial sum| per unit (clip 100 needs only this)
        self.calibrating = False

    def _units(self, cout_g: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """ADC range unit of every column [T, G, K, cout_g] and reference column [T, G, K], and their count."""
        p, k, rule = self.plan, self.k, self.adc.range
        t, g = p.tiles, p.groups
        if rule == "per_column":
            n = t * g * k * cout_g
            return torch.arange(n).view(t, g, k, cout_g), n + torch.arange(t * g * k).view(t, g, k), n + t * g * k
        if rule == "per_crossbar":
            xb = p.crossbar.reshape(t, g, cout_g)
            return (xb.unsqueeze(2).expand(t, g, k, cout_g), xb[:, :, :1].expand(t, g, k),
                    int(p.crossbar.max()) + 1)
        return torch.zeros(t, g, k, cout_g, dtype=torch.int64), torch.zeros(t, g, k, dtype=torch.int64), 1

    def _conv_weight(self, g: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """[T * G * (K * cout_g + refs + 1), width, kh, kw]: per (tile, group) the K slices of its outputs,
        the reference columns (offset_ref), then ones."""
        p, k = self.plan, self.k
        cout_g = p.cout // p.groups
        cells = g[:, p.slot.reshape(-1)].reshape(p.cout, p.tiles, p.width, p.kernel, k)
        cells = cells.permute(1, 0, 4, 2, 3) * p.mask.unsqueeze(2)  # [T, Cout, K, width, kernel]
        cells = cells.reshape(p.tiles, p.groups, cout_g, k, p.width, p.kernel).transpose(2, 3)
        cells = cells.reshape(p.tiles, p.groups, k * cout_g, p.width, p.kernel)
        ones = p.mask.reshape(p.tiles, p.groups, cout_g, p.width, p.kernel).amax(2, keepdim=True)
        parts = [cells] + ([reference.float() * ones] if self.refs else []) + [ones]
        w = torch.cat(parts, 2)
        kh, kw = p.shape[2:] if len(p.shape) == 4 else (1, 1)
        return w.reshape(-1, p.width, kh, kw).contiguous()

    def steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ADC steps of the columns [T, G, K, cout_g] and of the reference columns [T, G, K]."""
        top = self.adc.top_code
        if self.adc.calibrated and self.ranges is not None:
            return adc_step(self.ranges[self.unit], top), adc_step(self.ranges[self.ref_unit], top)
        fs = self.full_scale.view(-1, 1, 1)
        return (adc_step(fs.unsqueeze(-1).expand(self.unit.shape), top),
                adc_step(fs.expand(self.ref_unit.shape), top))

    def start_calibration(self) -> None:
        self.calibrating, self.seen, self.peak = True, torch.zeros_like(self.seen), torch.zeros_like(self.peak)

    def finish_calibration(self) -> None:
        """Every calibrated ADC's range from the |partial sums| its unit saw (xbar.chip.adc.clip_ranges)."""
        self.calibrating = False
        if self.adc.clip == 100:  # the largest seen, rounded to a level: what the histogram's 100th percentile gives
            self.ranges = self.peak.round().clamp(1, self.bins - 1)
        else:
            self.ranges = clip_ranges(self.seen, self.adc.clip, self.adc.top_code)

    def _record(self, values: torch.Tensor, unit: torch.Tensor) -> None:
        """Add the |partial sums| `values` [n, *unit shape, P] of units `unit` to the histogram (or the peak)."""
        if self.adc.clip == 100:
            top = values.abs().amax(0).amax(-1)  # over images and positions
            self.peak.scatter_reduce_(0, unit.reshape(-1), top.reshape(-1), "amax")
            return
        v = values.abs().round().clamp_max(self.bins - 1).long()
        idx = (unit.unsqueeze(0).unsqueeze(-1) * self.bins + v).flatten()
        self.seen += torch.bincount(idx, minlength=self.units * self.bins).view(self.units, self.bins)

    def __call__(self, codes: torch.Tensor, act_bits: int, conv_args: tuple | None) -> torch.Tensor:
        """Integer-domain output sum_t m_t * sum_rows w * code, [N, Cout, (Ho, Wo)], for input codes."""
        p = self.plan
        x = codes.to(torch.int32)
        x = x.reshape(*x.shape, 1, 1) if conv_args is None else x
        stride, padding, dilation, _ = conv_args or (1, 0, 1, 1)
        x = x.index_select(1, p.gather)
        cout_g = p.cout // p.groups
        per_image = p.tiles * p.groups * (self.k * cout_g + self.refs + 1) * self._positions(x, stride, padding,
                                                                                            dilation)
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

    def _noise(self, psum: torch.Tensor, pop: torch.Tensor, arrays: int) -> None:
        """Read noise, in place: a column sum of n driven cells gets N(0, n * read_sigma**2) per array."""
        noise = torch.randn(psum.shape, generator=self.generator)
        psum.add_(noise.mul_(self.read_sigma * (arrays * pop).sqrt()))

    def _run(self, x: torch.Tensor, act_bits: int, stride, padding, dilation) -> torch.Tensor:  # noqa: ANN001
        p, k, n, r = self.plan, self.k, len(x), self.refs
        cout_g = p.cout // p.groups
        top = self.adc.top_code
        lowest = 0 if self.adc.signed != "differential" else -top
        exact = self.calibrating or self.exact_adc()
        step, ref_step = self.steps()  # [T, G, K, cout_g], [T, G, K]
        step, ref_step = step.unsqueeze(-1), ref_step.unsqueeze(-1)  # broadcast over positions
        # the shift-adder's weight of slice s: B**(K-1-s), times the ADC step (codes -> partial sums)
        slice_w = self.base ** torch.arange(k - 1, -1, -1, dtype=torch.float32)
        col_w = slice_w.view(1, 1, k, 1, 1) * (1.0 if exact else step)
        ref_w = slice_w.view(1, 1, k, 1) * (1.0 if exact else ref_step)
        acc = ones = ref_acc = None
        for j in range(act_bits):  # input cycles, LSB first
            bits = torch.bitwise_right_shift(x, j).bitwise_and_(1).float()
            out = F.conv2d(bits, self.weight, None, stride, padding, dilation, p.tiles * p.groups)
            hw = out.shape[2:]
            out = out.reshape(n, p.tiles, p.groups, k * cout_g + r + 1, -1)
            psum = out[:, :, :, : k * cout_g].unflatten(3, (k, cout_g))  # a view: ops below work in place
            ref = out[:, :, :, k * cout_g: k * cout_g + r]  # [n, T, G, K, P]: reference columns (offset_ref)
            pop = out[:, :, :, k * cout_g + r:]  # [n, T, G, 1, P]: driven rows of the tile (digital popcount)
            if self.read_sigma:
                self._noise(psum, pop.unsqueeze(3), self.arrays)
                if r:
                    self._noise(ref, pop, 1)
            if self.calibrating:
                self._record(psum, self.unit)
                if r:
                    self._record(ref, self.ref_unit)
            elif not exact:  # the ADC: codes
                psum.div_(step).round_().clamp_(lowest, top)
                if r:
                    ref.div_(ref_step).round_().clamp_(lowest, top)
            if acc is None:
                acc, ones = torch.zeros(psum[:, :, :, 0].shape), torch.zeros(pop.shape)
                ref_acc = torch.zeros(ref[:, :, :, :1].shape)
            for s in range(k):  # shift-add: slice and cycle significance
                acc.addcmul_(psum[:, :, :, s], col_w[:, :, s] * 2.0**j)
                if r:
                    ref_acc.addcmul_(ref[:, :, :, s: s + 1], ref_w[:, :, s: s + 1] * 2.0**j)
            ones.add_(pop, alpha=2.0**j)  # the sum of the input codes, digital
        if self.gain != 1.0:  # global drift compensation, on the digitized sums
            acc.mul_(self.gain)
            ref_acc.mul_(self.gain)  # (empty unless offset_ref)
        if self.offset:
            acc.sub_(ones, alpha=self.offset)
        if r:
            acc.sub_(ref_acc)  # the reference's digitized sum, after the ADC (NeuroSim)
        y = torch.einsum("ntgop,tgo->ngop", acc, self.mask)  # the column mask, then the row tiles
        return y.reshape(n, p.cout, *hw)

    def exact_adc(self) -> bool:
        """The ADC reads every possible partial sum exactly: integer cells, no read noise, every step a level
        or a power-of-two fraction of one (xbar.chip.adc), and every range covering the column's full scale."""
        if self.read_sigma or not self.integer_cells:
            return False
        step, ref_step = self.steps()
        top = self.adc.top_code
        fs = self.full_scale.view(-1, 1, 1)
        return bool((step <= 1).all() and (ref_step <= 1).all() and (step * top >= fs.unsqueeze(-1)).all()
                    and (ref_step * top >= fs).all())
