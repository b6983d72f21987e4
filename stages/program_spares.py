"""Stage program_spares (per task): program the chip for the task, then account the switches that
evaluating every earlier task costs.

Starts from the deployment state of the task learned before it (its `after`
in params.yaml; the first task starts from artifacts/tasks/backbone/
deployment.json of deploy_backbone, or builds that backbone-only chip from
levels.pt when it is missing: backbone PEs from levels.pt, blank spare PEs).
Programs this task's TaskImage (its spare PEs, or its fine-tuned /
Piggyback-masked backbone), then switches the chip to
each earlier task in turn (their evaluation after this task is learned) and
back to this one. Reads every earlier task's task.pt for that.

Writes artifacts/tasks/<task>/deployment.json + deployment.pt (the chip
serving this task), program.parquet (one row per PE written, per event) and
metrics/tasks/<task>/program.json. A previous deployment made for another
mapping or backbone is refused (one line, exit 2) before anything is written.
"""

from __future__ import annotations

from workflow.attempts import stage_attempt
from workflow.io import (BACKBONE, atomic_write_bytes, load_torch, save_parquet, stage_main, task_dir, task_metrics,
                           write_json)
from xbar.chip.deployment import chip_files, learn_on_chip, load_chip
from xbar.chip.layout import ChipLayout, backbone_mapping
from xbar.energy.presets import energy_preset
from xbar.errors import UserError
from xbar.params import FIRST_AFTER, Params

TENSORS = "deployment.pt"


def run(params: Params, task: str) -> None:
    names = list(params.tasks)
    index = names.index(task)
    preset = energy_preset(params)
    levels_pt = load_torch(BACKBONE / "levels.pt")
    levels = {name: entry["levels"] for name, entry in levels_pt.items()}
    mapping = backbone_mapping(params.model, params.crossbar, levels_pt)
    layout = ChipLayout(mapping)
    before = task_dir(params.tasks[task].after or FIRST_AFTER) / "deployment.json"
    chip = load_chip(before, layout, levels)

    tasks = {name: load_torch(task_dir(name) / "task.pt") for name in names[: index + 1]}
    for name, t in tasks.items():
        if t.get("method") != params.tasks[name].method:
            raise UserError(f"{task_dir(name) / 'task.pt'}: method {t.get('method')!r}, params.yaml says "
                            f"{params.tasks[name].method!r}; re-run train_masks for {name}")
    done = learn_on_chip(chip, layout, tasks, levels, preset)

    meta, data = chip_files(chip, TENSORS)
    out = task_dir(task)
    atomic_write_bytes(out / TENSORS, data)
    write_json(out / "deployment.json", meta)
    save_parquet(out / "program.parquet", done.rows)
    s = done.program.summary
    switch = done.switch
    write_json(task_metrics(task, "program"), {
        "task": task, "method": params.tasks[task].method, "preset": preset.name,
        "cells_written": s["cells_written"], "pulses": s["pulses"], "energy_j": s["energy_j"],
        "program": {k: v for k, v in s.items() if k not in ("phase", "task", "method")},
        "switch": switch,
        "reprogram_j": done.reprogram_j,
        "endurance": chip.endurance(),
        "chip": {"pes": chip.n_pes, "spare_pes": chip.n_slots, "cells_per_pe": chip.spec.cells_per_pe,
                 "spare_pes_in_use": sum(1 for x in chip.slots if x is not None)},
    })
    saving = f", HA3M saved {s['cells_saved_share']:.1%} of spare-PE cells" if "cells_saved_share" in s else ""
    print(f"program_spares {task}: {s['cells_written']} cells written ({s['energy_j'] * 1e6:.3g} uJ){saving}; "
          f"{switch['events']} switches for evaluation: {switch['cells_written']} cells "
          f"({switch['energy_j'] * 1e6:.3g} uJ); "
          f"max {chip.endurance()['max_writes_per_cell']} writes per cell")


if __name__ == "__main__":
    stage_main(run, task_arg=True, around=stage_attempt)
