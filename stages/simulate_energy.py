"""Stage simulate_energy (per task): the task's inference energy (per image and over its test set),
its re-programming energy (program_spares: programming + the switches for evaluation), the total,
per layer and per PE, and the five methods' typical figures on the same backbone for comparison.

Reads levels.pt (the mapping), task.pt (column masks: a column with mask 0 is
off; frozen PEs read their mask), the task's data (the test-set size), and the
deployment states before and after the task (the programming events it added
to the chip's history). Writes artifacts/tasks/<task>/energy_layers.parquet,
energy_pes.parquet, energy.png and metrics/tasks/<task>/energy.json.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import torch

from workflow.attempts import stage_attempt
from workflow.io import (BACKBONE, atomic_write_bytes, load_torch, read_json, save_parquet, stage_main, task_dir,
                         task_metrics, write_json)
from xbar import step
from xbar.chip.deployment import programming_energy
from xbar.chip.layout import backbone_mapping
from xbar.data import load_task_data
from xbar.energy.presets import energy_preset
from xbar.energy.typical import typical_methods
from xbar.params import Params


def plot(layers: pl.DataFrame, methods: dict, task: str, path: Path) -> None:
    """Two panels: this task's inference energy per layer (stacked components), and the five methods'
    typical totals on the same backbone (inference over the test set + re-programming)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    bottom = torch.zeros(layers.height, dtype=torch.float64)
    x = range(layers.height)
    for comp in ("cells_j", "adc_j", "shift_add_j", "mask_j", "interconnect_j", "buffer_j"):
        values = torch.tensor(layers[comp].to_list(), dtype=torch.float64) * 1e9
        ax1.bar(x, values.numpy(), bottom=bottom.numpy(), label=comp.removesuffix("_j"))
        bottom += values
    ax1.set_xticks(list(x), layers["layer"].to_list(), rotation=90, fontsize=6)
    ax1.set_ylabel("nJ per image")
    ax1.set_title(f"{task}: inference energy per layer")
    ax1.legend(fontsize=7)
    names = list(methods)
    inf = [methods[n]["inference_j"] * 1e3 for n in names]
    rep = [methods[n]["reprogram_j"] * 1e3 for n in names]
    ax2.bar(names, inf, label="inference")
    ax2.bar(names, rep, bottom=inf, label="re-programming")
    ax2.set_ylabel("mJ per task")
    ax2.set_title("methods (typical, test set)")
    ax2.tick_params(axis="x", labelrotation=45)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(params: Params, task: str) -> None:
    spec = params.tasks[task]
    preset = energy_preset(params)
    levels_pt = load_torch(BACKBONE / "levels.pt")
    mapping = backbone_mapping(params.model, params.crossbar, levels_pt)
    t = load_torch(task_dir(task) / "task.pt")
    test_images = len(load_task_data(spec.dataset, params.seed).test)
    # this task's programming events: what its deployment state's history added to the one before it
    before = read_json(task_dir(spec.after) / "deployment.json")["history"]
    program = programming_energy(read_json(task_dir(task) / "deployment.json")["history"][len(before):])

    inference = step.inference(params, mapping, t, spec.dataset.input_size, preset)
    io_ = step.task_io(params, mapping, t, spec.dataset.input_size)
    act_bits = params.quant.act_bits
    energy, columns, bits = inference.energy, inference.columns, inference.mask_bits

    reprogram = program["reprogram_j"]
    per_image = energy.per_image_j
    writes = pl.read_parquet(task_dir(task) / "program.parquet") if (task_dir(task) / "program.parquet").exists() \
        else pl.DataFrame(schema={"pe": pl.Int64, "energy_j": pl.Float64})
    written = writes.group_by("pe").agg(pl.col("energy_j").sum().alias("reprogram_j"))  # every phase, by backbone PE
    pes = (energy.pes.rename({"total_j": "inference_per_image_j"})
           .join(written, on="pe", how="left").with_columns(pl.col("reprogram_j").fill_null(0.0)))
    layers = energy.layers.rename({"total_j": "inference_per_image_j"}).with_columns(
        inference_test_set_j=pl.col("inference_per_image_j") * test_images)

    typical = {n: typical_methods(mapping, io_, preset, act_bits, spec.spare_ratio, k, spec.shift_levels)
               for n, k in (("one_image", 1), ("test_set", test_images))}
    out = task_dir(task)
    save_parquet(out / "energy_layers.parquet", layers)
    save_parquet(out / "energy_pes.parquet", pes)
    plot(energy.layers, typical["test_set"]["methods"], task, out / "energy.png")
    write_json(task_metrics(task, "energy"), {
        "task": task, "method": spec.method, "preset": preset.name,
        "per_image_j": per_image, "test_images": test_images,
        "inference_j": per_image * test_images, "reprogram_j": reprogram,
        "program_j": program["program_j"], "switch_j": program["switch_j"],
        "total_j": per_image * test_images + reprogram,
        "reprogram_over_inference_per_image": reprogram / per_image,
        "breakdown_per_image_j": energy.breakdown(),
        "columns_off": int(sum(int((~c.active).sum()) for c in columns.values())),
        "mask_bits_per_column": bits,
        "constants": preset.constants,
        "typical_methods": {k: {"inferences": v["assumptions"]["inferences"], "methods": v["methods"],
                                "ratios": v["assumptions"]["ratios"]} for k, v in typical.items()},
    })
    print(f"simulate_energy {task}: {per_image * 1e6:.3g} uJ per image, {per_image * test_images * 1e3:.3g} mJ "
          f"over {test_images} test images, re-programming {reprogram * 1e6:.3g} uJ ({preset.name})")


if __name__ == "__main__":
    stage_main(run, task_arg=True, around=stage_attempt)
