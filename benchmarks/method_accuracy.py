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
import time

import polars as pl

from benchmarks.records import save_record
from workflow.backbone import load_backbone
from xbar.comparison_stats import paired_table, seed_table, statistics_markdown
from xbar.methods.presets import RECIPES
from xbar.stats import check_seeds
from xbar.compare import accuracy_table, comparison_table, configurations, markdown, run_configuration
from xbar.methods import names
from xbar.params import FIRST_AFTER, Params, load_params, parse_params


def with_tasks(params: Params, tasks: list[str], seed: int, recipe: str | None = None,
               epochs: int | None = None) -> Params:
    """`params` with only `tasks` (in this order, re-chained), another seed, and optionally another recipe
    and every task's epochs."""
    raw = params.model_dump()
    if recipe:
        raw["train"]["recipe"] = recipe
    unknown = [t for t in tasks if t not in raw["tasks"]]
    if unknown:
        raise SystemExit(f"--tasks: {unknown[0]!r} is not a task of params.yaml ({', '.join(raw['tasks'])})")
    chosen, after = {}, FIRST_AFTER
    for name in tasks:
        chosen[name] = raw["tasks"][name] | {"after": after} | ({"epochs": epochs} if epochs else {})
        after = name
    return parse_params(raw | {"tasks": chosen, "seed": seed})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--methods", nargs="+", default=list(names()), choices=names())
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1], help="spare-PE ratios (methods with spare PEs)")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: params.seed")
    parser.add_argument("--recipe", choices=RECIPES, default=None, help="default: params.yaml's train.recipe")
    parser.add_argument("--epochs", type=int, default=None, help="every task's epochs (default: params.yaml's)")
    parser.add_argument("--record", default=None, help="also write benchmarks/records/NAME.json (mean ± 95%% CI)")
    args = parser.parse_args()
    seeds = list(check_seeds(args.seeds if args.seeds is not None else [load_params(args.params).seed]))
    began = time.perf_counter()
    params = load_params(args.params)
    backbone = load_backbone(fp32=True)
    tables = []
    per_seed = []
    for seed in seeds:
        run = with_tasks(params, args.tasks or list(params.tasks), seed, args.recipe, args.epochs)
        results = []
        for config in configurations(args.methods, args.ratios, recipe=run.train.recipe):
            result = run_configuration(run, config, backbone)
            if result.failure:
                print(f"seed {seed} {config.label:18s} failed: {result.failure}", flush=True)
                continue
            results.append(result)
            rows = result.tasks.iter_rows(named=True)
            print(f"seed {seed} {config.label:18s} " + "  ".join(
                f"{r['task']} {r['accuracy_at_learn']:.2f} ({r['seconds']:.0f} s)" for r in rows), flush=True)
        tables.append(comparison_table(results)[0])
        per_seed.append(tables[-1].with_columns(seed=pl.lit(seed)))
    mean = (pl.concat(tables).group_by("label", "task", maintain_order=True)
            .agg(pl.col("order").first(), pl.col("accuracy_at_learn", "accuracy_final").mean()))
    print("\ntest accuracy (%) when learned, mean over seeds")
    print(markdown(accuracy_table(mean, "accuracy_at_learn")))
    print("\ntest accuracy (%) after the last task, mean over seeds")
    print(markdown(accuracy_table(mean, "accuracy_final")))
    rows = pl.concat(per_seed, how="diagonal_relaxed")
    print("\n" + statistics_markdown(rows))
    seconds = time.perf_counter() - began
    print(f"wall time: {seconds:.0f} s")
    if args.record:
        save_record(args.record, recipe=args.recipe or params.train.recipe, seeds=seeds,
                    rows=[{k: v for k, v in r.items() if k not in ("mean", "ci95", "n")}
                          | {"accuracy": {"mean": r["mean"], "ci95": r["ci95"], "n": r["n"]}}
                          for r in seed_table(rows).to_dicts()],
                    title=f"Test accuracy (%) per method and task, mean ± 95% CI over {len(seeds)} seed(s)",
                    notes=f"tasks {', '.join(args.tasks or params.tasks)}; epochs "
                          f"{args.epochs or 'as params.yaml'}; wall time {seconds:.0f} s",
                    paired=paired_table(rows).to_dicts())


if __name__ == "__main__":
    main()
