"""Crossbar mapping: hand-computed counts, index tensors vs tables, offset cell encoding, the stage.

Default spec: 72x72 crossbars, 2-bit cells, 4-bit weights -> 2 cells per weight,
36 outputs per crossbar; G = 72 // (kh*kw) input channels per row tile.
"""

import math

import pytest
import torch
from torch import nn

from xbar.crossbar import CrossbarSpec, map_layers, map_model, mapped_layers
from xbar.errors import UserError

SPEC = CrossbarSpec()

# (description, weight shape, groups, row tiles, crossbars, columns, rows used summed over crossbars)
# Derivations: crossbars = row tiles x column tiles; columns = out_channels x row tiles per group.
CASES = [
    # 3x3, 64->64: G = 8 -> 8 row tiles of 72 rows; 64 outputs -> 2 column tiles (36 + 28)
    ("3x3", (64, 64, 3, 3), 1, 8, 16, 512, 8 * 72 * 2),
    # 3x3, 20->50: G = 8 -> tiles of 8, 8, 4 channels (72, 72, 36 rows); 50 outputs -> 36 + 14
    ("3x3 partial", (50, 20, 3, 3), 1, 3, 6, 150, (72 + 72 + 36) * 2),
    # 1x1, 256->64: G = 72 -> 72, 72, 72, 40 rows; 2 column tiles
    ("1x1", (64, 256, 1, 1), 1, 4, 8, 256, 256 * 2),
    # 7x7, 3->64 (a ResNet stem): 49 positions -> G = 1 -> 3 row tiles of 49 rows
    ("7x7", (64, 3, 7, 7), 1, 3, 6, 192, 3 * 49 * 2),
    # 11x11, 3->64 (AlexNet): 121 > 72 positions -> each channel splits into 72 + 49 rows
    ("11x11", (64, 3, 11, 11), 1, 6, 12, 384, 3 * 121 * 2),
    # grouped 3x3, 64->64 in 4 groups: 16 in-channels x 9 = 144 rows > 72 -> each group maps
    # like a dense conv: 2 row tiles x 1 column tile (16 outputs), 4 groups
    ("grouped", (64, 16, 3, 3), 4, 8, 8, 128, 4 * 144),
    # grouped 3x3, 128->128 in 32 groups (ResNeXt): a group is 4x9 = 36 rows, 4 outputs ->
    # min(72 // 36, 36 // 4) = 2 groups per crossbar, block-diagonal -> 16 crossbars
    ("grouped packed", (128, 4, 3, 3), 32, 16, 16, 128, 32 * 36),
    # depthwise 3x3, 64 channels: 9 rows, 1 output per group -> 8 channels per crossbar
    ("depthwise", (64, 1, 3, 3), 64, 8, 8, 64, 64 * 9),
    # depthwise 5x5, 10 channels: 25 rows -> 2 channels per crossbar -> 5 crossbars
    ("depthwise 5x5", (10, 1, 5, 5), 10, 5, 5, 10, 10 * 25),
    # linear 512->100: a 1x1 conv: 8 row tiles (7 x 72 + 8), 3 column tiles (36, 36, 28)
    ("linear", (100, 512), 1, 8, 24, 800, 512 * 3),
]


def _one(shape, groups, spec=SPEC):
    kind = "linear" if len(shape) == 2 else "conv"
    return map_layers([("layer", kind, shape, groups)], spec)


@pytest.mark.parametrize("desc,shape,groups,row_tiles,crossbars,columns,rows_used", CASES, ids=[c[0] for c in CASES])
def test_hand_computed_counts(desc, shape, groups, row_tiles, crossbars, columns, rows_used):
    m = _one(shape, groups)
    lm = m.layers[0]
    assert (lm.n_row_tiles, lm.n_crossbars, lm.n_columns) == (row_tiles, crossbars, columns)
    assert lm.n_pes == crossbars and m.n_pes == crossbars
    table = m.crossbar_table()
    assert table["rows_used"].sum() == rows_used
    assert table["rows_used"].max() <= SPEC.rows and table["cols_used"].max() <= SPEC.cols
    assert table["weights"].sum() == math.prod(shape)  # every weight sits in exactly one crossbar
    assert table["cells_used"].sum() == 2 * math.prod(shape)
    assert table["columns"].sum() == columns
    layers = m.layer_table()
    assert layers["columns"].item() == columns and layers["crossbars"].item() == crossbars
    assert layers["utilization"].item() == pytest.approx(2 * math.prod(shape) / (crossbars * 72 * 72))


def test_stride_and_padding_do_not_change_the_mapping():
    plain = map_model(nn.Sequential(nn.Conv2d(32, 48, 3)), SPEC).layer_table()
    strided = map_model(nn.Sequential(nn.Conv2d(32, 48, 3, stride=2, padding=1)), SPEC).layer_table()
    assert plain.equals(strided)


def test_one_weight_by_hand():
    # 3x3 64->64, weight [o=40, c=17, 1, 2]: row tile 17 // 8 = 2, column = 2 * 64 + 40 = 168,
    # crossbar = row tile 2 x 2 column tiles + 40 // 36 = 5
    column, pe = _one((64, 64, 3, 3), 1).layers[0].index_tensors()
    assert column[40, 17, 1, 2] == 168 and pe[40, 17, 1, 2] == 5
    # 11x11: channel 1, position 100 (second part of the split) -> row tile 1 * 2 + 1 = 3
    column, pe = _one((64, 3, 11, 11), 1).layers[0].index_tensors()
    assert column[5, 1, 100 // 11, 100 % 11] == 3 * 64 + 5 and pe[5, 1, 100 // 11, 100 % 11] == 3 * 2
    # depthwise: channel 19 sits in crossbar 19 // 8 = 2, column 19
    column, pe = _one((64, 1, 3, 3), 64).layers[0].index_tensors()
    assert column[19].unique().tolist() == [19] and pe[19].unique().tolist() == [2]


@pytest.mark.parametrize("cpp", [1, 2, 3])
@pytest.mark.parametrize("desc,shape,groups", [(c[0], c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_index_tensors_agree_with_the_tables(desc, shape, groups, cpp):
    spec = CrossbarSpec(crossbars_per_pe=cpp)
    # a first layer offsets the global PE numbers: index tensors must include it
    m = map_layers([("before", "conv", (10, 3, 3, 3), 1), ("layer", "linear" if len(shape) == 2 else "conv",
                                                            shape, groups)], spec)
    lm = m.layer("layer")
    column, pe = lm.index_tensors()
    assert column.shape == pe.shape == lm.shape
    assert torch.equal(column.unique(), torch.arange(lm.n_columns))
    assert pe.min() == lm.first_pe and pe.max() == lm.first_pe + lm.n_pes - 1
    table = m.pe_table().filter(layer="layer")
    counts = torch.bincount(pe.flatten() - lm.first_pe, minlength=lm.n_pes)
    assert counts.tolist() == table["weights"].to_list()
    cols_per_pe = [len(column[pe == p].unique()) for p in range(lm.first_pe, lm.first_pe + lm.n_pes)]
    assert cols_per_pe == table["columns"].to_list()
    assert all(c <= cpp * spec.outputs_per_crossbar for c in cols_per_pe)
    # a column never straddles two PEs (the shift-adder of one PE applies its mask)
    col_pe = torch.stack([column.flatten(), pe.flatten()], 1).unique(dim=0)
    assert len(col_pe) == lm.n_columns
    assert torch.equal(m.pe_counts()[1][lm.first_pe:lm.first_pe + lm.n_pes], counts)


def test_index_tensors_are_the_placements_compact_tensors_built_once():
    # ResNet-50's 23.5 M weights: per-weight indices in int64 cost hundreds of MB; the placement's are
    # int16 where they fit and every caller shares them (no converted copy)
    lm = _one((512, 512, 3, 3), 1).layers[0]
    column, pe = lm.index_tensors()
    assert column.dtype == pe.dtype == torch.int16
    again = lm.index_tensors()
    assert again[0] is column and again[1] is pe and lm.placement.column is column
    wide = map_layers([("a", "conv", (64, 8, 3, 3), 1), ("b", "conv", (40000, 1, 1, 1), 1)], SPEC).layers[1]
    assert wide.n_columns > 2**15 and wide.index_tensors()[0].dtype == torch.int32


@pytest.mark.parametrize("desc,shape,groups", [(c[0], c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_every_weight_lies_in_its_crossbars_row_and_output_range(desc, shape, groups):
    m = _one(shape, groups)
    lm = m.layers[0]
    _, pe = lm.index_tensors()  # one crossbar per PE here: pe == crossbar
    cout, cin_g, k = lm.out_channels, lm.cin_per_group, lm.kernel
    o = torch.arange(cout).view(-1, 1, 1).expand(cout, cin_g, k)
    c = torch.arange(cin_g).view(1, -1, 1).expand(cout, cin_g, k)
    p = torch.arange(k).view(1, 1, -1).expand(cout, cin_g, k)
    group = o // (cout // groups)
    row = (group * cin_g + c) * k + p  # row of the unrolled [Cin*kh*kw, Cout] matrix
    table = m.crossbar_table()
    xb = pe.reshape(cout, cin_g, k).long()  # index ops want int64 (the placement stores int16)
    start, used = table["row_start"].to_torch()[xb], table["rows_used"].to_torch()[xb]
    ostart, ocount = table["out_start"].to_torch()[xb], table["columns"].to_torch()[xb]
    assert bool(((row >= start) & (row < start + used)).all())
    assert bool(((o >= ostart) & (o < ostart + ocount)).all())


PLACED = [("3x3", (40, 16, 3, 3), 1), ("1x1", (40, 100, 1, 1), 1), ("7x7", (20, 3, 7, 7), 1),
          ("11x11", (6, 2, 11, 11), 1), ("grouped", (24, 16, 3, 3), 2), ("grouped packed", (16, 4, 3, 3), 4),
          ("depthwise", (20, 1, 3, 3), 20), ("linear", (40, 80), 1)]


@pytest.mark.parametrize("spec", [CrossbarSpec(), CrossbarSpec(rows=36, cols=16, crossbars_per_pe=3),
                                  CrossbarSpec(cell_bits=1, weight_bits=4, crossbars_per_pe=2)])
def test_placement_agrees_with_a_brute_force_search_of_the_crossbar_table(spec):
    """Every weight, one by one: the crossbar whose row and output ranges hold it (the crossbar table)
    gives its PE, row and physical columns; its column is its row tile within its group x Cout + output.
    No two cells share a (crossbar, row, physical column)."""
    m = map_layers([(d, "linear" if len(s) == 2 else "conv", s, g) for d, s, g in PLACED], spec)
    table = m.crossbar_table().to_dicts()
    taken = set()
    for lm in m.layers:
        p = lm.placement
        assert all(t.dtype in (torch.int16, torch.int32) for t in (p.crossbar, p.pe, p.row, p.column, p.bit_column))
        cout, cin_g, k = lm.out_channels, lm.cin_per_group, lm.kernel
        crossbar, pe, row, bit_column, column = (t.reshape(cout, cin_g, k).tolist()
                                                 for t in (p.crossbar, p.pe, p.row, p.bit_column, p.column))
        rows = [x for x in table if x["layer"] == lm.name]
        tiles_per_group = lm.n_row_tiles // (1 if lm.packed else lm.groups)
        for o in range(cout):
            g = o // (cout // lm.groups)
            for c in range(cin_g):
                for pos in range(k):
                    r = (g * cin_g + c) * k + pos  # row of the unrolled [Cin*kh*kw, Cout] matrix
                    hits = [x for x in rows if x["row_start"] <= r < x["row_start"] + x["rows_used"]
                            and x["out_start"] <= o < x["out_start"] + x["columns"]]
                    assert len(hits) == 1
                    xb = hits[0]
                    assert lm.first_crossbar + crossbar[o][c][pos] == xb["crossbar"] and pe[o][c][pos] == xb["pe"]
                    assert row[o][c][pos] == r - xb["row_start"]
                    assert bit_column[o][c][pos] == (o - xb["out_start"]) * spec.cells_per_weight
                    tile = 0 if lm.packed else xb["row_tile"] - g * tiles_per_group
                    assert column[o][c][pos] == tile * cout + o
                    for s in range(spec.cells_per_weight):
                        cell = (xb["crossbar"], row[o][c][pos], bit_column[o][c][pos] + s)
                        assert cell not in taken and cell[1] < spec.rows and cell[2] < spec.cols
                        taken.add(cell)
        # the columns' own figures: crossbar, PE and weights of each column
        for col in range(lm.n_columns):
            inside = p.column == col
            assert p.crossbar[inside].unique().tolist() == [int(p.column_crossbar[col])]
            assert p.pe[inside].unique().tolist() == [int(p.column_pe[col])]
            assert int(inside.sum()) == int(p.column_weights[col])
    assert len(taken) == m.n_cells_used


def test_pes_never_span_layers_and_are_numbered_in_order():
    spec = CrossbarSpec(crossbars_per_pe=2)
    # 3 crossbars each (3x3 20->30: 3 row tiles x 1 column tile) -> 2 PEs each, the last half empty
    m = map_layers([("a", "conv", (30, 20, 3, 3), 1), ("b", "conv", (30, 20, 3, 3), 1)], spec)
    assert [(lm.first_pe, lm.n_pes, lm.first_crossbar) for lm in m.layers] == [(0, 2, 0), (2, 2, 3)]
    pes = m.pe_table()
    assert pes["crossbars"].to_list() == [2, 1, 2, 1]
    assert pes["utilization"][1] == pytest.approx(30 * 36 * 2 / (2 * 72 * 72))


def test_cell_offset_encoding_round_trip():
    levels = torch.arange(-7, 8)
    cells = SPEC.cell_levels(levels)
    assert cells.shape == (15, 2) and cells.dtype == torch.uint8 and cells.max() <= 3
    # hand-computed: u = w + 7 in base 4, most significant cell first
    assert cells[0].tolist() == [0, 0] and cells[7].tolist() == [1, 3] and cells[14].tolist() == [3, 2]
    assert torch.equal(SPEC.weight_from_cells(cells), levels)
    w = torch.randint(-7, 8, (5, 3, 3, 3))
    assert torch.equal(SPEC.weight_from_cells(SPEC.cell_levels(w)), w)
    # 1-bit cells: 4 binary cells per weight; 4-bit cells: one cell holds u in [0, 14]
    one = CrossbarSpec(cell_bits=1)
    assert one.cell_levels(torch.tensor([3])).tolist() == [[1, 0, 1, 0]]  # 3 + 7 = 10 = 0b1010
    assert torch.equal(one.weight_from_cells(one.cell_levels(levels)), levels)
    assert CrossbarSpec(cell_bits=4).cell_levels(levels).flatten().tolist() == list(range(15))
    with pytest.raises(ValueError):
        SPEC.cell_levels(torch.tensor([8]))


@pytest.mark.parametrize("kwargs", [dict(rows=0), dict(cols=-1), dict(cell_bits=3), dict(cols=1),
                                    dict(crossbars_per_pe=0), dict(weight_bits=1, cell_bits=1)])
def test_bad_spec_is_a_user_error(kwargs):
    """A spec is built from CrossbarParams, which checks the numbers once."""
    from xbar.params import CrossbarParams, check_value

    with pytest.raises(UserError):
        CrossbarSpec.from_params(check_value(CrossbarParams, kwargs, "crossbar"))
    assert CrossbarSpec.from_params(check_value(CrossbarParams, {"rows": 36}, "crossbar")) == CrossbarSpec(rows=36)


def test_mapped_layers_exclude_the_head():
    from xbar.models import build_model
    from xbar.params import ModelParams

    model = build_model(ModelParams(), num_classes=10)
    names = [n for n, _ in mapped_layers(model)]
    assert "head" not in names and names[0] == "stem.0" and len(names) == 21
    m = map_model(model, SPEC)
    assert [lm.name for lm in m.layers] == names
    with pytest.raises(KeyError):
        m.layer("head")


def test_deploy_backbone_stage_writes_the_mapping_tables(tmp_path, monkeypatch):
    import json

    import polars as pl

    from stages.deploy_backbone import run
    from workflow.io import save_torch
    from xbar.models import build_model
    from xbar.params import parse_params
    from xbar.quant import export_levels, quantize_model

    monkeypatch.chdir(tmp_path)
    params = parse_params({"source": {"dataset": "mnist5k"}, "model": {"width": 8, "blocks": 1}})
    net = quantize_model(build_model(params.model, 10, 1))
    mapped = {lm.name for lm in map_model(net, SPEC).layers}
    save_torch(tmp_path / "artifacts/backbone/levels.pt", {k: v for k, v in export_levels(net).items() if k in mapped})
    run(params)
    crossbars = pl.read_parquet(tmp_path / "artifacts/mapping/crossbars.parquet")
    layers = pl.read_parquet(tmp_path / "artifacts/mapping/layers.parquet")
    metrics = json.loads((tmp_path / "metrics/map.json").read_text())
    weights = sum(m.weight.numel() for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    assert crossbars["weights"].sum() == layers["weights"].sum() == metrics["weights"] == weights
    assert metrics["crossbars"] == len(crossbars) and metrics["pes"] == crossbars["pe"].n_unique()
    assert metrics["columns"] == layers["columns"].sum()
    assert 0 < metrics["mean_utilization"] <= 1

