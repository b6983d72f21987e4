"""An independent reference for the calibrated chip forward, written from the definitions in plain numpy
(none of xbar's encoding, placement or ADC code): every signed scheme and ADC range rule, percentile and
MSE clips, exact and noisy cells, one conv layer over two row tiles and several column tiles."""

import zlib

import numpy as np
import pytest
import torch

from xbar.chip.forward import AdcConfig, ChipLayer, LayerPlan
from xbar.chip.instance import LayerCells
from xbar.crossbar import CrossbarSpec, map_layers

ROWS, COLS, B, L, BITS = 18, 8, 4, 7, 4  # 18 rows = 2 channels of a 3x3 kernel per row tile; 2-bit cells
COUT, CIN, KH = 5, 4, 3
RULES = ("full", "per_layer", "per_crossbar", "per_column")


def digits(u):
    """Base-4 digits of u, most significant first: [..., 2]."""
    return np.stack([u // B, u % B], -1)


def stored_cells(w, scheme):
    """[arrays, Cout, Cin*9, 2] cell levels by definition."""
    if scheme == "differential":
        return np.stack([digits(np.maximum(w, 0)), digits(np.maximum(-w, 0))])
    return digits(w + L)[None]


def im2col(x):
    """[N, Cin*9, P] input codes of every 3x3 window (padding 1), row = channel * 9 + kernel position."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = [xp[:, :, i: i + h, j: j + wd].reshape(n, c, -1) for i in range(KH) for j in range(KH)]
    return np.stack(cols, 2).reshape(n, c * KH * KH, -1)


def partial_sums(x, cells, ref):
    """Per cycle j, tile t, output o, slice s: the column's analog sum; and the reference column's."""
    rows = im2col(x)
    tiles = [range(0, 18), range(18, 36)]  # channels (0, 1) and (2, 3)
    out, refs, pop = {}, {}, {}
    for j in range(BITS):
        bit = (rows >> j) & 1  # [N, rows, P]
        for t, r in enumerate(tiles):
            r = list(r)
            pop[j, t] = bit[:, r].sum(1)  # driven rows: the digital popcount
            for o in range(COUT):
                for s in range(2):
                    g = cells[0, o, r, s] - (cells[1, o, r, s] if len(cells) == 2 else 0)
                    out[j, t, o, s] = np.einsum("r,nrp->np", g, bit[:, r])
            for s in range(2):
                refs[j, t, s] = np.einsum("r,nrp->np", ref[t, :, s], bit[:, r])
    return out, refs, pop


def unit_of(rule, t, o, s, scheme):
    """The ADC range unit of a column (o >= 0) or of tile t's reference column (o = None)."""
    per_xbar = {"offset": 4, "offset_ref": 3, "differential": 2}[scheme]  # outputs per crossbar
    if rule == "per_layer":
        return 0
    if rule == "per_crossbar":
        return (t, (o or 0) // per_xbar)  # the reference sits with the tile's first outputs
    return (t, o, s)


def step_of(r, top):
    step = np.float32(r) / np.float32(top)
    return step if step >= 1 else 2.0 ** np.ceil(np.log2(step))


def clip_of(values, clip, top):
    v = np.round(np.abs(np.concatenate([a.ravel() for a in values])))
    if clip != "mse":
        return max(1.0, float(np.percentile(v, clip, method="higher")))
    seen = max(1.0, float(v.max()))
    cands = [seen * k / 64 for k in range(1, 65)]
    errs = []
    for r in cands:
        st = step_of(r, top)
        errs.append(float(((np.clip(np.round(v / st), 0, top) * st - v) ** 2).sum()))
    return cands[int(np.argmin(errs))]


def reference_forward(x, calib, cells, ref, scheme, rule, clip, adc_bits):
    top = 2**adc_bits - 1 if scheme != "differential" else 2 ** (adc_bits - 1) - 1
    lo = 0 if scheme != "differential" else -top
    ranges = {}
    if rule != "full":
        seen = {}
        ps, rs, _ = partial_sums(calib, cells, ref)
        for (j, t, o, s), v in ps.items():
            seen.setdefault(unit_of(rule, t, o, s, scheme), []).append(v)
        if scheme == "offset_ref":
            for (j, t, s), v in rs.items():
                seen.setdefault(unit_of(rule, t, None, s, scheme), []).append(v)
        ranges = {u: clip_of(v, clip, top) for u, v in seen.items()}

    def read(v, unit):  # in float32, as the chip's digital side: a partial sum on a code tie rounds alike
        st = np.float32(step_of(ranges.get(unit, ROWS * 3.0) if rule != "full" else ROWS * 3.0, top))
        return np.clip(np.round(v.astype(np.float32) / st), lo, top).astype(np.float64) * st

    ps, rs, pop = partial_sums(x, cells, ref)
    y = np.zeros((len(x), COUT, x.shape[2] * x.shape[3]))
    for (j, t, o, s), v in ps.items():
        y[:, o] += read(v, unit_of(rule, t, o, s, scheme)) * B ** (1 - s) * 2**j
    for j in range(BITS):
        for t in range(2):
            if scheme == "offset":
                y -= L * pop[j, t][:, None] * 2**j
            if scheme == "offset_ref":
                y -= sum(read(rs[j, t, s], unit_of(rule, t, None, s, scheme)) * B ** (1 - s)
                         for s in range(2))[:, None] * 2**j
    return y.reshape(len(x), COUT, x.shape[2], x.shape[3])


@pytest.mark.parametrize("scheme", ["offset", "offset_ref", "differential"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("clip", "noisy"), [(100.0, False), (90.0, True), ("mse", True)])
def test_calibrated_chip_forward_matches_the_numpy_reference(scheme, rule, clip, noisy):
    rng = np.random.default_rng(zlib.crc32(f"{scheme}/{rule}/{clip}".encode()))
    w = rng.integers(-L, L + 1, (COUT, CIN, KH, KH))
    cells = stored_cells(w.reshape(COUT, -1), scheme).astype(np.float64)
    ref = np.broadcast_to(digits(np.array(L)), (2, 18, 2)).astype(np.float64).copy()  # [tile, row, slice]
    if noisy:  # programming error: cells off their levels (no whole-level rounding anywhere); on a 1/64 grid so
        # that float32 and float64 sum them exactly and a partial sum rounds alike in both
        cells = np.round(np.clip(cells + rng.normal(0, 0.15, cells.shape), 0, 3) * 64) / 64
        ref = np.round(np.clip(ref + rng.normal(0, 0.15, ref.shape), 0, 3) * 64) / 64
    x = rng.integers(0, 2**BITS, (3, CIN, 5, 5))
    calib = rng.integers(0, 2**BITS, (4, CIN, 5, 5))
    want = reference_forward(x, calib, cells, ref, scheme, rule, clip, 5)

    spec = CrossbarSpec(rows=ROWS, cols=COLS, signed=scheme)
    lm = map_layers([("l", "conv", (COUT, CIN, KH, KH), 1)], spec).layers[0]
    levels = torch.tensor(cells, dtype=torch.float32).reshape(len(cells), COUT, CIN, KH, KH, 2)
    plan = LayerPlan(lm)
    # xbar's reference cells: [tile, group, slice, channel slot, kernel position]
    reference = torch.tensor(ref, dtype=torch.float32).reshape(2, 1, 2, KH * KH, 2).permute(0, 1, 4, 2, 3)
    chip = ChipLayer(plan, LayerCells(levels), AdcConfig(5, rule, scheme, clip), 2, L,
                     reference=reference if scheme == "offset_ref" else None)
    if rule != "full":
        chip.start_calibration()
        chip(torch.tensor(calib, dtype=torch.float32), BITS, (1, 1, 1, 1))
        chip.finish_calibration()
    got = chip(torch.tensor(x, dtype=torch.float32), BITS, (1, 1, 1, 1)).double().numpy()
    assert np.allclose(got, want, atol=1e-3 * np.abs(want).max()), np.abs(got - want).max()
    if rule == "full":  # and the 5-bit ADC is not a no-op here: it differs from the exact sums
        exact = reference_forward(x, calib, cells, ref, scheme, "full", 100.0, 16)
        assert not np.allclose(want, exact, atol=1e-3)
