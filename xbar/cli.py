"""The `xbar` command line. Each command is thin: parse options, call the library, print."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import typer

from xbar.errors import UserError

# A flow run without PREFECT_API_URL starts a temporary Prefect server. Offline it would log an
# error about phoning home. On 2 cores its first start (database migrations) takes 16-26 s, over
# Prefect's 20 s default wait, so a first `xbar add-task` could fail. A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


class OneLineTyper(typer.Typer):
    """Click's own usage errors (a value of the wrong type, an unknown or missing option) as one
    `error: ...` line and exit code 2 too, instead of a usage panel."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        kwargs.setdefault("standalone_mode", False)
        try:
            code = super().__call__(*args, **kwargs)
        except typer.Abort:  # Ctrl-C
            print("aborted", file=sys.stderr)
            sys.exit(130)
        except typer.TyperException as err:  # click's errors, as vendored by typer (UsageError: exit code 2)
            message = " ".join((err.format_message() if hasattr(err, "format_message") else str(err)).split())
            if message:  # none: no arguments, the help was shown
                print(f"error: {message}", file=sys.stderr)
            sys.exit(getattr(err, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = OneLineTyper(help="xbar: continual learning on ReRAM crossbars with 2-tier masks (XMA2).",
                   no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def console():  # noqa: ANN201 (a rich Console; rich is imported only by the commands that print tables)
    """A rich console. Piped output (no terminal) gets 200 columns instead of rich's default 80, which
    cut the task table's names and figures to "mni…"."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def one_line_errors(fn: Callable) -> Callable:
    """A user mistake prints one line on stderr and exits with code 2: no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN202
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as err:  # the library installed alone (`pip install .`): no pipeline
            if (err.name or "").partition(".")[0] not in WORKFLOW_PACKAGES:
                raise
            print(f"error: this command needs the pipeline's packages ({err.name} is missing): "
                  "pip install 'xbar[workflow]'", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


WORKFLOW_PACKAGES = {"prefect", "prefect_dask", "dask", "distributed", "dvc", "mlflow", "matplotlib", "psutil"}


@app.callback()
def main() -> None:
    """Run `xbar COMMAND --help` for a command's options."""


@app.command()
@one_line_errors
def report(as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table.")) -> None:
    """Tasks learned so far: accuracy now / at learn, forgetting, energy, mask memory (read from MLflow)."""
    import json

    from rich.table import Table

    from workflow.tracking import report as build_report
    from workflow.tracking import tracker

    with tracker() as t:
        rep = build_report(t)
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    if not rep["tasks"]:
        print("no task in MLflow yet: run `make run` (dvc repro) or `xbar add-task`")
        return
    table = Table(title="xbar tasks (MLflow)")
    for col in ("#", "task", "dataset", "method", "acc now %", "acc at learn %", "forgetting", "spare PEs",
                "mask bytes", "task bytes", "energy J", "program J", "eval switch J", "gate"):
        table.add_column(col)
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rep["tasks"]:
        table.add_row(str(r["order"]), r["name"], r["dataset"], r["method"], fmt(r["accuracy_now"]),
                      fmt(r["accuracy_at_learn"]), fmt(r["forgetting"]), fmt(r["spare_pes"], "{:.0f}"),
                      fmt(r["mask_bytes"], "{:.0f}"), fmt(r["task_bytes"], "{:.0f}"), fmt(r["energy_j"], "{:.3g}"),
                      fmt(r["reprogram_j"], "{:.3g}"), fmt(r["switch_j"], "{:.3g}"), r["gate"] or "-")
    console().print(table)
    if rep["comparison"]:  # the newest `xbar compare`
        names = list(next(iter(rep["comparison"].values())))
        comparison = Table(title="method comparison (MLflow): test accuracy % after the last task")
        for col in ("method", *names):
            comparison.add_column(col)
        for label, accs in rep["comparison"].items():
            comparison.add_row(label, *(fmt(accs.get(n)) for n in names))
        console().print(comparison)


@app.command()
@one_line_errors
def memory(
    model: str = typer.Option(..., "--model", help="A registered backbone (small_resnet, efficientnet_lite0, a "
                              "plugin's) or any torchvision classification model (e.g. resnet50, vit_b_16)."),
    rows: int = typer.Option(72, help="Rows per crossbar."),
    cols: int = typer.Option(72, help="Columns per crossbar."),
    cell_bits: int = typer.Option(2, help="Bits per ReRAM cell."),
    weight_bits: int = typer.Option(4, help="Bits per weight (weight_bits / cell_bits cells each)."),
    signed: str = typer.Option("offset", "--signed", help="Signed weights: offset, offset_ref (a reference "
                               "column per slice and crossbar) or differential (two arrays)."),
    shift_levels: int = typer.Option(3, help="Shift levels N of the column shift mask (N + 2 values)."),
    spare_ratio: float = typer.Option(0.1, help="Share of PEs replaced by spare PEs (XMA2)."),
    bn: str = typer.Option("frozen", "--bn", help="train.bn: frozen (the backbone's BN) or per_task (counted)."),
    classes: int = typer.Option(None, "--classes", help="Classes of the new task's head (default: the model's)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Per-task storage of every method for a model mapped onto crossbars (no weights needed): the masks
    alone (the paper's Table 2) and all in (masks + re-programmed cells + BN + head, docs/accounting.md)."""
    import json

    from rich.table import Table

    from xbar.crossbar import CrossbarSpec
    from xbar.memory import named_model_report, task_storage
    from xbar.params import BnRule, CrossbarParams, PositiveInt, ShiftLevels, SpareRatio, check_value

    check_value(ShiftLevels, shift_levels, "--shift-levels")  # the ranges of params.yaml's task fields
    check_value(SpareRatio, spare_ratio, "--spare-ratio")
    check_value(BnRule, bn, "--bn")
    if classes is not None:
        check_value(PositiveInt, classes, "--classes")
    from xbar.crossbar import check_scheme

    crossbar = dict(rows=rows, cols=cols, cell_bits=cell_bits, weight_bits=weight_bits, signed=check_scheme(signed))
    spec = CrossbarSpec.from_params(check_value(CrossbarParams, crossbar, "crossbar"))
    mapping, rep = named_model_report(model, spec, shift_levels, spare_ratio, bn, classes)
    from xbar.backbones.digital import digital_layers
    from xbar.memory import build_named_model

    # what stays digital beside the crossbars (attention's products, LayerNorm, SE gates): modules by kind
    digital = {k: len(v) for k, v in digital_layers(build_named_model(model)).items() if v}
    if as_json:
        print(json.dumps({"model": model, "rows": rows, "cols": cols, "cell_bits": cell_bits, "signed": signed,
                          "digital_layers": digital, "cells": mapping.n_cells_used,
                          "utilization": round(mapping.utilization, 6)} | rep.as_dict(), indent=2))
        return
    size = lambda b: f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} KB"  # noqa: E731 (decimal, as the paper)
    out = console()
    out.print(f"{model} on {rows}x{cols} crossbars, {cell_bits}-bit cells, {weight_bits}-bit weights, {signed}: "
              f"{rep.weights:,} weights ({rep.conv_weights:,} conv), {mapping.n_cells_used:,} cells, "
              f"{rep.crossbars:,} crossbars, {rep.pes:,} PEs, "
              f"{rep.columns:,} columns, utilization {mapping.utilization:.1%}")
    if digital:
        out.print("digital, not on crossbars: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in digital.items())
                  + " (docs/scale.md)")
    out.print(f"masks alone (the paper's Table 2): Piggyback {size(rep.piggyback_bytes)}, XBM "
              f"{size(rep.column_binary_bytes)}, XMA {size(rep.column_shift_packed_bytes)} packed "
              f"({rep.shift_packed_vs_piggyback:.1%} of Piggyback)")
    table = Table(title=f"all-in storage per task ({shift_levels} shift levels, spare ratio {spare_ratio:g}, "
                        f"BN {bn}, head {rep.head_params:,} parameters)")
    for col in ("method", "masks", "cells", "BN", "head", "total", "unpacked", "vs Piggyback"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, total in rep.per_task_bytes.items():
        parts = task_storage(name, mapping, shift_levels=shift_levels, spare_ratio=spare_ratio, bn_rule=bn,
                             head_params=rep.head_params, bn_params=rep.bn_params)
        table.add_row(name, *(size(b) for b in (parts.masks, parts.cells, parts.bn, parts.head, total,
                                                rep.per_task_bytes_unpacked[name])),
                      f"{total / max(1, rep.per_task_bytes['piggyback']):.1%}")
    out.print(table)


@app.command()
@one_line_errors
def energy(
    model: str = typer.Option(..., "--model", help="A registered backbone (small_resnet, efficientnet_lite0, a "
                              "plugin's) or any torchvision classification model (e.g. resnet50, vit_b_16)."),
    preset: str = typer.Option(..., "--preset", help="Energy constants: paper, neurosim-22nm or mnsim-45nm."),
    spare_ratio: float = typer.Option(0.1, "--spare-ratio", help="Share of PEs replaced by spare PEs (XMA2)."),
    inferences: int = typer.Option(1, "--inferences", help="Inferences per task counted in the total."),
    scenario: str = typer.Option("steady", "--scenario", help="How writes are counted: steady (a chip that "
                                 "served the previous task), first-task, paper or paper-round-trip (docs/energy.md)."),
    adc_bits: int = typer.Option(5, "--adc-bits", help="ADC bits per conversion, 1..16 (crossbar.adc_bits' "
                                 "default, 5; the preset's ADC is booked at it)."),
    signed: str = typer.Option("offset", "--signed", help="Signed weights: offset, offset_ref or differential "
                               "(cells, crossbars, ADC conversions and writes follow it)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Energy of fine-tuning, Piggyback, XBM, XMA and XMA2 for one new task on a model (no weights needed):
    inference x N + re-programming, from documented typical cell changes (docs/energy.md)."""
    import json

    from rich.table import Table

    from xbar.energy.named import named_energy
    from xbar.params import AdcBits, SpareRatio, check_value

    from xbar.crossbar import CrossbarSpec, check_scheme

    check_value(AdcBits, adc_bits, "--adc-bits")
    result = named_energy(model, preset, check_value(SpareRatio, spare_ratio, "--spare-ratio"), inferences,
                          spec=CrossbarSpec(signed=check_scheme(signed)), adc_bits=adc_bits, scenario=scenario)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    a = result["assumptions"]
    table = Table(title=f"{model}, preset {preset}, scenario {scenario}, {adc_bits}-bit ADC, {a['spare_pes']} spare "
                        f"PEs of {a['pes']}, {inferences} inference(s) per task")
    for col in ("method", "inference J", "re-programming J", "total J", "cells written", "total / XMA2"):
        table.add_column(col, justify="left" if col == "method" else "right")
    x2 = result["methods"]["xma2"]["total_j"]
    for name, m in result["methods"].items():
        table.add_row(name, f"{m['inference_j']:.3g}", f"{m['reprogram_j']:.3g}", f"{m['total_j']:.3g}",
                      f"{m['cells_written']:,}", f"{m['total_j'] / x2:.2f}x")
    console().print(table)
    r = result["ratios"]
    print(f"scenario {scenario}: {a['scenario_description']}\nfinetune / xma2 {r['finetune_over_xma2']:.2f}x, "
          f"piggyback / xma2 {r['piggyback_over_xma2']:.2f}x (the paper: 13.72x, 4.38x)")


@app.command()
@one_line_errors
def chip(
    adc_bits: int | None = typer.Option(None, "--adc-bits", help="ADC bits per column conversion, 1..16 "
                                        "(default: crossbar.adc_bits, 5)."),
    device: str | None = typer.Option(None, "--device", help="Device preset: ideal, paper, cmo-hfox, crosssim-wan2022, "
                                      "crosssim-milo2021, neurosim-22nm, mnsim-45nm (default: chip.device)."),
    instances: int | None = typer.Option(None, "--instances", help="Chip instances (seeds) per task, >= 1 "
                                         "(default: chip.instances, 5)."),
    time_s: float | None = typer.Option(None, "--time", help="Seconds since programming: drift and relaxation "
                                        "(default: chip.time_s, 0)."),
    signed: str | None = typer.Option(None, "--signed", help="Signed weights on the chip forward: offset, "
                                      "offset_ref or differential (default: crossbar.signed; the PEs stay "
                                      "those the tasks were learned on)."),
    adc_range: str | None = typer.Option(None, "--adc-range", help="ADC range rule: full, per_layer, "
                                         "per_crossbar or per_column (default: chip.adc_range)."),
    adc_clip: str | None = typer.Option(None, "--adc-clip", help="Calibrated ranges: a percentile in (0, 100] "
                                        "of the partial sums seen on training images, or mse (default: "
                                        "chip.adc_clip)."),
    settings: list[str] | None = typer.Option(None, "--set", help="Override a device constant, KEY=VALUE "
                                              "(repeatable), e.g. --set read_sigma=0.02."),
    switches: int = typer.Option(0, "--switches", help="Also run each task again after N switches of the chip "
                                 "back to it (fresh spare-PE programming each): device-caused forgetting."),
    verify: float | None = typer.Option(None, "--verify-tolerance", help="Program-and-verify writing: re-write a "
                                        "cell until within this many levels (default: chip.verify_tolerance, 0: "
                                        "open loop); its re-writes are reported with --switches."),
    sweep: bool = typer.Option(False, "--sweep", help="Accuracy against ADC bits 4..8 instead of one setting."),
    mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Log the numbers to each task's MLflow run."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Every learned task on M seeded chip instances (ADC, device noise, stuck cells, drift) next to its
    ideal accuracy; needs the pipeline's artifacts (artifacts/backbone/levels.pt, artifacts/tasks/*/task.pt).
    The numbers also go to each task's MLflow run (metrics chip/<device>-adc<bits>/...)."""
    import json
    import math
    from pathlib import Path

    from workflow.chip import run_chip
    from xbar.chip.adc import check_clip
    from xbar.chip.devices import parse_settings
    from xbar.chip.evaluate import chip_settings
    from xbar.params import load_params
    from xbar.stats import check_instances

    if adc_bits is not None and not 1 <= adc_bits <= 16:
        raise UserError(f"--adc-bits: {adc_bits} is outside 1..16")
    if instances is not None and instances < 2:
        raise UserError(f"--instances: {instances} is below 2 (a 95% CI needs at least 2 chips)")
    if switches < 0:
        raise UserError(f"--switches: {switches} is below 0")
    if time_s is not None and not (math.isfinite(time_s) and time_s >= 0):
        raise UserError(f"--time: {time_s} is not a number of seconds >= 0")
    if verify is not None and not (math.isfinite(verify) and verify >= 0):
        raise UserError(f"--verify-tolerance: {verify} is not a tolerance >= 0 levels")
    params = load_params(Path("params.yaml"))
    if verify is not None:
        params = params.model_copy(update={"chip": params.chip.model_copy(update={"verify_tolerance": verify})})
    clip = None if adc_clip is None else check_clip(_number_or_word(adc_clip), "--adc-clip")
    preset, adc = chip_settings(params, adc_bits, device, parse_settings(settings), signed, adc_range, clip)
    m = params.chip.instances if instances is None else instances
    check_instances(m, "chip.instances" if instances is None else "--instances")
    t = params.chip.time_s if time_s is None else time_s
    result = run_chip(params, preset, adc, m, t, switches, sweep, mlflow)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    runs = result["sweep"] if sweep else {str(adc.bits): result["tasks"]}
    table = Table(title=f"accuracy % on {m} chip instances: device {preset.name}, ADC range {adc.rule}, "
                        f"{adc.signed} weights, {t:g} s after programming")
    extra = ("device forgetting (points, 95% CI)",) if switches and not sweep else ()
    for col in ("task", "ADC bits", "ideal", "chip mean ± 95% CI", "chip std (points)", "chip min", *extra):
        table.add_column(col, justify="left" if col == "task" else "right")
    for bits, accs in runs.items():
        for name, r in accs.items():
            forgot = [f"{r['device_forgetting']:.2f} ± {r['device_forgetting_ci']:.2f}"] if extra else []
            table.add_row(name, bits, f"{r['ideal']:.2f}", f"{r['chip_mean']:.2f} ± {r['chip_ci']:.2f}",
                          f"{r['chip_std']:.2f}", f"{r['chip_min']:.2f}", *forgot)
    console().print(table)


@app.command("add-task")
@one_line_errors
def add_task(
    name: str = typer.Argument(..., help="The new task's name: a lower-case identifier not used yet."),
    dataset: str | None = typer.Option(None, "--dataset", help="A built-in dataset (mnist5k, optdigits, lfw_faces, "
                                       "textures, fashion_mnist, animal_mnist) or an image-folder directory (one "
                                       "sub-directory of images per class)."),
    torchvision: str | None = typer.Option(None, "--torchvision", help="A torchvision.datasets class (e.g. CIFAR10) "
                                           "read from --root, instead of --dataset."),
    root: str | None = typer.Option(None, "--root", help="The --torchvision class's directory."),
    image_size: int | None = typer.Option(None, help="Image side in pixels (default: the backbone's)."),
    channels: int | None = typer.Option(None, help="The images' channels, 1 or 3 (default: the backbone's)."),
    max_train: int | None = typer.Option(None, help="Cap on the training split (stratified)."),
    spare_ratio: float | None = typer.Option(None, help="Share of PEs replaced by spare PEs, in (0, 1] (default 0.1)."),
    shift_levels: int | None = typer.Option(None, help="Column-mask shift levels 0..3 (default 3)."),
    epochs: int | None = typer.Option(None, help="Training epochs (default 3)."),
    method: str | None = typer.Option(None, help="xma2, xma, xbm, piggyback, finetune_shared, finetune_separate "
                                      "(default xma2)."),
) -> None:
    """Add a task to params.yaml and learn it now (the `new-task` Prefect flow; waits for a running one).
    Dataset roots must lie under the project or a directory listed in XBAR_DATA_DIRS."""
    from pathlib import Path

    from flows.add_task import NewTask, plan_new_task
    from xbar.params import BUILTIN_DATASETS

    if (dataset is None) == (torchvision is None):
        raise UserError("give either --dataset (a built-in name or an image folder) or --torchvision CLASS --root DIR")
    files = {k: v for k, v in dict(image_size=image_size, channels=channels, max_train=max_train).items()
             if v is not None}
    if torchvision is not None:
        if root is None:
            raise UserError("--torchvision needs --root (the directory holding the class's files)")
        chosen: str | dict = {"name": torchvision, "root": root, **files}
    elif root is not None:
        raise UserError("--root goes with --torchvision; an image folder is given as --dataset DIR")
    elif dataset in BUILTIN_DATASETS:
        if files:
            raise UserError(f"--{next(iter(files)).replace('_', '-')}: applies to an image folder or a torchvision "
                            f"class, not to the built-in dataset {dataset!r}")
        chosen = dataset
    elif "/" in dataset or Path(dataset).is_dir():
        chosen = {"root": dataset, **files}
    else:
        raise UserError(f"--dataset: {dataset!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                        "nor a directory")
    given = dict(spare_ratio=spare_ratio, shift_levels=shift_levels, epochs=epochs, method=method)
    task = NewTask.parse(name=name, dataset=chosen, **{k: v for k, v in given.items() if v is not None})
    plan_new_task(Path("params.yaml"), task)  # refuse bad input here, before Prefect starts

    from prefect.exceptions import FailedRun

    from flows.dvc import StageFailed
    from flows.new_task import new_task
    from flows.signals import stoppable

    try:
        with stoppable("add-task"):  # Ctrl-C / SIGTERM: stopped in seconds, one line, nothing left running
            result = new_task(**task.model_dump(exclude_none=True))
    except StageFailed as err:  # the run failed and was rolled back: not an input error
        print(f"error: {err} (params.yaml and dvc.lock restored)", file=sys.stderr)
        raise typer.Exit(1) from None
    except FailedRun as err:  # refused inside the flow (e.g. the name was taken while we waited)
        raise UserError(str(err)) from None
    print(f"task {result['task']!r} learned after {result['after']!r}; MLflow parent run "
          f"{result['mlflow_parent_run_id']}")


@app.command()
@one_line_errors
def serve(limit: int = typer.Option(1, min=1, help="Flow runs executed at once (the workspace lock "
                                                    "serializes DVC anyway).")) -> None:
    """Serve the `new-task/add-task`, `compare/compare` and `continual/pipeline` deployments for the Prefect UI
    (Ctrl-C stops)."""
    from pathlib import Path

    from xbar.params import load_params

    load_params(Path("params.yaml"))  # served runs start here: refuse a wrong directory now
    from flows.new_task import serve as serve_flows
    from flows.signals import stoppable, stopped_serving

    with stoppable("serve"):
        serve_flows(limit)
    stopped_serving()  # it returns only when stopped


def _number_or_word(text: str) -> float | str:
    """A command-line value that is a number or a word (e.g. --adc-clip 99.9 or mse)."""
    try:
        return float(text)
    except ValueError:
        return text.strip()


def _list_option(values: list[str] | None) -> list[str] | None:
    """A list option given repeated and/or comma-separated: ["a,b", "c"] -> ["a", "b", "c"]."""
    return None if not values else [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command()
@one_line_errors
def compare(
    methods: list[str] | None = typer.Option(None, "--methods", help="Methods to compare, repeated or "
                                             "comma-separated (default: all six)."),
    ratios: list[str] | None = typer.Option(None, "--ratios", help="XMA2's spare-PE ratios P as shares, e.g. "
                                            "0.05,0.1,0.2,0.4 (the default)."),
    dask: bool = typer.Option(False, "--dask", help="Fan out over a local Dask cluster instead of threads."),
    dask_address: str | None = typer.Option(None, "--dask-address", help="Fan out over a running Dask "
                                            "scheduler, e.g. tcp://10.0.0.5:8786."),
    workers: int | None = typer.Option(None, min=1, help="Configurations at once (threads or local Dask "
                                       "workers; default: CPU cores / train.threads)."),
    seeds: list[str] | None = typer.Option(None, "--seeds", help="Seeds, repeated or comma-separated: every "
                                           "configuration runs once per seed (default: 3 seeds from params.yaml's)."),
    bn_ablation: str | None = typer.Option(None, "--bn-ablation", help="Also run every mask method with this BN "
                                           "rule (frozen or per_task), next to params.yaml's train.bn."),
    shift_levels: list[str] | None = typer.Option(None, "--shift-levels", help="The paper's Table 2: XMA and XMA2 "
                                                  "once per number of shift levels N, e.g. 0,1,2,3."),
    chip_instances: int = typer.Option(2, "--chip-instances", help="Chip instances per configuration for the chip "
                                       "column (5-bit ADC, params.yaml's device); 0: no chip column."),
    chip_images: int = typer.Option(200, "--chip-images", help="Test images per task on the chip (a seeded "
                                    "subset; the chip forward is ~12x the ideal one); 0: the whole test split."),
    chip_sweeps: bool = typer.Option(False, "--chip-sweeps", help="Also accuracy on the chip against ADC bits "
                                     "4..8, device noise and time since programming (chip_sweeps.png)."),
) -> None:
    """Every method (XMA2 at each spare-PE ratio) learns every task of params.yaml in order, one Prefect task
    per configuration (and seed); writes artifacts/comparison/ and one MLflow run (needs the backbone: `make run`)."""
    from pathlib import Path

    from flows.compare import plan_comparison

    try:
        shares = None if ratios is None else [float(r) for r in _list_option(ratios) or []]
    except ValueError:
        raise UserError(f"--ratios: expected shares such as 0.1, got {' '.join(ratios)!r}") from None
    try:
        seed_list = None if seeds is None else [int(s) for s in _list_option(seeds) or []]
    except ValueError:
        raise UserError(f"--seeds: expected whole numbers such as 0,1,2, got {' '.join(seeds)!r}") from None
    if seed_list is not None:
        from xbar.stats import check_seeds

        check_seeds(seed_list, "--seeds")
        if min(seed_list) < 0:
            raise UserError("--seeds: expected whole numbers >= 0")
    if chip_instances < 0:
        raise UserError(f"--chip-instances: {chip_instances} is below 0 (0: no chip column)")
    if chip_images < 0:
        raise UserError(f"--chip-images: {chip_images} is below 0 (0: the whole test split)")
    names = _list_option(methods)
    if bn_ablation is not None:
        from xbar.params import BnRule, check_value

        check_value(BnRule, bn_ablation, "--bn-ablation")
    try:
        levels = None if shift_levels is None else [int(n) for n in _list_option(shift_levels) or []]
    except ValueError:
        raise UserError(f"--shift-levels: expected whole numbers 0..3, got {' '.join(shift_levels)!r}") from None
    plan_comparison(Path.cwd(), names, shares, bn_ablation, levels)  # refuse bad input here, before Prefect starts

    from prefect.exceptions import FailedRun

    from flows.compare import run_comparison
    from flows.signals import stoppable

    try:
        with stoppable("compare"):
            result = run_comparison(names, shares, dask, dask_address, workers, seed_list, bn_ablation, levels,
                                    chip_instances, chip_images or None, chip_sweeps)
    except FailedRun as err:  # refused inside the flow (params.yaml or the backbone changed meanwhile)
        raise UserError(str(err)) from None
    tasks = [t for t in next(iter(result["accuracy"].values())) if t != "mean"]
    print("test accuracy (%) after the last task:")
    chip = result.get("chip") or {}
    print(f"{'':20s}" + "".join(f"{t:>12s}" for t in [*tasks, "mean"]) + (f"{'chip mean':>12s}" if chip else ""))
    for label, accs in result["accuracy"].items():
        print(f"{label:20s}" + "".join(f"{accs[t]:12.2f}" for t in [*tasks, "mean"])
              + (f"{chip[label]:12.2f}" if label in chip else ""))
    if chip:
        print(f"chip mean: on {chip_instances} chip instance(s), 5-bit ADC, params.yaml's device, "
              f"{chip_images or 'all'} test images per task (ideal on the same images: table.md)")
    for line in result.get("failures") or []:  # one line each; the others' results are written
        print(f"failed: {line}")
    print(f"tables and plots in {result['folder']}/ (mean ± 95% CI over seeds and paired differences: table.md); "
          f"MLflow run {result['mlflow_run_id']}")


if __name__ == "__main__":
    app()
