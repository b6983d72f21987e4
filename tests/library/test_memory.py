"""Mask-memory accounting, the paper's ResNet-50 check, and the `xbar memory` command."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xbar.cli import app
from xbar.crossbar import CrossbarSpec, map_layers, spare_pe_count
from xbar.errors import UserError
from xbar.memory import build_named_model, column_mask_bytes, memory_report, named_model_report, task_storage

SPEC = CrossbarSpec()  # 72x72, 2-bit cells, 4-bit weights


def test_column_mask_bytes_by_hand():
    # 512 columns of K values; packed: 3 codes together, ceil(512 / 3) = 171 groups
    assert column_mask_bytes(512, 2, packed=False) == 512 // 8  # binary: 1 bit each
    assert column_mask_bytes(512, 2, packed=True) == math.ceil(171 * 3 / 8)  # 2**3 = 8 codes: 3 bits per group
    assert column_mask_bytes(512, 3, packed=False) == 1024 // 8  # 3 values: 2 bits
    assert column_mask_bytes(512, 3, packed=True) == math.ceil(171 * 5 / 8)  # 3**3 = 27 <= 2**5
    assert column_mask_bytes(512, 5, packed=False) == 1536 // 8  # 5 values: 3 bits
    assert column_mask_bytes(512, 5, packed=True) == math.ceil(171 * 7 / 8)  # the paper's 3 in 7 bits: 125 <= 128
    assert column_mask_bytes(512, 1, packed=True) == column_mask_bytes(512, 1, packed=False) == 0  # no mask


def test_report_of_one_layer_by_hand():
    # 3x3 64->64: 16 crossbars (8 row tiles x 2 column tiles), 512 columns; PE 0 = row tile 0,
    # outputs 0..35: 72 x 36 = 2592 weights, 36 columns
    m = map_layers([("conv", "conv", (64, 64, 3, 3), 1)], SPEC)
    r = memory_report(m, shift_levels=3, head_params=650, bn_params=128, spare_pes=[0])
    assert r.piggyback_bytes == 64 * 64 * 9 // 8 == 4608
    assert r.column_binary_bytes == 512 // 8
    assert r.column_shift_bytes == 512 * 3 // 8
    assert r.column_shift_packed_bytes == math.ceil(171 * 7 / 8)  # 3 columns per 7 bits
    assert r.spare_pes == 1 and r.spare_pe_weights == 2592
    assert r.xma2_spare_weight_bytes == 2592 * 4 // 8
    assert r.xma2_column_shift_bytes == math.ceil(math.ceil(476 / 3) * 7 / 8)  # frozen: 512 - 36 columns
    assert r.xma2_pe_mask_bytes == 2  # 16 PEs, one bit each
    assert (r.head_bytes, r.bn_bytes) == (650 * 4, 128 * 4)
    assert r.xma2_bytes == 2 + r.xma2_column_shift_bytes + 1296 + 2600 + 512
    with pytest.raises(UserError):
        memory_report(m, spare_pes=[16])


@pytest.mark.parametrize("bn", ["frozen", "per_task"])
def test_all_in_task_storage_by_hand(bn):
    """One definition for every method: masks + re-programmed cells + per-task BN + head (same layer as above)."""
    m = map_layers([("conv", "conv", (64, 64, 3, 3), 1)], SPEC)
    own = 128 * 4 if bn == "per_task" else 0  # 64 channels x (scale, shift), fp32; frozen: the backbone's
    def total(method):
        return task_storage(method, m, spare_pes=[0], bn_rule=bn, head_params=650, bn_params=128).total
    assert total("piggyback") == 4608 + own + 2600
    assert total("xbm") == math.ceil(171 * 3 / 8) + own + 2600  # packed: 3 binary codes in 3 bits
    assert total("xma") == math.ceil(171 * 7 / 8) + own + 2600
    assert total("xma2") == 2 + math.ceil(math.ceil(476 / 3) * 7 / 8) + 2592 * 4 // 8 + own + 2600
    # a fine-tune rewrites every weight and always has its own BN, whatever train.bn says
    assert total("finetune_separate") == 64 * 64 * 9 * 4 // 8 + 128 * 4 + 2600
    report = memory_report(m, head_params=650, bn_params=128, spare_pes=[0], bn_rule=bn)
    assert report.per_task_bytes["xma2"] == total("xma2")
    assert report.per_task_bytes_unpacked["xma"] == 512 * 3 // 8 + own + 2600


def test_spare_estimate_is_an_upper_bound():
    # 3x3 20->50: crossbars hold 72x36, 72x14, 72x36, 72x14, 36x36, 36x14 weights
    m = map_layers([("conv", "conv", (50, 20, 3, 3), 1)], SPEC)
    assert spare_pe_count(0.1, 6) == 1 and spare_pe_count(0.5, 6) == 3 and spare_pe_count(0.0, 6) == 0
    assert spare_pe_count(0.1, 130) == 13 and spare_pe_count(1e-6, 130) == 1  # float rounding; any share > 0
    r = memory_report(m, spare_ratio=0.5)  # the 3 fullest: 72x36, 72x36, 36x36
    assert r.spare_pes == 3 and r.spare_pe_weights == 72 * 36 * 2 + 36 * 36


def test_paper_resnet50_mask_memory():
    """The paper: ResNet-50 on 72x72 crossbars, 2-bit cells, 4-bit weights, 3 shift levels."""
    mapping, r = named_model_report("resnet50", SPEC, shift_levels=3)
    model = build_named_model("resnet50")
    # conv weights independently: every parameter minus the fc and the BN scales/shifts
    total = sum(p.numel() for p in model.parameters())
    bn = sum(p.numel() for n, p in model.named_parameters() if ".bn" in n or "downsample.1" in n or n.startswith("bn1"))
    conv = total - model.head.weight.numel() - model.head.bias.numel() - bn
    assert r.conv_weights == r.weights == conv and 23.4e6 < conv < 23.5e6
    # columns independently: out_channels x ceil(in_channels / G), G = 72 // (kh*kw), no grouped conv
    columns = sum(m.out_channels * math.ceil(m.in_channels / (72 // (m.kernel_size[0] * m.kernel_size[1])))
                  for n, m in model.named_modules() if type(m).__name__ == "Conv2d")
    assert r.columns == columns
    assert r.piggyback_bytes == math.ceil(conv / 8) and 2.85e6 < r.piggyback_bytes < 2.95e6  # paper: 2.88 MB
    assert 38e3 < r.column_binary_bytes < 45e3  # paper: about 40 KB
    assert r.column_shift_packed_bytes < 100e3  # paper: under 100 KB ...
    assert r.column_shift_packed_bytes / r.piggyback_bytes <= 0.035  # ... 3.4% of Piggyback
    assert r.column_shift_bytes == math.ceil(columns * 3 / 8)  # unpacked: 3 bits for 5 values


def test_efficientnet_lite0_is_accounted_by_name():
    """`--model efficientnet_lite0`: xbar's own EfficientNet, every conv mapped (depthwise included), its
    1280 x 1000 ImageNet classifier as the head; counted against the network built for real."""
    from xbar.models import build_model
    from xbar.params import ModelParams

    mapping, r = named_model_report("efficientnet_lite0", SPEC)
    net = build_model(ModelParams(name="efficientnet_lite0"), num_classes=1000, in_channels=3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert r.weights == sum(m.weight.numel() for m in convs)
    assert {lm.name for lm in mapping.layers} >= {"_blocks.3._depthwise_conv", "_conv_stem", "_conv_head"}
    assert r.head_params == 1280 * 1000 + 1000


def test_cli_json_and_table():
    runner = CliRunner()
    result = runner.invoke(app, ["memory", "--model", "small_resnet", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in ("conv_weights", "crossbars", "pes", "columns", "piggyback_bytes", "column_binary_bytes",
                "column_shift_bytes", "column_shift_packed_bytes"):
        assert isinstance(out[key], int), key
    assert out["piggyback_bytes"] == math.ceil(out["conv_weights"] / 8)
    assert out["column_binary_bytes"] == math.ceil(out["columns"] / 8)
    wider = json.loads(runner.invoke(app, ["memory", "--model", "small_resnet", "--json", "--rows", "144"]).stdout)
    assert wider["crossbars"] < out["crossbars"] and wider["conv_weights"] == out["conv_weights"]
    table = runner.invoke(app, ["memory", "--model", "small_resnet"])
    assert table.exit_code == 0 and "Piggyback" in table.stdout
    assert all(method in table.stdout for method in out["per_task_bytes"])  # one row per registered method
    per_task = json.loads(runner.invoke(app, ["memory", "--model", "small_resnet", "--json", "--bn", "per_task"]).stdout)
    assert per_task["per_task_bytes"]["xma"] - out["per_task_bytes"]["xma"] == math.ceil(out["bn_params"] * 32 / 8)


@pytest.mark.parametrize("args", [["--rows", "0"], ["--cell-bits", "3"], ["--spare-ratio", "2"],
                                  ["--shift-levels", "-1"], ["--model", "no_such_net"], ["--bn", "sometimes"],
                                  ["--classes", "0"], ["--signed", "twos"], ["--signed", "differential", "--cols", "3"]])
def test_cli_bad_input_is_one_line_exit_2(args):
    argv = ["memory", "--json"] + (args if "--model" in args else ["--model", "small_resnet"] + args)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output


def test_cli_entry_point_subprocess():
    exe = shutil.which("xbar", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the xbar entry point is not installed in this environment")
    bad = subprocess.run([exe, "memory", "--model", "resnet50", "--cell-bits", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    ok = subprocess.run([exe, "memory", "--model", "small_resnet", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["pes"] >= 100


def test_signed_schemes_set_the_cells_and_crossbars_of_xbar_memory():
    """differential: twice the cells, 18 outputs per 72-column crossbar; offset_ref: 35 outputs (2 reference
    columns); the mask bytes of a column follow the columns, which do not change."""
    runner = CliRunner()
    out = {s: json.loads(runner.invoke(app, ["memory", "--model", "small_resnet", "--json", "--signed", s]).stdout)
           for s in ("offset", "offset_ref", "differential")}
    assert out["differential"]["cells"] == 2 * out["offset"]["cells"] == 2 * out["offset_ref"]["cells"]
    assert out["offset"]["crossbars"] <= out["offset_ref"]["crossbars"] < out["differential"]["crossbars"]
    assert out["offset"]["columns"] == out["differential"]["columns"] == out["offset_ref"]["columns"]
    assert all(o["signed"] == s for s, o in out.items())
