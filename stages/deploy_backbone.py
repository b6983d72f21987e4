"""Stage deploy_backbone: the freshly deployed chip -- backbone PEs holding levels.pt, blank spare PEs.

Writes artifacts/tasks/backbone/deployment.json, the deployment state the first
task starts from (xbar.chip.deployment; no tensor file: nothing is re-programmed yet).
The chip is built with crossbar.spare_pe_ratio x (backbone PEs) spare PEs; an
xma2 task may ask for at most that share (params validation).
"""

from __future__ import annotations

from workflow.io import BACKBONE, load_torch, stage_main, task_dir, write_json
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
    write_json(task_dir(FIRST_AFTER) / "deployment.json", meta)
    print(f"deploy_backbone: {chip.n_pes} backbone PEs + {chip.n_slots} blank spare PEs "
          f"({chip.spec.cells_per_pe} cells each)")


if __name__ == "__main__":
    stage_main(run)
