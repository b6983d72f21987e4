"""Stage deploy_backbone: the backbone on the chip -- where every weight sits, and the freshly deployed chip.

Writes the crossbar mapping of the backbone (artifacts/mapping/crossbars.parquet: one row per crossbar,
layers.parquet: one row per layer; metrics/map.json) and artifacts/tasks/backbone/deployment.json, the
deployment state the first task starts from (xbar.chip; backbone PEs holding levels.pt, blank spare PEs,
no tensor file: nothing is re-programmed yet). The chip is built with crossbar.spare_pe_ratio x (backbone
PEs) spare PEs; a task with spare PEs may ask for at most that share (params validation).
"""

from __future__ import annotations

from workflow.io import BACKBONE, MAPPING, METRICS, load_torch, save_parquet, stage_main, task_dir, write_json
from xbar.chip.deployment import chip_files, new_chip
from xbar.chip.layout import ChipLayout, backbone_mapping
from xbar.crossbar import spare_pe_count
from xbar.params import FIRST_AFTER, Params


def run(params: Params) -> None:
    levels_pt = load_torch(BACKBONE / "levels.pt")
    mapping = backbone_mapping(params.model, params.crossbar, levels_pt)
    chip = new_chip(ChipLayout(mapping), {n: e["levels"] for n, e in levels_pt.items()},
                    spare_pe_count(params.crossbar.spare_pe_ratio, mapping.n_pes))
    meta, _ = chip_files(chip, None)
    crossbars, spec = mapping.crossbar_table(), mapping.spec
    save_parquet(MAPPING / "crossbars.parquet", crossbars)
    save_parquet(MAPPING / "layers.parquet", mapping.layer_table())
    write_json(METRICS / "map.json", {
        "layers": len(mapping.layers), "crossbars": mapping.n_crossbars, "pes": mapping.n_pes,
        "columns": mapping.n_columns, "weights": mapping.n_weights, "cells_used": mapping.n_cells_used,
        "cells_available": mapping.n_crossbars * spec.rows * spec.cols,
        # mean over crossbars = cells used / cells of the crossbars used (every crossbar has the same size)
        "mean_utilization": round(float(crossbars["utilization"].mean()), 4),
        "min_utilization": round(float(crossbars["utilization"].min()), 4),
    })
    write_json(task_dir(FIRST_AFTER) / "deployment.json", meta)
    print(f"deploy_backbone: {len(mapping.layers)} layers on {mapping.n_crossbars} crossbars / {chip.n_pes} PEs "
          f"({mapping.n_columns} columns, utilization {mapping.utilization:.1%}) + {chip.n_slots} blank spare PEs")


if __name__ == "__main__":
    stage_main(run)
