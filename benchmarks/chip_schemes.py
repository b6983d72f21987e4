"""The chip's key figures on the learned tasks: accuracy at a 5-bit ADC with params.yaml's device against
the ideal accuracy, per signed-weight scheme, ADC range rule and clip, over M chip instances (mean and
95% CI), and the device-caused forgetting over S switches back. Writes benchmarks/records/chip_schemes.json.

    python -m benchmarks.chip_schemes [--instances 5] [--images 500] [--switches 3] [--tasks a,b]
        [--schemes offset,offset_ref,differential] [--rules full,per_layer,per_crossbar,per_column]
        [--clips 100,mse] [--configs offset:per_column:100,...] [--verify 0,0.05] [--notes TEXT]

Run it in a project whose pipeline has run (artifacts/backbone/levels.pt, artifacts/tasks/*/task.pt). The
tasks are evaluated on a seeded subset of `--images` test images each (the ideal accuracy on the same
images); the ADC ranges are calibrated on chip.calibration_images training images. A scheme here changes
how the cells hold the weights on the PEs the tasks were learned on (xbar chip --signed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.records import save_record
from workflow.io import BACKBONE, load_torch, task_dir
from xbar.chip.adc import check_clip
from xbar.chip.evaluate import chip_settings, evaluate_tasks
from xbar.chip.sweep import PAPER_ADC_BITS, subset_of
from xbar.data import load_task_data
from xbar.errors import UserError
from xbar.params import load_params
from xbar.training import seed_everything


def _clip(text: str) -> float | str:
    try:
        return check_clip(float(text), "--clips")
    except ValueError:
        return check_clip(text, "--clips")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--switches", type=int, default=3)
    parser.add_argument("--schemes", default="offset,offset_ref,differential")
    parser.add_argument("--rules", default="full,per_layer,per_crossbar,per_column")
    parser.add_argument("--clips", default="100,mse")
    parser.add_argument("--configs", default="", help="scheme:rule:clip,... instead of the grid")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: every learned one)")
    parser.add_argument("--notes", default="", help="what was measured (the project state, the load)")
    parser.add_argument("--verify", default="0", help="program-and-verify tolerances (levels) for the switches")
    parser.add_argument("--record", default="chip_schemes", help="the record's name")
    args = parser.parse_args()
    params = load_params(Path(args.params))
    seed_everything(params.seed, params.train.threads)
    wanted = set(args.tasks.split(",")) if args.tasks else set(params.tasks)
    learned = [n for n in params.tasks if n in wanted and (task_dir(n) / "task.pt").exists()]
    if not learned:
        raise UserError("no learned task (artifacts/tasks/<task>/task.pt): run the pipeline first")
    levels = load_torch(BACKBONE / "levels.pt")
    tasks = {n: load_torch(task_dir(n) / "task.pt") for n in learned}
    data = {n: subset_of(load_task_data(params.tasks[n].dataset, params.seed), args.images, params.seed)
            for n in learned}
    device, base = chip_settings(params, adc_bits=PAPER_ADC_BITS)
    settings = [("full", 100.0)] if "full" in args.rules.split(",") else []
    settings += [(r, _clip(c)) for r in args.rules.split(",") if r != "full" for c in args.clips.split(",")]
    configs = [(s, r, c) for s in args.schemes.split(",") for r, c in settings]
    if args.configs:
        configs = [(s, r, _clip(c)) for s, r, c in (item.split(":") for item in args.configs.split(","))]
    recipe = {"hw_aware": params.train.hw_aware, "aware": params.chip.aware, "device": device.name,
              "adc_bits": PAPER_ADC_BITS, "tasks": learned, "methods": sorted({t["method"] for t in tasks.values()}),
              "model": params.model.name}

    def save(rows: list[dict]) -> None:  # after every setting: a cut run keeps what it measured
        save_record(args.record, recipe=recipe, seeds=[params.seed], rows=rows, notes=args.notes,
                    title="XMA2 on the chip: 5-bit ADC, the device of params.yaml, per signed scheme and ADC range")

    rows = []
    for scheme, rule, clip in configs:
        adc = replace(base, range=rule, clip=clip, signed=scheme).check()
        start = time.perf_counter()
        res = evaluate_tasks(params, tasks, levels, data, device, adc, args.instances, params.chip.time_s)
        gaps = [r["ideal"] - r["chip_mean"] for r in res.values()]
        row = {"signed": scheme, "adc_range": rule, "adc_clip": clip, "device": device.name,
               "adc_bits": adc.bits, "instances": args.instances, "images": args.images,
               "mean_gap": round(statistics.fmean(gaps), 2), "worst_gap": round(max(gaps), 2),
               **{f"{n}_{k}": r[k] for n, r in res.items() for k in ("ideal", "chip_mean", "chip_ci")},
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        save(rows)
        print(f"{scheme:12s} {adc.rule:22s} gap mean {row['mean_gap']:6.2f} worst {row['worst_gap']:6.2f}  "
              + "  ".join(f"{n} {r['chip_mean']:.1f}±{r['chip_ci']:.1f}/{r['ideal']:.1f}" for n, r in res.items())
              + f"  ({row['seconds']} s)", flush=True)
    for tol in [float(v) for v in args.verify.split(",")] if args.switches else []:
        chip = params.chip.model_copy(update={"verify_tolerance": tol})
        res = evaluate_tasks(params.model_copy(update={"chip": chip}), tasks, levels, data, device, base,
                             args.instances, params.chip.time_s, switches=args.switches)
        for n, r in res.items():
            rows.append({"signed": base.signed, "adc_range": base.range, "adc_clip": base.clip, "task": n,
                         "verify_tolerance": tol, "switch_back": r["switch_back"],
                         "device_forgetting": r["device_forgetting"], "device_forgetting_ci": r["device_forgetting_ci"],
                         "verify_writes": r.get("verify_writes", 0), "verify_j": r.get("verify_j", 0.0),
                         "instances": args.instances})
            save(rows)
            print(f"forgetting {n} (verify {tol:g}): readings {r['switch_back']} -> worst drop "
                  f"{r['device_forgetting']:.2f} ± {r['device_forgetting_ci']:.2f}, verify re-writes "
                  f"{r.get('verify_writes', 0)} ({r.get('verify_j', 0.0):.3g} J)", flush=True)
    save(rows)


if __name__ == "__main__":
    main()
