"""Stage rank_pes (per task): score every backbone PE on one mini-batch of the new task (tier-1 PE mask)."""

from __future__ import annotations

import time

from workflow.attempts import stage_attempt
from workflow.backbone import load_backbone
from workflow.io import (atomic_write_bytes, save_parquet, stage_main, task_dir, task_metrics,
                           write_json)
from xbar import step
from xbar.data import load_task_data
from xbar.methods import check_spec
from xbar.params import Params
from xbar.plots import pe_ranking, png
from xbar.training import seed_everything


def run(params: Params, task: str) -> None:
    spec = params.tasks[task]
    seed_everything(params.seed, params.train.threads)
    data = load_task_data(spec.dataset, params.seed)
    check_spec(spec, len(data.train), data.num_classes)  # before reading the backbone: a user's mistake comes first
    backbone = load_backbone()
    start = time.perf_counter()
    table, loss = step.rank(params, spec, backbone, data)
    selected = table.filter("selected")
    save_parquet(task_dir(task) / "ranking.parquet", table)
    atomic_write_bytes(task_dir(task) / "ranking.png", png(pe_ranking(table, task)))
    write_json(task_metrics(task, "rank"), {
        "pes": table.height, "selected": selected.height, "spare_ratio": spec.spare_ratio,
        "batch_size": spec.rank_batch_size, "batch_loss": round(loss, 4),
        "selected_per_layer": dict(selected.group_by("layer").len().sort("layer").iter_rows()),
        "selected_score_share": round(float(selected["score"].sum()), 4),
        "seconds": round(time.perf_counter() - start, 2), "data_digest": data.digest,
    })
    print(f"rank_pes {task}: {selected.height} of {table.height} PEs selected "
          f"({float(selected['score'].sum()):.1%} of the score)")


if __name__ == "__main__":
    stage_main(run, task_arg=True, around=stage_attempt)
