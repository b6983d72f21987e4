"""Test accuracy of every method on every task of params.yaml, side by side, averaged over seeds (nothing is written).

    python -m benchmarks.method_accuracy [--methods xma2 xma piggyback] [--tasks mnist textures] [--seeds 0 1] [--ratios 0.1]

Needs artifacts/backbone/quant.pt and levels.pt (dvc repro quantize). The
in-process comparison of `xbar compare` (xbar.compare.run_configuration), one
configuration after the other in this process, for several seeds and a subset
of the tasks (learned in the given order); prints the accuracy when learned and
after the last task (finetune_shared's forgetting), and their means over seeds.
"""

from __future__ import annotations

import argparse

import polars as pl

from workflow.backbone import load_backbone
from xbar.compare import accuracy_table, comparison_table, configurations, markdown, run_configuration
from xbar.methods import names
from xbar.params import FIRST_AFTER, Params, load_params, parse_params


def with_tasks(params: Params, tasks: list[str], seed: int) -> Params:
    """`params` with only `tasks` (in this order, re-chained) and another seed."""
    raw = params.model_dump()
    unknown = [t for t in tasks if t not in raw["tasks"]]
    if unknown:
        raise SystemExit(f"--tasks: {unknown[0]!r} is not a task of params.yaml ({', '.join(raw['tasks'])})")
    chosen, after = {}, FIRST_AFTER
    for name in tasks:
        chosen[name] = raw["tasks"][name] | {"after": after}
        after = name
    return parse_params(raw | {"tasks": chosen, "seed": seed})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--methods", nargs="+", default=list(names()), choices=names())
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1], help="spare-PE ratios (methods with spare PEs)")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: params.seed")
    args = parser.parse_args()
    params = load_params(args.params)
    backbone = load_backbone(fp32=True)
    tables = []
    for seed in args.seeds or [params.seed]:
        run = with_tasks(params, args.tasks or list(params.tasks), seed)
        results = []
        for config in configurations(args.methods, args.ratios):
            results.append(result := run_configuration(run, config, backbone))
            rows = result.tasks.iter_rows(named=True)
            print(f"seed {seed} {config.label:18s} " + "  ".join(
                f"{r['task']} {r['accuracy_at_learn']:.2f} ({r['seconds']:.0f} s)" for r in rows), flush=True)
        tables.append(comparison_table(results)[0])
    mean = (pl.concat(tables).group_by("label", "task", maintain_order=True)
            .agg(pl.col("order").first(), pl.col("accuracy_at_learn", "accuracy_final").mean()))
    print("\ntest accuracy (%) when learned, mean over seeds")
    print(markdown(accuracy_table(mean, "accuracy_at_learn")))
    print("\ntest accuracy (%) after the last task, mean over seeds")
    print(markdown(accuracy_table(mean, "accuracy_final")))


if __name__ == "__main__":
    main()
