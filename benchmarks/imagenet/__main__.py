"""The RGB benchmark: EfficientNet-Lite0 with ImageNet weights, quantized, on four new tasks from images that
packages ship (benchmarks/imagenet/params.yaml).

    python -m benchmarks.imagenet [--methods xma2 xma piggyback finetune_separate] [--ratios 0.1]
                                  [--params benchmarks/imagenet/params.yaml] [--workdir artifacts/imagenet] [--fresh]

It runs in a workspace of its own (the default pipeline's params.yaml and artifacts stay as they are): the
params file is copied there as params.yaml; the stages pretrain and quantize build the backbone there (skipped
when the same params file built it before; --fresh builds it again); then the comparison of `xbar compare`
(xbar.compare.run_configuration) learns every task with every configuration, one after the other in this
process, and writes comparison/table.md, table.csv, accuracy.csv and matrix.csv there. A configuration
whose training the recipe's guards refuse (divergence, a loss above the closed-form head's) is reported as
failed, with the guard's message, and the others go on.

It prints the accuracy table, then the paper's claim, checked without tuning: XMA2's gain over XMA is largest
on the task farthest from the source. "Farthest" is measured as benchmarks.domain_distance does, on the
deployed backbone's features: the Frechet distance between the task's test images and the source's, and the
linear probe's accuracy (the two can disagree).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import polars as pl

from xbar.compare import accuracy_table, comparison_table, configurations, markdown, report_markdown, run_configuration
from xbar.errors import UserError
from xbar.params import Params, load_params

HERE = Path(__file__).resolve().parent
PARAMS = HERE / "params.yaml"
METHODS = ("xma2", "xma", "piggyback", "finetune_separate")
DISTANCE_IMAGES = 500  # test images per task (and of the source) whose features measure the distance


def build_backbone(params: Params, params_text: str, fresh: bool) -> None:
    """pretrain + quantize in the workspace (the current directory), unless this params file built it."""
    from stages.pretrain import pretrain
    from stages.quantize import quantize
    from workflow.io import BACKBONE

    built = Path("params.yaml")
    done = all((BACKBONE / f).exists() for f in ("quant.pt", "levels.pt"))
    if not fresh and done and built.exists() and built.read_text() == params_text:
        print(f"backbone: {BACKBONE}/ was built from this params file (--fresh builds it again)")
        return
    built.write_text(params_text)
    for stage in (pretrain, quantize):
        began = time.perf_counter()
        stage(params)
        print(f"  ({time.perf_counter() - began:.0f} s)", flush=True)


def kept(row: dict) -> str:
    """The kept checkpoint for the progress line: 'step 0/120, ' (step 0: the closed-form head), or '' when
    no images were held out (the last step was kept)."""
    return "" if row.get("kept_step") is None else f"step {row['kept_step']}/{row['optimizer_steps']}, "


def distances(params: Params) -> pl.DataFrame:
    """Per task: Frechet distance of its test features to the source's, and the linear probe's accuracy."""
    from benchmarks.domain_distance import features, frechet_distance
    from workflow.io import BACKBONE, load_torch
    from xbar.data import load_task_data
    from xbar.methods import backbone_net, crossbar_spec, deploy_cells, ridge_head
    from xbar.training import seed_everything

    seed_everything(params.seed, params.train.threads)
    net = backbone_net(params, load_torch(BACKBONE / "quant.pt"))
    deploy_cells(net, load_torch(BACKBONE / "levels.pt"), crossbar_spec(params))
    net.eval()
    source, _ = features(net, load_task_data(params.source.dataset, params.seed).test, DISTANCE_IMAGES, params.seed)
    rows = []
    for name, spec in params.tasks.items():
        data = load_task_data(spec.dataset, params.seed)
        train_f, train_y = features(net, data.train, DISTANCE_IMAGES, params.seed)
        test_f, test_y = features(net, data.test, DISTANCE_IMAGES, params.seed)
        weight, bias = ridge_head(train_f, train_y, data.num_classes)
        probe = float(((test_f @ weight.T + bias).argmax(1) == test_y).double().mean()) * 100
        rows.append({"task": name, "frechet_distance": frechet_distance(source, test_f), "linear_probe": probe})
    return pl.DataFrame(rows)


def claim(accuracy: pl.DataFrame, distance: pl.DataFrame, xma2: str) -> str:
    """XMA2's gain over XMA per task beside the task's distance; whether the largest gain is on the farthest."""
    acc = {r["label"]: r for r in accuracy.iter_rows(named=True)}
    if xma2 not in acc or "xma" not in acc:
        return "(the claim needs xma and xma2 in --methods)"
    table = distance.with_columns(gain=pl.Series([acc[xma2][t] - acc["xma"][t] for t in distance["task"]]))
    farthest = table.sort("frechet_distance")["task"][-1]
    weakest_probe = table.sort("linear_probe")["task"][0]
    largest = table.sort("gain")["task"][-1]
    verdict = (f"largest gain of {xma2} over xma: {largest}; farthest task by Frechet distance: {farthest}, by the "
               f"linear probe: {weakest_probe} -> the claim {'holds' if largest == farthest else 'does not hold'} "
               f"by distance, {'holds' if largest == weakest_probe else 'does not hold'} by the probe")
    return markdown(table.with_columns(pl.col(pl.Float64).round(2)), digits=6) + "\n\n" + verdict


def main(argv: list[str] | None = None) -> pl.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.imagenet")
    parser.add_argument("--params", default=str(PARAMS))
    parser.add_argument("--workdir", default="artifacts/imagenet", help="the benchmark's workspace")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1], help="spare-PE ratios (methods with spare PEs)")
    parser.add_argument("--fresh", action="store_true", help="build the backbone again")
    args = parser.parse_args(argv)
    params_path = Path(args.params).resolve()
    params = load_params(params_path)
    configs = configurations(args.methods, args.ratios, recipe=params.train.recipe)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    began, home = time.perf_counter(), Path.cwd()
    os.chdir(workdir)  # the stages and the comparison write under the workspace
    try:
        build_backbone(params, params_path.read_text(), args.fresh)
        from workflow.backbone import load_backbone

        backbone = load_backbone(fp32=True)
        results, failed = [], {}
        for config in configs:
            # a configuration stops at its first task whose training the guards refuse (xbar.methods.recipe)
            result = run_configuration(params, config, backbone)
            if result.failure:
                failed[config.label] = result.failure
                print(f"{config.label:18s} failed: {result.failure}", flush=True)
                continue
            results.append(result)
            print(f"{config.label:18s} " + "  ".join(f"{r['task']} {r['accuracy_at_learn']:.2f} ({kept(r)}{r['seconds']:.0f} s)"
                                                     for r in result.tasks.iter_rows(named=True)), flush=True)
        folder = Path("comparison")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        failures = "".join(f"\n- {label}: {why}" for label, why in failed.items())
        if not results:
            (folder / "table.md").write_text(f"# Method comparison\n\n## Configurations that failed\n{failures}\n")
            raise UserError("every configuration failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        table, matrix = comparison_table(results)
        accuracy = accuracy_table(table)
        (folder / "table.csv").write_text(table.write_csv())
        (folder / "accuracy.csv").write_text(accuracy.write_csv())
        (folder / "matrix.csv").write_text(matrix.write_csv())
        xma2 = next((c.label for c in configs if c.method == "xma2"), "xma2")
        check = claim(accuracy, distances(params), xma2)
        (folder / "table.md").write_text(report_markdown(table) + "\n## The paper's claim: XMA2's gain over XMA "
                                         "against the task's distance from the source\n\n" + check + "\n"
                                         + (f"\n## Configurations that failed\n{failures}\n" if failed else ""))
    finally:
        os.chdir(home)
    print("\ntest accuracy (%) after the last task\n" + markdown(accuracy.with_columns(pl.col(pl.Float64).round(2)), 6))
    print("\n" + check + (f"\n\nfailed:{failures}" if failed else ""))
    print(f"\n{workdir / 'comparison'}/table.md; {time.perf_counter() - began:.0f} s in all")
    return table


if __name__ == "__main__":
    import sys

    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
