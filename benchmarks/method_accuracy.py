"""Test accuracy of every method on every task of params.yaml, side by side (nothing is written).

    python -m benchmarks.method_accuracy [--methods xma2 xma piggyback] [--tasks mnist faces] [--seeds 0 1]

Needs artifacts/backbone/quant.pt and levels.pt (dvc repro quantize). Each
method learns each task from the backbone, exactly as stage train_masks does
(xma2 with its own PE ranking); finetune_shared goes through the tasks in
order and also reports the accuracy of earlier tasks after the last one.
"""

from __future__ import annotations

import argparse
import statistics
import time

from stages.common import BACKBONE, load_torch
from xbar.crossbar import map_model
from xbar.data import load_task_data
from xbar.methods import (backbone_net, build_task_model, crossbar_spec, deploy_cells, export_task,
                          load_task_model, shared_view, train_task)
from xbar.params import METHODS, load_params
from xbar.ranking import rank_batch, rank_pes
from xbar.training import accuracy, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: params.seed")
    args = parser.parse_args()
    params = load_params(args.params)
    tasks = args.tasks or list(params.tasks)
    quant, levels = load_torch(BACKBONE / "quant.pt"), load_torch(BACKBONE / "levels.pt")
    n_pes = map_model(backbone_net(params, quant), crossbar_spec(params)).n_pes
    results: dict[str, dict[str, list[float]]] = {m: {t: [] for t in tasks} for m in args.methods}
    for seed in args.seeds or [params.seed]:
        run = params.model_copy(update={"seed": seed})
        shared: dict[str, dict] = {}
        for task in tasks:
            data = load_task_data(params.tasks[task].dataset, seed)
            for method in args.methods:
                spec = params.tasks[task].model_copy(update={"method": method})
                seed_everything(seed, params.train.threads)
                spare = None
                if method == "xma2":
                    net = backbone_net(run, quant)
                    deploy_cells(net, levels, crossbar_spec(run))
                    images, labels = rank_batch(data.train, spec.rank_batch_size, seed)
                    table, _ = rank_pes(net, images, labels, data.num_classes, spec.spare_ratio)
                    spare = table.filter("selected")["pe"].to_list()
                start = list(shared.values())[-1] if method == "finetune_shared" and shared else None
                began = time.perf_counter()
                model = build_task_model(run, spec, quant, levels, data.num_classes, spare_pes=spare, start=start)
                train_task(model, data.train, spec, run.train, seed, f"{task} {method} seed {seed}")
                exported = export_task(model, data.num_classes, data.channels)
                acc = accuracy(load_task_model(exported, levels, run).net, data.test)
                results[method][task].append(acc)
                if method == "finetune_shared":
                    shared[task] = exported
                print(f"seed {seed} {task:10s} {method:18s} {acc:6.2f}  ({time.perf_counter() - began:.0f} s)", flush=True)
        if len(shared) > 1:  # catastrophic forgetting of the shared network
            latest = list(shared.values())[-1]
            for task, exported in list(shared.items())[:-1]:
                data = load_task_data(params.tasks[task].dataset, seed)
                acc = accuracy(load_task_model(shared_view(exported, latest), levels, run).net, data.test)
                print(f"seed {seed} finetune_shared: {task} after {tasks[-1]}: {acc:.2f} "
                      f"(was {results['finetune_shared'][task][-1]:.2f})")
    print(f"\n{'method':18s} " + " ".join(f"{t:>10s}" for t in tasks) + "       mean")
    for method in args.methods:
        means = [statistics.mean(results[method][t]) for t in tasks]
        print(f"{method:18s} " + " ".join(f"{m:10.2f}" for m in means) + f" {statistics.mean(means):10.2f}")
    print(f"(PEs: {n_pes}; seeds: {args.seeds or [params.seed]})")


if __name__ == "__main__":
    main()
