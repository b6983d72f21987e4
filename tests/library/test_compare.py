"""The method comparison: configurations, the table (final accuracy, forgetting, means), its MLflow names
and plots on fake inputs (fast); then `xbar compare` for real on a tiny project, once on threads and once
on a local Dask cluster, with identical results (slow)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import polars as pl
import pytest

from workflow.tracking import comparison, comparison_key
from xbar.compare import (TASK_SCHEMA, Configuration, ConfigurationResult, accuracy_table, comparison_table,
                          configuration_params, configurations, energy_table, report_markdown)
from xbar.errors import UserError
from xbar.params import parse_params

TASKS = ("digits", "faces")


def test_configurations_one_per_method_and_xma2_per_ratio():
    configs = configurations(["finetune_shared", "xma2", "piggyback"], [0.05, 0.1, 0.125])
    # head only first (the reference of every method that keeps the backbone), the fp32 ceiling beside a 4-bit
    # fine-tune
    assert [c.label for c in configs] == ["head_only", "finetune_shared", "xma2@5", "xma2@10", "xma2@12.5",
                                          "piggyback", "finetune_fp32"]
    assert [c.spare_ratio for c in configs] == [None, None, 0.05, 0.1, 0.125, None, None]
    assert "head_only" not in [c.label for c in configurations(["finetune_shared"], [], reference=True)]
    assert "finetune_fp32" not in [c.label for c in configurations(["xma2", "finetune_shared"], [0.1], ceiling=False)]
    assert "finetune_fp32" not in [c.label for c in configurations(["xma2", "piggyback"], [0.1])]
    assert [c.label for c in configurations(["xma", "xma"], [])] == ["head_only", "xma"]  # no xma2: no ratio needed
    # the paper preset: by default the methods it covers; one it does not cover is refused in one line
    assert "finetune_shared" not in [c.method for c in configurations(None, [0.1], recipe="paper")]
    with pytest.raises(UserError, match="train.recipe: the 'paper' preset does not cover method 'finetune_shared'"):
        configurations(["finetune_shared"], [], recipe="paper")
    with pytest.raises(UserError, match="train.recipe: 'fancy' is unknown"):
        configurations(["xma"], [], recipe="fancy")
    for methods, ratios, words in ((["magic"], [0.1], "unknown"), (["xma2"], [0.0], "ratios: .*greater than 0"),
                                   (["xma2"], [1.5], "ratios: .*less than or equal to 1"), (["xma2"], [], "at least one"), ([], [0.1], "one")):
        with pytest.raises(UserError, match=words):
            configurations(methods, ratios)


def test_the_bn_ablation_runs_every_mask_method_once_more():
    """--bn-ablation per_task: each configuration whose method can use the rule again, with it; a fine-tune
    (its BN is always its own) once. The ablation's tasks learn with that rule, the others with train.bn."""
    from project import tiny_params

    params = parse_params(tiny_params({"digits": {"method": "xma", "bn": "per_task"}, "faces": {"dataset": "lfw_faces"}}))
    configs = configurations(["finetune_separate", "xma2", "piggyback"], [0.1], "per_task", ceiling=False,
                             reference=False)
    assert [c.label for c in configs] == ["finetune_separate", "xma2@10", "piggyback", "xma2@10+bn_per_task",
                                          "piggyback+bn_per_task"]
    rules = {c.label: {params_bn(configuration_params(params, c), t) for t in params.tasks} for c in configs}
    assert rules == {"finetune_separate": {"per_task"}, "xma2@10": {"frozen"}, "piggyback": {"frozen"},
                     "xma2@10+bn_per_task": {"per_task"}, "piggyback+bn_per_task": {"per_task"}}


def test_the_shift_level_sweep_runs_xma_and_xma2_once_per_n():
    """The paper's Table 2: XMA and XMA2 (at each P) once per N; XBM's mask is binary (N = 0) whatever the sweep."""
    from project import tiny_params

    configs = configurations(["xbm", "xma", "xma2"], [0.1], shift_levels=[0, 3], reference=False)
    assert [c.label for c in configs] == ["xbm", "xma/N0", "xma/N3", "xma2@10/N0", "xma2@10/N3"]
    params = parse_params(tiny_params({"digits": {"method": "xma"}}))
    assert {s.shift_levels for s in configuration_params(params, configs[1]).tasks.values()} == {0}
    with pytest.raises(UserError, match="shift_levels: .*less than or equal to 3"):
        configurations(["xma"], [], shift_levels=[4])


def params_bn(params, task: str) -> str:
    return params.bn_rule(params.tasks[task])


def test_configuration_params_set_every_task_and_refuse_a_ratio_beyond_the_chip():
    from project import tiny_params

    params = parse_params(tiny_params({"digits": {"method": "xma"}, "faces": {"dataset": "lfw_faces"}}))
    run = configuration_params(params, Configuration("xma2", 0.2))
    assert {s.method for s in run.tasks.values()} == {"xma2"} and {s.spare_ratio for s in run.tasks.values()} == {0.2}
    assert run.tasks["faces"].dataset.source == "lfw_faces" and list(run.tasks) == list(params.tasks)
    assert configuration_params(params, Configuration("piggyback")).tasks["digits"].spare_ratio == 0.1
    with pytest.raises(UserError, match="spare_pe_ratio"):  # the chip holds 40% spare PEs
        configuration_params(params, Configuration("xma2", 0.5))


def fake_result(label: str, at_learn: list[float], matrix: list[list[float]], spare_ratio: float | None = None,
                reprogram: float = 1e-3) -> ConfigurationResult:
    """A configuration's result over TASKS: row k of `matrix` = accuracies of tasks 0..k after task k."""
    method = label.split("@")[0]
    rows = [{k: None for k in TASK_SCHEMA} | {
        "label": label, "method": method, "spare_ratio": spare_ratio, "task": t, "order": i + 1, "dataset": t,
        "accuracy_at_learn": at_learn[i], "mask_bytes": 100 * (i + 1), "spare_pes": 3, "cells_written": 10,
        "inference_j": 2e-3, "reprogram_j": reprogram, "total_j": 2e-3 + reprogram} for i, t in enumerate(TASKS)]
    cells = [{"label": label, "after": TASKS[k], "task": TASKS[i], "accuracy": a}
             for k, row in enumerate(matrix) for i, a in enumerate(row)]
    return ConfigurationResult(Configuration(method, spare_ratio), pl.DataFrame(rows, schema=TASK_SCHEMA),
                               pl.DataFrame(cells))


@pytest.fixture
def table():
    results = [fake_result("finetune_shared", [90.0, 80.0], [[90.0], [60.0, 80.0]], reprogram=5e-3),
               fake_result("xma2@10", [88.0, 70.0], [[88.0], [88.0, 70.0]], 0.1),
               fake_result("xma2@20", [89.0, 74.0], [[89.0], [89.0, 74.0]], 0.2)]
    return comparison_table(results)


def test_table_has_final_accuracy_forgetting_and_means(table):
    rows, matrix = table
    assert rows["label"].to_list() == ["finetune_shared"] * 2 + ["xma2@10"] * 2 + ["xma2@20"] * 2
    first = rows.filter(pl.col("task") == "digits")
    assert first["accuracy_final"].to_list() == [60.0, 88.0, 89.0]  # after the last task
    assert first["forgetting"].to_list() == [30.0, 0.0, 0.0]
    assert rows.filter(pl.col("task") == "faces")["forgetting"].to_list() == [0.0, 0.0, 0.0]
    assert matrix.height == 9
    acc = accuracy_table(rows)
    assert acc.columns == ["label", *TASKS, "mean"]
    assert acc["label"].to_list() == ["finetune_shared", "xma2@10", "xma2@20"]
    assert acc["mean"].to_list() == [70.0, 79.0, 81.5]
    assert accuracy_table(rows, "accuracy_at_learn")["mean"].to_list() == [85.0, 79.0, 81.5]
    energy = energy_table(rows)
    assert energy["total_j"].to_list() == pytest.approx([14e-3, 6e-3, 6e-3])
    assert energy["mask_bytes"].to_list() == [150.0] * 3  # mean per task
    assert energy["reprogram_over_inference"].to_list() == pytest.approx([2.5, 0.5, 0.5])


def test_markdown_report_names_every_configuration(table):
    text = report_markdown(table[0])
    assert text.count("| xma2@10 ") >= 4 and "| mean " in text and "| finetune_shared " in text
    assert "mask_digest" not in text
    assert "energy (scenario steady:" in text and "| steady " in text  # which accounting the energy column uses


def test_mlflow_names_are_valid_and_read_back(table):
    from mlflow.utils.validation import validate_param_and_metric_name

    from flows.compare import comparison_metrics

    metrics = comparison_metrics(table[0])
    assert all(validate_param_and_metric_name(k) for k in metrics)
    assert metrics["acc/xma2-p10/digits"] == 88.0 and metrics["forgetting/finetune_shared/digits"] == 30.0
    assert metrics["acc/xma2-p20/mean"] == 81.5
    run = SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={
        "xbar.labels": "finetune_shared,xma2@10,xma2@20", "xbar.tasks": ",".join(TASKS)}))
    tracker = SimpleNamespace(find=lambda *a, **k: [run])
    assert comparison(tracker) == {"finetune_shared": {"digits": 60.0, "faces": 80.0},
                                   "xma2@10": {"digits": 88.0, "faces": 70.0},
                                   "xma2@20": {"digits": 89.0, "faces": 74.0}}
    assert comparison(SimpleNamespace(find=lambda *a, **k: [])) == {}
    assert comparison_key("xma2@12.5") == "xma2-p12.5"


def test_plots_draw_the_sweep_and_the_stacked_energy(table):
    from xbar.plots import accuracy_vs_ratio, energy_by_method, png

    rows = table[0]
    fig = accuracy_vs_ratio(rows)
    digits = fig.axes[0]
    sweep = [line for line in digits.get_lines() if line.get_label() == "xma2"][0]
    assert list(sweep.get_xdata()) == [10.0, 20.0] and list(sweep.get_ydata()) == [88.0, 89.0]
    shared = [line for line in digits.get_lines() if line.get_label() == "finetune_shared"][0]
    assert list(shared.get_ydata()) == [60.0, 60.0]  # a horizontal line at its final accuracy
    assert png(fig)[:4] == b"\x89PNG"
    fig = energy_by_method(rows)
    bars = fig.axes[-1].patches  # all tasks: 3 inference bars, then 3 re-programming bars on top
    assert [round(b.get_height(), 6) for b in bars] == [4.0, 4.0, 4.0, 10.0, 2.0, 2.0]
    assert [round(b.get_y(), 6) for b in bars[3:]] == [4.0, 4.0, 4.0]
    assert png(fig)[:4] == b"\x89PNG"
    # the fp32 ceiling has no chip, so no energy: its rows are left out of the energy plot
    ceiling = rows.filter(pl.col("label") == rows["label"][0]).with_columns(
        label=pl.lit("finetune_fp32"), inference_j=pl.lit(None, pl.Float64), reprogram_j=pl.lit(None, pl.Float64))
    fig = energy_by_method(pl.concat([rows, ceiling]))
    assert [round(b.get_height(), 6) for b in fig.axes[-1].patches] == [4.0, 4.0, 4.0, 10.0, 2.0, 2.0]


# --- the chip column and the sweeps ---------------------------------------------------------------------


def chip_frame(label: str, chip: list[float], ideal: list[float], sweeps: bool = False) -> pl.DataFrame:
    """Chip rows over TASKS: the column, and an ADC sweep losing (8 - bits) points below ideal."""
    from xbar.chip.sweep import CHIP_SCHEMA

    base = {"label": label, "device": "paper", "noise_scale": 1.0, "time_s": 0.0, "instances": 2, "images": 50,
            "chip_std": 0.5}
    rows = [base | {"task": t, "sweep": "column", "x": 5.0, "adc_bits": 5, "ideal": ideal[i], "chip_mean": chip[i],
                    "chip_min": chip[i] - 1} for i, t in enumerate(TASKS)]
    if sweeps:
        rows += [base | {"task": t, "sweep": "adc_bits", "x": float(b), "adc_bits": b, "ideal": ideal[i],
                         "chip_mean": ideal[i] - (8 - b), "chip_min": ideal[i] - (8 - b)}
                 for b in range(4, 9) for i, t in enumerate(TASKS)]
    return pl.DataFrame(rows, schema=CHIP_SCHEMA)


@pytest.fixture
def chip_table_rows():
    from dataclasses import replace

    results = [fake_result("piggyback", [85.0, 75.0], [[85.0], [85.0, 75.0]]),
               fake_result("xma2@10", [88.0, 70.0], [[88.0], [88.0, 70.0]], 0.1),
               fake_result("xbm", [80.0, 60.0], [[80.0], [80.0, 60.0]])]
    results[0] = replace(results[0], chip=chip_frame("piggyback", [80.0, 70.0], [84.0, 76.0], sweeps=True))
    results[1] = replace(results[1], chip=chip_frame("xma2@10", [87.0, 68.0], [88.0, 70.0], sweeps=True))
    return results  # xbm: not measured on the chip


def test_the_chip_column_joins_each_task_and_stays_empty_where_not_measured(chip_table_rows):
    from flows.compare import chip_means, comparison_metrics
    from xbar.compare import chip_table

    table, _ = comparison_table(chip_table_rows)
    by = {(r["label"], r["task"]): r for r in table.iter_rows(named=True)}
    assert by[("xma2@10", "faces")]["chip_mean"] == 68.0 and by[("xma2@10", "faces")]["chip_ideal"] == 70.0
    assert by[("piggyback", "digits")]["chip_min"] == 79.0
    assert by[("xbm", "digits")]["chip_mean"] is None
    assert chip_means(table) == {"piggyback": 75.0, "xma2@10": 77.5}
    metrics = comparison_metrics(table)
    assert metrics["chip/xma2-p10/mean"] == 77.5 and metrics["chip/piggyback/faces"] == 70.0
    assert not any(k.startswith("chip/xbm") for k in metrics)
    text = report_markdown(table, chip_table(chip_table_rows))
    section = text.split("## Accuracy on the chip")[1].split("##")[0]
    assert "5-bit ADC, device paper" in section and "| xbm " not in section
    assert "| xma2@10 " in section and "-1.5 " in section  # chip 77.5 - ideal 79 on the same images
    assert "Accuracy on the chip" not in report_markdown(table)  # no chip rows: no section


def test_chip_sweeps_average_over_tasks_and_plot_one_line_per_configuration(chip_table_rows):
    from xbar.compare import chip_sweep_table, chip_table
    from xbar.plots import chip_sweeps, png

    sweep = chip_sweep_table(chip_table(chip_table_rows))
    assert set(sweep["sweep"]) == {"adc_bits"}  # the column is no sweep point
    four = sweep.filter((pl.col("label") == "xma2@10") & (pl.col("x") == 4.0)).row(0, named=True)
    assert four["chip_mean"] == pytest.approx(79.0 - 4) and four["ideal"] == pytest.approx(79.0)
    fig = chip_sweeps(sweep)
    lines = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}  # errorbar: the line of chip means
    assert list(lines["piggyback"].get_xdata()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert list(lines["piggyback"].get_ydata()) == pytest.approx([76.0, 77.0, 78.0, 79.0, 80.0])
    assert png(fig)[:4] == b"\x89PNG"


def test_chip_rows_evaluate_each_setting_once_on_a_seeded_subset(monkeypatch):
    from dataclasses import dataclass

    import torch
    from torch.utils.data import TensorDataset

    import xbar.chip.sweep as sweep
    from project import tiny_params

    @dataclass
    class Data:
        train: object
        test: object

    calls = []

    def fake_evaluate(params, tasks, levels, data, device, adc, instances, time_s=0.0, switches=0):
        calls.append((adc.bits, device.noise_scale, time_s, instances, {n: len(d.test) for n, d in data.items()}))
        return {n: {"ideal": 90.0, "chip_mean": 90.0 - device.noise_scale, "chip_std": 0.0, "chip_min": 89.0}
                for n in tasks}

    monkeypatch.setattr(sweep, "evaluate_tasks", fake_evaluate)
    params = parse_params(tiny_params({"digits": {}}))
    data = {"digits": Data(None, TensorDataset(torch.zeros(30, 1), torch.zeros(30)))}
    assert sweep.chip_rows(params, "x", {"digits": {}}, {}, data, sweep.ChipPlan(0)).height == 0
    rows = sweep.chip_rows(params, "x", {"digits": {}}, {}, data, sweep.ChipPlan(3, 10))
    assert calls == [(5, 1.0, 0.0, 3, {"digits": 10})] and rows["sweep"].to_list() == ["column"]
    calls.clear()
    plan = sweep.ChipPlan(1, None, sweeps=True, adc_bits=(4, 5), noise_scales=(0.0, 1.0), times_s=(0.0, 60.0))
    rows = sweep.chip_rows(params, "x", {"digits": {}}, {}, data, plan)
    # the column, the 5-bit ADC point and noise x1 at time 0 are one setting, evaluated once
    assert sorted(c[:3] for c in calls) == [(4, 1.0, 0.0), (5, 0.0, 0.0), (5, 1.0, 0.0), (5, 1.0, 60.0)]
    assert calls[0][4] == {"digits": 30}  # None: the whole test split
    assert rows.filter(pl.col("sweep") == "noise").sort("x")["chip_mean"].to_list() == [90.0, 89.0]
    assert len(sweep.subset_of(data["digits"], 10, 0).test) == 10
    assert list(sweep.subset_of(data["digits"], 10, 0).test.indices) == \
        list(sweep.subset_of(data["digits"], 10, 0).test.indices)  # seeded
    with pytest.raises(UserError, match="chip images"):
        sweep.ChipPlan(1, 0).check()


# --- for real: the flow on threads and on a local Dask cluster ------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_same_results_on_threads_and_dask_and_in_mlflow(tmp_path):
    import json

    from project import make_tiny_project
    from workflow.io import save_torch
    from tiny_backbone import pretrained_backbone

    tasks = {"digits": {"dataset": {"source": "optdigits", "max_train": 400}, "epochs": 2},
             "faces": {"dataset": "lfw_faces", "epochs": 2}}
    project = make_tiny_project(tmp_path / "project", tasks, git=False)
    # a backbone with features (a random one can leave a mask method worse than its closed-form head: the guard)
    _, quant, levels = pretrained_backbone(width=4)
    save_torch(project.root / "artifacts/backbone/quant.pt", quant)
    save_torch(project.root / "artifacts/backbone/levels.pt", levels)
    project.env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    # (XBM is left out: under train.bn frozen its binary column masks end above the closed-form head's loss
    # on this 400-image task of a 4-channel backbone, and the divergence guard fails the run, as it should)
    args = ("-m", "xbar.cli", "compare", "--methods", "finetune_shared,piggyback,xma2", "--ratios", "0.1,0.2",
            "--seeds", "0")
    out = project.python(*args, "--workers", "2", "--chip-sweeps")  # two configurations at once on threads
    assert "xma2@20" in out.stdout and "chip mean" in out.stdout
    folder = project.root / "artifacts/comparison"
    threads = pl.read_csv(folder / "table.csv")
    assert {p.name for p in folder.iterdir()} >= {"table.csv", "table.md", "accuracy.csv", "matrix.csv",
                                                   "accuracy_vs_ratio.png", "energy.png", "chip.csv",
                                                   "chip_sweeps.csv", "chip_sweeps.png"}
    assert threads["chip_mean"].is_not_null().all() and "## Accuracy on the chip" in (folder / "table.md").read_text()
    sweeps = pl.read_csv(folder / "chip_sweeps.csv")
    assert sorted(sweeps.filter(pl.col("sweep") == "adc_bits")["x"].unique().to_list()) == [4, 5, 6, 7, 8]
    project.python(*args, "--dask", "--workers", "1")  # one worker process: starting more costs more than it saves
    dask = pl.read_csv(folder / "table.csv")
    assert threads.drop("seconds").equals(dask.drop("seconds"))  # accuracies, mask digests, energy: identical
    assert threads["label"].unique(maintain_order=True).to_list() == ["head_only", "finetune_shared", "piggyback",
                                                                      "xma2@10", "xma2@20"]

    masks = threads.filter(~pl.col("method").is_in(["finetune_shared", "head_only"]))
    assert (masks["forgetting"] == 0).all()  # no forgetting, exactly
    # how training went: its optimizer steps, and the checkpoint kept on held-out images (digits holds some out)
    assert (threads["optimizer_steps"] > 0).all()
    digits = threads.filter(pl.col("task") == "digits")
    assert digits["kept_step"].is_not_null().all() and (digits["kept_step"] <= digits["optimizer_steps"]).all()
    # every row names its recipe and head procedure: one for every method under the default recipe
    assert (threads["recipe"] == "default").all() and threads["head_fit"].n_unique() == 1
    moved = threads.filter(pl.col("method").is_in(["piggyback", "xma2"]))["masks_changed"]
    assert moved.is_not_null().all() and ((moved >= 0) & (moved <= 1)).all()
    md = (folder / "table.md").read_text()
    assert "mean ± 95% CI over seeds" in md and "xma2@10 - head_only" in md
    assert masks.filter(pl.col("method") == "xma2")["spare_pes"].min() > 0
    assert masks.filter(pl.col("method") == "piggyback")["mask_bytes"].min() > 0
    shared = threads.filter((pl.col("method") == "finetune_shared") & (pl.col("task") == "digits"))
    assert shared["forgetting"][0] != 0  # the shared network moved on to faces
    # re-programming is booked exactly where cells were written: never for the head-only reference, always for
    # the fine-tune and the spare PEs (a Piggyback mask that flipped nothing writes nothing)
    assert ((threads["reprogram_j"] > 0) == (threads["cells_written"] > 0)).all()
    assert (threads.filter(pl.col("method") == "head_only")["reprogram_j"] == 0).all()
    written = threads.filter(pl.col("method").is_in(["finetune_shared", "xma2"]))
    assert (written["reprogram_j"] > 0).all() and (written["total_j"] > written["inference_j"]).all()
    # more spare PEs re-program more cells
    xma2 = threads.filter(pl.col("method") == "xma2").group_by("label").agg(pl.col("cells_written").sum())
    assert dict(xma2.iter_rows())["xma2@20"] > dict(xma2.iter_rows())["xma2@10"]

    report = json.loads(project.python("-m", "xbar.cli", "report", "--json").stdout)
    final = {(r["label"], r["task"]): r["accuracy_final"] for r in dask.iter_rows(named=True)}
    assert report["comparison"] == {label: {t: final[(label, t)] for t in tasks}
                                    for label in ["head_only", "finetune_shared", "piggyback", "xma2@10", "xma2@20"]}
    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("xbar").experiment_id],
                              "tags.`xbar.kind` = 'comparison'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id, "comparison")}
    assert {"comparison/table.csv", "comparison/table.md", "comparison/energy.png"} <= names


def test_cli_refuses_bad_comparison_input_before_the_flow_starts(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import flows.compare
    from project import tiny_params
    from xbar.cli import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params({"digits": {}})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.compare, "run_comparison", lambda *a, **k: pytest.fail("the flow started"))
    for args, words in ((["--methods", "magic"], "unknown"), (["--ratios", "0.5"], "spare_pe_ratio"),
                        (["--ratios", "ten"], "--ratios"), ([], "quant.pt: missing"),
                        (["--chip-instances", "-1"], "--chip-instances"), (["--chip-images", "-5"], "--chip-images"),
                        (["--seeds", "1,1"], "--seeds: seed 1 is given twice"), (["--seeds", ","], "--seeds: expected at least one")):
        out = CliRunner().invoke(app, ["compare", *args])
        assert out.exit_code == 2, out.output
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], out.stderr
    assert not (tmp_path / "artifacts").exists()


def test_the_fp32_ceiling_fine_tunes_the_fp32_backbone_and_forgets_nothing():
    """finetune_fp32: each task from the fp32 backbone (no quantizer), its own copy; accuracy only."""
    import math

    import torch

    from tiny_backbone import tiny_params
    from xbar.compare import FP32_CEILING, fp32_ceiling
    from xbar.data import load_task_data
    from xbar.models import build_model
    from xbar.step import Backbone
    from xbar.training import fit, seed_everything

    params = parse_params({**tiny_params({"digits": {"dataset": {"source": "optdigits", "max_train": 300}},
                                          "faces": {"dataset": "lfw_faces"}})})
    seed_everything(0, 1)
    source = load_task_data(params.source.dataset, 0)
    net = build_model(params.model, source.num_classes, 1)
    fit(net, source.train, [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)], 1, 128, 0, "pretrain")
    fp32 = {"state_dict": {k: v.clone() for k, v in net.state_dict().items()}, "num_classes": source.num_classes,
            "channels": 1}
    data = {n: load_task_data(s.dataset, 0) for n, s in params.tasks.items()}
    result = fp32_ceiling(params, Backbone({}, {}, fp32), data)
    table, _ = comparison_table([result])
    assert table["label"].to_list() == [FP32_CEILING] * 2 and table["forgetting"].to_list() == [0.0, 0.0]
    assert all(a > 100 / 2 for a in table["accuracy_at_learn"])  # above chance on both
    weights = sum(v.numel() for k, v in fp32["state_dict"].items() if not k.startswith("head."))
    assert table["task_bytes"][0] == 4 * (weights + (fp32["state_dict"]["head.weight"].shape[1] + 1) * 10)
    assert energy_table(table).height == 0  # nothing programmed: no energy row
    assert torch.equal(fp32["state_dict"]["stem.0.weight"], net.state_dict()["stem.0.weight"])  # untouched
    assert not math.isnan(result.tasks["seconds"][0])


def test_an_rgb_image_folder_task_fine_tunes_in_fp32():
    """The fp32 ceiling on an image folder (RGB, integer labels, as torchvision's ImageFolder gives them): it
    crashed reading the head images as one stacked tensor (TypeError on the int labels)."""
    import torch

    from xbar.methods.fp32 import train_fp32
    from xbar.models import build_model
    from xbar.params import ModelParams, TaskSpec, TrainParams
    from xbar.training import accuracy, seed_everything

    class Folder(torch.utils.data.Dataset):  # (uint8 image, int label), like an ImageFolder source
        def __init__(self):
            gen = torch.Generator().manual_seed(0)
            self.y = [i % 2 for i in range(40)]
            self.x = [(torch.rand(3, 8, 8, generator=gen) * 100 + 120 * y).to(torch.uint8) for y in self.y]

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    seed_everything(0, 1)
    net = build_model(ModelParams(width=4, blocks=1), 2, 3)
    data = Folder()
    steps, label = train_fp32(net, data, data, TaskSpec(dataset="optdigits", epochs=1), TrainParams(threads=1), 0, "rgb")
    assert steps >= 50 and label == "default"
    assert accuracy(net, data) > 50


def test_seed_statistics_give_mean_ci_and_paired_differences_with_the_gain_over_head_only():
    from xbar.comparison_stats import paired_table, seed_table, statistics_markdown
    from xbar.stats import mean_ci, paired_ci

    acc = {"head_only": [70.0, 72.0, 71.0], "xma": [75.0, 78.0, 74.0], "xma2@10": [80.0, 79.0, 83.0],
           "piggyback": [81.0, 77.0, 80.0]}
    rows = pl.DataFrame([{"label": label, "seed": seed, "task": task, "accuracy_final": a + (task == "b"),
                          "recipe": "default", "head_fit": "ridge head, then SGD", "optimizer_steps": 10,
                          "masks_changed": None if label == "head_only" else 0.1}
                         for label, values in acc.items() for seed, a in enumerate(values) for task in ("a", "b")])
    table = seed_table(rows)
    xma = table.filter((pl.col("label") == "xma") & (pl.col("task") == "a")).row(0, named=True)
    expected = mean_ci(acc["xma"])
    assert (xma["mean"], xma["ci95"], xma["n"]) == pytest.approx((expected.mean, expected.half_width, 3))
    assert xma["seeds"] == "0,1,2" and xma["optimizer_steps"] == 20 and xma["recipe"] == "default"
    pairs = paired_table(rows)
    assert pairs["difference"].unique(maintain_order=True).to_list()[:2] == ["xma2@10 - piggyback", "xma2@10 - xma"]
    claim = pairs.filter((pl.col("difference") == "xma2@10 - piggyback") & (pl.col("task") == "mean")).row(0, named=True)
    assert claim["mean"] == pytest.approx(paired_ci(acc["xma2@10"], acc["piggyback"]).mean)
    assert claim["ci95"] == pytest.approx(paired_ci(acc["xma2@10"], acc["piggyback"]).half_width)
    md = statistics_markdown(rows, ["xbm (seed 0): t (xbm): training diverged"])
    assert "gain_over_head_only" in md and "xma - head_only" in md and "- xbm (seed 0): t (xbm)" in md
