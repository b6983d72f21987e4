import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from project import ROOT, tiny_params
from tiny_backbone import random_task
from xbar.errors import UserError
from xbar.methods import (build_task_model, check_spec, export_task, load_task_model, mask_report,
                          trainable_names, train_task)
from xbar.params import TaskSpec
from xbar.training import predict, seed_everything


def model_of(backbone, method: str, spare=None, bn=None):
    params, quant, levels = backbone
    spec = TaskSpec(dataset="optdigits", method=method, epochs=1, bn=bn)
    seed_everything(0)
    return build_task_model(params, spec, quant, levels, 3, spare_pes=spare), spec


def kinds(names: set[str]) -> set[str]:
    """What sort of parameter each trainable is (head, bn, act clip, latent weight, masks)."""
    out = set()
    for n in names:
        if n.startswith("head."):
            out.add("head")
        elif ".column_mask." in n:
            out.add("column_mask")
        elif ".element_mask." in n:
            out.add("element_mask")
        elif n.endswith(".latent"):
            out.add("weights")
        elif ".act_quant." in n:
            out.add("act_clip")
        else:
            out.add("bn")
    return out


@pytest.mark.parametrize(("method", "expected"), [
    ("finetune_separate", {"head", "weights", "act_clip", "bn"}),
    ("finetune_shared", {"head", "weights", "act_clip", "bn"}),
    ("piggyback", {"head", "element_mask"}),
    ("xbm", {"head", "column_mask"}),
    ("xma", {"head", "column_mask"}),
    ("xma2", {"head", "column_mask", "weights"}),
])
@pytest.mark.parametrize("bn", [None, "per_task"])
def test_trainables_per_method(backbone, method, expected, bn):
    """train.bn (default frozen) or a task's `bn`: per-task BN trains the BN affine of every mask method alike."""
    model, _ = model_of(backbone, method, spare=[0, 3] if method == "xma2" else None, bn=bn)
    names = trainable_names(model)
    assert kinds(names) == (expected | {"bn"} if bn == "per_task" else expected)
    layers = model.layers()
    if method == "xma2":  # trainable weights only where a spare PE lives
        with_latent = {n for n, l in layers.items() if l.latent is not None}
        holding = {l.lm.name for l in layers.values() if {0, 3} & set(range(l.lm.first_pe, l.lm.first_pe + l.lm.n_pes))}
        assert with_latent == holding and with_latent
    if method == "xbm":
        assert all(l.column_mask.shift_levels == 0 for l in layers.values())


def test_xma2_export_rebuild_is_exact_and_keeps_the_backbone(pretrained):
    params, quant, levels = pretrained  # trained features: on a random backbone the guard may stop the run
    model, spec = model_of(pretrained, "xma2", spare=[0, 3])
    data = random_task(64)
    train_task(model, data, spec, params.train.model_copy(update={"mask_lr": 0.5}), 0, "t")
    task = export_task(model, 3, 1, "digest")
    assert task["mask_values"].tolist() == [0, 0.125, 0.25, 0.5, 1]
    assert task["spare_pes"].tolist() == [0, 3]
    for name, layer in model.layers().items():
        codes = task["column_masks"][name]
        assert codes.dtype == torch.uint8 and codes.shape == (layer.lm.n_columns,)
        column, pe = layer.lm.index_tensors()
        spare = torch.isin(pe, torch.tensor([0, 3]))
        assert (codes[column[spare].long()] == 4).all()  # a spare PE's columns are unmasked
        assert torch.equal(task["levels"][name][~spare], levels[name]["levels"][~spare])
        assert task["levels"][name].dtype == torch.int8
    deployed = load_task_model(task, levels, params)
    assert torch.equal(predict(model.net, data)[0], predict(deployed.net, data)[0])
    report = mask_report(task, model.mapping)
    spare_columns = 0
    for layer in model.layers().values():
        column, pe = layer.lm.index_tensors()
        spare_columns += column[torch.isin(pe, torch.tensor([0, 3]))].unique().numel()
    masked = report["masked_units"]
    assert masked == model.mapping.n_columns - spare_columns
    assert report["mask_bytes_packed"] == math.ceil(math.ceil(masked / 3) * 7 / 8)
    assert report["mask_bytes_unpacked"] == math.ceil(masked * 3 / 8)
    assert sum(report["mask_histogram"].values()) == masked < model.mapping.n_columns


@pytest.mark.parametrize(("shape", "groups", "kernel"), [
    ((64, 64), 1, 3),  # 3x3 over 8 row tiles, 2 column tiles
    ((64, 256), 1, 1),  # 1x1 over 4 row tiles
    ((16, 3), 1, 11),  # 11x11: a channel split over two row tiles
    ((64, 64), 4, 3),  # grouped, each group mapped like a dense conv
    ((128, 128), 32, 3),  # grouped, packed block-diagonally
    ((64, 64), 64, 3),  # depthwise
])
def test_crossbar_layer_reaches_each_weights_column_without_a_per_weight_index(shape, groups, kernel):
    from xbar.crossbar import CrossbarSpec, map_model
    from xbar.methods import CrossbarLayer
    from xbar.quant import QuantConv2d

    conv = QuantConv2d(shape[1], shape[0], kernel, groups=groups, bias=False)
    lm = map_model(torch.nn.Sequential(conv), CrossbarSpec()).layers[0]
    levels = torch.randint(-7, 8, lm.shape, generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    layer = CrossbarLayer(conv, levels, torch.tensor(0.1), lm)
    layer.train_weights(torch.tensor([lm.first_pe + 1]))
    layer.add_column_mask(3, 1.0)
    m = torch.rand(lm.n_columns)
    column = lm.index_tensors()[0]
    assert torch.equal(layer.weight_multipliers(m), m[column.long()])
    # per weight it keeps the int8 cells and the spare PEs' bool, nothing wider; no index of its own
    per_weight = {n: b.dtype for n, b in layer.named_buffers() if b.numel() == lm.weights}
    assert per_weight == {"cells": torch.int8, "spare": torch.bool}
    assert torch.equal(layer.cells, levels) and torch.equal(layer.task_levels(), levels.float())


def test_rebuild_refuses_changed_backbone_cells(backbone):
    params, quant, levels = backbone
    model, _ = model_of(backbone, "xma")
    task = export_task(model, 3, 1)
    name = next(iter(task["levels"]))
    task["levels"][name] = task["levels"][name].clone()
    task["levels"][name].view(-1)[0] += 1
    with pytest.raises(UserError, match="no-forgetting"):
        load_task_model(task, levels, params)


def test_piggyback_exports_element_masks(backbone):
    params, quant, levels = backbone
    model, _ = model_of(backbone, "piggyback")
    task = export_task(model, 3, 1)
    assert task["column_masks"] == {} and set(task["element_masks"]) == set(levels)
    assert all(m.dtype == torch.bool and m.all() for m in task["element_masks"].values())
    total = sum(v["levels"].numel() for v in levels.values())
    assert mask_report(task, model.mapping)["mask_bytes_packed"] == math.ceil(total / 8)


def test_spec_checks_and_spare_count():
    with pytest.raises(UserError, match="larger than the task's training set"):
        check_spec(TaskSpec(dataset="optdigits", rank_batch_size=100), n_train=99, num_classes=10)
    # the ranges are params' to check, once: a TaskSpec cannot hold them
    for bad in (dict(shift_levels=4), dict(spare_ratio=0.0), dict(spare_ratio=1.5), dict(method="dropout")):
        with pytest.raises(ValueError):
            TaskSpec(dataset="optdigits", **bad)


@pytest.mark.parametrize("bad", [{"shift_levels": 4}, {"spare_ratio": 0}, {"spare_ratio": 1.2},
                                 {"method": "dropout"}, {"rank_batch_size": 10_000}])
def test_stages_reject_bad_input(tmp_path: Path, monkeypatch, capsys, bad):
    """One line on stderr, exit code 2, nothing written (stage_main in-process: no interpreter start-up)."""
    from stages import rank_pes, train_masks
    from workflow.io import stage_main

    raw = tiny_params({"t": {"dataset": "lfw_faces", **bad}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    for stage in (train_masks, rank_pes):
        monkeypatch.setattr(sys, "argv", [stage.__name__, "--task", "t"])
        with pytest.raises(SystemExit) as exit_:
            stage_main(stage.run, task_arg=True)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "metrics").exists()


def test_a_stage_process_exits_at_once_with_its_output_flushed(tmp_path: Path):
    """A stage run as a script skips the interpreter's teardown (os._exit): what it printed (block-buffered
    into a pipe) must still arrive, and the exit code is 0."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params({"t": {"dataset": "lfw_faces"}}), sort_keys=False))
    (tmp_path / "stage_x.py").write_text("import sys\nfrom workflow.io import stage_main\n\n"
                                         "def run(params):\n    print('done', end='')\n    sys.stderr.write('note')\n\n"
                                         "stage_main(run)\nprint('never reached')\n")
    done = subprocess.run([sys.executable, "stage_x.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stdout, done.stderr) == (0, "done", "note")


def test_train_masks_command_line_exit_code(tmp_path: Path):
    raw = tiny_params({"t": {"dataset": "lfw_faces", "rank_batch_size": 10_000}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "stages.train_masks", "--task", "t"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "rank_batch_size" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "artifacts").exists()


def test_fit_refuses_a_parameter_blown_up_by_the_last_step():
    """A finite loss followed by a step that makes a weight infinite: one-line UserError, not a task.pt of infs."""
    from torch.utils.data import TensorDataset

    from xbar.training import fit

    seed_everything(0, 1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randint(0, 255, (8, 1, 2, 2), dtype=torch.uint8), torch.tensor([0, 1] * 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fit(net, data, [opt], 1, 8, 0, "ok")  # a sane step passes
    blow_up = lambda: net[1].weight.data.fill_(float("inf"))  # noqa: E731 (a step that overflowed a weight)
    with pytest.raises(UserError, match="NaN or infinite after the last step"):
        fit(net, data, [opt], 1, 8, 0, "t", after_step=blow_up)
