"""The method comparison (the paper's Tables 2-3 and Figure 5) as library calls, in memory.

A **configuration** is one method -- and for XMA2 one spare-PE ratio P -- that
learns every task of params.yaml in order, as the DVC stages would with every
task's `method` (and `spare_ratio`) set to it: rank the PEs (xma2), train,
export task.pt, program the chip and switch it to every earlier task to
evaluate it (program_spares), and evaluate every task learned so far on the
models rebuilt from their task.pt (evaluate). Nothing is written to disk.

Per task it records the accuracy when learned, the accuracy of every task after
each new one (the accuracy matrix), mask memory (`methods.mask_report`),
re-programming energy (`deployment.learn_on_chip`) and inference energy over
the task's test set (`energy.task_inference`). `comparison_table` joins the
configurations into one table with the accuracy after the last task and the
forgetting; `accuracy_table` and `energy_table` are its per-method summaries.

Each configuration seeds itself and draws its training noise from its own
generators (`train_task`), so its results do not depend on which other
configurations run beside it in the same process. Every row names its recipe
(train.recipe) and head procedure, and how far its masks moved (`masks_changed`);
`head_only` (the head on the untouched backbone) is the reference row. A
configuration that fails returns its one line (`ConfigurationResult.failure`).
Means over seeds with CIs and paired differences: xbar.comparison_stats.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl
import torch

from xbar import step
from xbar.chip.deployment import learn_on_chip, new_chip
from xbar.chip.sweep import CHIP_SCHEMA, ChipPlan, chip_rows
from xbar.chip.layout import ChipLayout
from xbar.crossbar import spare_pe_count
from xbar.data import TaskData, load_task_data
from xbar.energy.presets import energy_preset
from xbar.energy.scenarios import STEADY
from xbar.errors import UserError
from xbar.methods import get, mask_report, names
from xbar.methods.presets import recipe_for
from xbar.methods.recipe import MIN_STEPS
from xbar.params import Params, ShiftLevels, SpareRatio, check_value, parse_params
from xbar.step import Backbone
from xbar.training import optimizer_steps, seed_everything

RATIOS = (0.05, 0.1, 0.2, 0.4)  # the spare-PE ratios P the paper sweeps for a method with spare PEs
# the energy column's accounting (xbar.energy.scenarios): each task programmed on the chip the previous one left
ENERGY_SCENARIO = STEADY.name
# the paper's accuracy ceiling (Table 3's fine-tune row): fp32 weights and activations, no chip
# (`step.learn_fp32`); a configuration next to the 4-bit fine-tunes, not a registered method
FP32_CEILING = "finetune_fp32"
# the reference row: the deployed head on the untouched backbone (xbar.methods.head_only); each method's gain
# over it is what its masks or weights add
HEAD_ONLY = "head_only"

# one row per (configuration, task); accuracy_final and forgetting are added by comparison_table
TASK_SCHEMA = {
    "label": pl.String, "method": pl.String, "spare_ratio": pl.Float64, "task": pl.String, "order": pl.Int64,
    "dataset": pl.String, "bn": pl.String, "shift_levels": pl.Int64, "accuracy_at_learn": pl.Float64, "spare_pes": pl.Int64,
    "mask_bytes": pl.Int64, "mask_bytes_unpacked": pl.Int64, "task_bytes": pl.Int64, "cells_written": pl.Int64, "program_j": pl.Float64, "switch_j": pl.Float64,
    "reprogram_j": pl.Float64, "inference_j": pl.Float64, "total_j": pl.Float64, "test_images": pl.Int64,
    "mask_digest": pl.String, "seconds": pl.Float64, "optimizer_steps": pl.Int64, "kept_step": pl.Int64,
    "recipe": pl.String, "head_fit": pl.String, "masks_changed": pl.Float64, "mask_shares": pl.String,
}
MATRIX_SCHEMA = {"label": pl.String, "after": pl.String, "task": pl.String, "accuracy": pl.Float64}


def percent(ratio: float) -> str:
    """0.1 -> "10" (the P of a label)."""
    return f"{ratio * 100:g}"


@dataclass(frozen=True)
class Configuration:
    method: str
    spare_ratio: float | None = None  # a method with spare PEs only: the share P of PEs replaced by spare PEs
    bn: str | None = None  # a BN rule other than train.bn (the ablation); None: train.bn
    shift_levels: int | None = None  # a column-mask method in the shift-level sweep; None: each task's own

    @property
    def label(self) -> str:
        """"xma2@10" for XMA2 with P = 10%, the plain method name otherwise; "/N2" for N = 2 shift levels in
        the sweep, "+bn_per_task" for the BN ablation."""
        label = self.method if self.spare_ratio is None else f"{self.method}@{percent(self.spare_ratio)}"
        label += "" if self.shift_levels is None else f"/N{self.shift_levels}"
        return label if self.bn is None else f"{label}+bn_{self.bn}"


def configurations(methods: Iterable[str] | None = None, ratios: Iterable[float] = RATIOS,
                   bn_ablation: str | None = None, shift_levels: Iterable[int] = (),
                   ceiling: bool = True, recipe: str = "default", reference: bool = True) -> list[Configuration]:
    """One configuration per method (default: every registered one), a method with spare PEs once per
    spare-PE ratio (in the given order, duplicates dropped); with `shift_levels` (the paper's Table 2 sweep),
    a method with column masks once per N; with `bn_ablation` (a BN rule), each configuration whose method
    can use that rule once more with it; with `ceiling`, the fp32 fine-tune when a 4-bit fine-tune is compared;
    with `reference`, head only (first) when a method that keeps the backbone is compared. `recipe` (train.recipe):
    by default every method it covers; a method it does not cover is refused (one line)."""
    from xbar.methods.presets import check_recipe, covered

    cover = covered(recipe)
    levels = list(dict.fromkeys(int(n) for n in shift_levels))
    for n in levels:
        check_value(ShiftLevels, n, "shift_levels")
    methods = list(dict.fromkeys([n for n in names() if cover is None or n in cover] if methods is None else methods))
    ratios = list(dict.fromkeys(float(r) for r in ratios))
    unknown = [m for m in methods if m not in names()]
    if unknown:
        raise UserError(f"methods: {unknown[0]!r} is unknown (one of {', '.join(names())})")
    if not methods:
        raise UserError("methods: name at least one method")
    try:
        check_recipe(recipe, methods, "train.recipe")
    except ValueError as err:
        raise UserError(str(err)) from None
    for r in ratios:
        check_value(SpareRatio, r, "ratios")
    spare = [m for m in methods if get(m).spare_pes]
    if spare and not ratios:
        raise UserError(f"ratios: {spare[0]} needs at least one spare-PE ratio")
    out = []
    for m in methods:
        # the sweep applies to a method whose column mask takes the task's N (XMA, XMA2; not XBM's N = 0)
        sweep = levels if levels and get(m).column_masks and get(m).mask_shift_levels(3) == 3 else [None]
        out += [Configuration(m, r, shift_levels=n) for r in (ratios if get(m).spare_pes else [None])
                for n in sweep]
    if bn_ablation is not None:
        out += [Configuration(c.method, c.spare_ratio, bn_ablation, c.shift_levels) for c in list(out)
                if bn_ablation in get(c.method).bn_rules and len(get(c.method).bn_rules) > 1]
    if ceiling and any(get(m).trains_all for m in methods):  # beside the 4-bit fine-tunes
        out.append(Configuration(FP32_CEILING))
    if reference and HEAD_ONLY not in methods and any(get(m).keeps_backbone for m in methods):
        out.insert(0, Configuration(HEAD_ONLY))
    return out


def configuration_params(params: Params, config: Configuration) -> Params:
    """`params` with every task learned by the configuration's method (and spare ratio), validated as
    params.yaml is (an XMA2 ratio above crossbar.spare_pe_ratio is refused)."""
    if config.method == FP32_CEILING:  # no method of the registry: the tasks' specs serve as they are
        return params
    raw = params.model_dump()
    if config.bn is not None:
        raw["train"]["bn"] = config.bn
    for spec in raw["tasks"].values():
        spec["method"] = config.method
        spec["bn"] = None  # the configuration's rule, one for every task
        if config.spare_ratio is not None:
            spec["spare_ratio"] = config.spare_ratio
        if config.shift_levels is not None:
            spec["shift_levels"] = config.shift_levels
    return parse_params(raw, f"configuration {config.label}")


@dataclass(frozen=True)
class ConfigurationResult:
    config: Configuration
    tasks: pl.DataFrame  # TASK_SCHEMA, one row per task in learning order
    matrix: pl.DataFrame  # MATRIX_SCHEMA: accuracy of `task` after `after` was learned
    # every task on the chip after the last task (xbar.chip.sweep); none unless a ChipPlan was given
    chip: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=CHIP_SCHEMA))
    failure: str | None = None  # the one line of a configuration that failed (its tables are then empty)


def mask_digest(task: dict) -> str:
    """sha256 (16 hex) of what a task.pt puts on the chip: levels, spare PEs, column and element masks."""
    h = hashlib.sha256()
    for group in ("levels", "column_masks", "element_masks"):
        for name in sorted(task[group]):
            h.update(f"{group}/{name}".encode())
            h.update(task[group][name].contiguous().numpy().tobytes())
    h.update(task["spare_pes"].to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def run_configuration(params: Params, config: Configuration, backbone: Backbone,
                      data: Mapping[str, TaskData] | None = None,
                      chip_plan: ChipPlan | None = None) -> ConfigurationResult:
    """Learn every task of `params` in order with the configuration; `data` (by task) is loaded when None.
    `chip_plan`: then evaluate every task on the chip (the chip column, and the sweeps if asked).

    A configuration that fails (a user error, a diverged run) returns empty tables and its one line in
    `failure`, so the other configurations' results are still written."""
    try:
        if config.method == FP32_CEILING:
            return fp32_ceiling(params, backbone, data)
        return _run_configuration(params, config, backbone, data, chip_plan)
    except UserError as err:
        return ConfigurationResult(config, pl.DataFrame(schema=TASK_SCHEMA), pl.DataFrame(schema=MATRIX_SCHEMA),
                                   failure=f"{config.label} (seed {params.seed}): {err}")


def _run_configuration(params: Params, config: Configuration, backbone: Backbone,
                       data: Mapping[str, TaskData] | None = None,
                       chip_plan: ChipPlan | None = None) -> ConfigurationResult:
    run = configuration_params(params, config)
    mapping = backbone.mapping(run)
    layout = ChipLayout(mapping)
    chip = new_chip(layout, backbone.cells, spare_pe_count(run.crossbar.spare_pe_ratio, mapping.n_pes))
    preset = energy_preset(run)
    loaded: dict[str, TaskData] = {}
    learned: dict[str, dict] = {}  # task -> task.pt contents, in learning order
    rows, matrix = [], []
    for order, (name, spec) in enumerate(run.tasks.items(), start=1):
        seed_everything(run.seed, run.train.threads)
        loaded[name] = task_data = data[name] if data is not None else load_task_data(spec.dataset, run.seed)
        began = time.perf_counter()
        spare = step.selected_pes(step.rank(run, spec, backbone, task_data)[0]) if get(spec.method).spare_pes else None
        previous = list(learned.values())[-1] if learned else None
        result = step.learn(run, spec, backbone, task_data, f"{config.label} {name}", spare, previous)
        learned[name] = task = result.task
        seconds = time.perf_counter() - began

        # the chip: program this task, then switch to every earlier task (its evaluation) and back
        programming = learn_on_chip(chip, layout, learned, backbone.cells, preset)
        now = step.evaluate_chip(run, chip, layout, learned, backbone, loaded, preset)
        matrix += [{"label": config.label, "after": name, "task": t, "accuracy": a} for t, a in now.items()]

        inference_j = step.inference(run, mapping, task, spec.dataset.input_size, preset).energy.per_image_j \
            * len(task_data.test)
        masks, s, switch = mask_report(task, mapping), programming.program.summary, programming.switch
        rows.append({
            "label": config.label, "method": config.method, "spare_ratio": config.spare_ratio, "task": name,
            "order": order, "dataset": spec.dataset.source, "bn": task["bn"],
            "shift_levels": len(task["mask_values"]) - 2 if task["column_masks"] else None, "accuracy_at_learn": now[name],
            "spare_pes": int(task["spare_pes"].numel()), "mask_bytes": masks["mask_bytes_packed"],
            "mask_bytes_unpacked": masks["mask_bytes_unpacked"], "task_bytes": masks["task_bytes"],
            "cells_written": s["cells_written"],
            "program_j": s["energy_j"] + s["mask_load_j"], "switch_j": switch["energy_j"] + switch["mask_load_j"],
            "reprogram_j": programming.reprogram_j, "inference_j": inference_j,
            "total_j": inference_j + programming.reprogram_j, "test_images": len(task_data.test),
            "mask_digest": mask_digest(task), "seconds": seconds,
            # kept_step 0: training did not beat the closed-form head on held-out images (null: none held out)
            "optimizer_steps": result.model.steps, "kept_step": result.model.kept_step,
            "recipe": result.model.recipe, "head_fit": result.model.head_fit,  # the recipe's head procedure
            **mask_movement(masks),
        })
    on_chip = chip_rows(run, config.label, learned, backbone.levels, loaded, chip_plan) if chip_plan else None
    return ConfigurationResult(config, pl.DataFrame(rows, schema=TASK_SCHEMA), pl.DataFrame(matrix, schema=MATRIX_SCHEMA),
                               *([] if on_chip is None else [on_chip]))


def mask_movement(masks: dict) -> dict:
    """From `mask_report`: the share of masks off their start (column masks: off level 1; element masks:
    flipped to 0) and the share at each level ("0:0.01 0.125:0 ... 1:0.97"); null without masks."""
    shares = masks.get("mask_shares") or {}
    if not shares:
        return {"masks_changed": None, "mask_shares": None}
    return {"masks_changed": 1.0 - shares["1"], "mask_shares": " ".join(f"{k}:{v:.4f}" for k, v in shares.items())}


def fp32_ceiling(params: Params, backbone: Backbone, data: Mapping[str, TaskData] | None) -> ConfigurationResult:
    """Every task fine-tuned in fp32 from the fp32 backbone, each its own copy: accuracy only (storage: the
    whole fp32 network per task; nothing is programmed, so no energy or chip figures)."""
    rows, matrix, done = [], [], {}
    for order, (name, spec) in enumerate(params.tasks.items(), start=1):
        seed_everything(params.seed, params.train.threads)
        task_data = data[name] if data is not None else load_task_data(spec.dataset, params.seed)
        began = time.perf_counter()
        done[name] = acc = step.learn_fp32(params, spec, backbone, task_data, f"{FP32_CEILING} {name}")
        recipe = recipe_for(params.train.recipe, FP32_CEILING)
        matrix += [{"label": FP32_CEILING, "after": name, "task": t, "accuracy": a} for t, a in done.items()]
        body = sum(v.numel() for k, v in backbone.fp32["state_dict"].items() if not k.startswith("head."))
        weights = body + (backbone.fp32["state_dict"]["head.weight"].shape[1] + 1) * task_data.num_classes
        rows.append({"label": FP32_CEILING, "method": FP32_CEILING, "task": name, "order": order,
                     "dataset": spec.dataset.source, "bn": "per_task", "accuracy_at_learn": acc, "spare_pes": 0,
                     "task_bytes": 4 * weights, "test_images": len(task_data.test), "mask_digest": "",
                     "seconds": time.perf_counter() - began, "recipe": recipe.label(spec.epochs),
                     "head_fit": recipe.head_procedure, "optimizer_steps": optimizer_steps(len(task_data.train), spec.epochs, params.train.batch_size,
                                                         MIN_STEPS)})
    return ConfigurationResult(Configuration(FP32_CEILING), pl.DataFrame(rows, schema=TASK_SCHEMA),
                               pl.DataFrame(matrix, schema=MATRIX_SCHEMA))


# --- tables ------------------------------------------------------------------------------------------


def comparison_table(results: Sequence[ConfigurationResult]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(one row per configuration and task, the accuracy matrix), in configuration order.

    Adds `accuracy_final` (after the configuration's last task) and `forgetting` (at learn - final):
    zero for every mask method by construction, positive for finetune_shared; and the chip column
    (xbar.chip.sweep, null where not measured): `chip_mean` / `chip_std` / `chip_min` over the
    instances at the paper's 5-bit ADC, with `chip_ideal`, the ideal accuracy on the same test images.
    """
    if not results:
        raise ValueError("no configuration results")
    tasks = pl.concat([r.tasks for r in results])
    matrix = pl.concat([r.matrix for r in results])
    last = tasks.group_by("label").agg(pl.col("task").sort_by("order").last().alias("after"))
    final = (matrix.join(last, on=["label", "after"])
             .select("label", "task", pl.col("accuracy").alias("accuracy_final")))
    column = (chip_table(results).filter(pl.col("sweep") == "column")
              .select("label", "task", pl.col("ideal").alias("chip_ideal"), "chip_mean", "chip_std", "chip_min"))
    table = (tasks.join(final, on=["label", "task"], how="left", maintain_order="left")
             .join(column, on=["label", "task"], how="left", maintain_order="left")
             .with_columns(forgetting=pl.col("accuracy_at_learn") - pl.col("accuracy_final")))
    first = ["label", "method", "spare_ratio", "task", "order", "dataset", "accuracy_at_learn", "accuracy_final",
             "forgetting", "chip_mean"]
    return table.select(*first, pl.exclude(first)), matrix


def chip_table(results: Sequence[ConfigurationResult]) -> pl.DataFrame:
    """Every configuration's chip rows (CHIP_SCHEMA), in configuration order."""
    return pl.concat([r.chip for r in results]) if results else pl.DataFrame(schema=CHIP_SCHEMA)


def chip_sweep_table(chip: pl.DataFrame) -> pl.DataFrame:
    """Per sweep point and configuration: chip accuracy (mean over the tasks of the instances' mean), the
    spread over instances (mean of the tasks' std) and the ideal accuracy on the same images: the plots' data."""
    return (chip.filter(pl.col("sweep") != "column")
            .group_by("sweep", "x", "label", maintain_order=True)
            .agg(pl.col("chip_mean").mean(), pl.col("chip_std").mean(), pl.col("ideal").mean(),
                 pl.col("device").first(), pl.col("instances").first(), pl.col("images").sum()))


def accuracy_table(table: pl.DataFrame, column: str = "accuracy_final") -> pl.DataFrame:
    """One row per configuration label, one column per task (in learning order), then their mean."""
    tasks = table.sort("order")["task"].unique(maintain_order=True).to_list()
    wide = table.pivot(on="task", index="label", values=column, sort_columns=False)
    return wide.select("label", *tasks).with_columns(mean=pl.mean_horizontal(*tasks))


def energy_table(table: pl.DataFrame) -> pl.DataFrame:
    """Per configuration on the chip (not the fp32 ceiling): mean mask memory per task, spare PEs, and
    energy summed over its tasks."""
    return table.filter(pl.col("method") != FP32_CEILING).group_by("label", maintain_order=True).agg(
        pl.col("method").first(), pl.col("spare_ratio").first(),
        pl.col("mask_bytes").mean(), pl.col("task_bytes").mean(), pl.col("spare_pes").mean(), pl.col("cells_written").sum(),
        pl.col("inference_j").sum(), pl.col("reprogram_j").sum(), pl.col("total_j").sum(), pl.col("switch_j").sum(),
    ).with_columns(reprogram_over_inference=pl.col("reprogram_j") / pl.col("inference_j"),
                   energy_scenario=pl.lit(ENERGY_SCENARIO))


def markdown(df: pl.DataFrame, digits: int = 4) -> str:
    """A polars table as a GitHub markdown table, floats to `digits` significant digits (accuracies and
    joules side by side: a fixed number of decimals would print a small energy as 0)."""
    floats = pl.col(pl.Float32, pl.Float64).map_elements(lambda v: f"{v:.{digits}g}", return_dtype=pl.String)
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=200, tbl_width_chars=10_000):
        return str(df.with_columns(floats))


def chip_markdown(table: pl.DataFrame, chip: pl.DataFrame) -> str:
    """The chip column: per configuration the chip's accuracy per task and mean, the ideal accuracy on the
    same test images, the difference and the spread over instances ("" when not measured)."""
    column = chip.filter(pl.col("sweep") == "column")
    if not column.height:
        return ""
    wide = accuracy_table(table.filter(pl.col("chip_mean").is_not_null()), "chip_mean")
    summary = table.group_by("label", maintain_order=True).agg(
        ideal=pl.col("chip_ideal").mean(), std=pl.col("chip_std").mean())
    wide = (wide.join(summary, on="label", maintain_order="left")
            .with_columns(chip_minus_ideal=pl.col("mean") - pl.col("ideal")).with_columns(pl.col(pl.Float64).round(2)))
    first = column.row(0, named=True)
    return (f"## Accuracy on the chip (%): {first['adc_bits']}-bit ADC, device {first['device']}, mean of "
            f"{first['instances']} chip instances on up to {column['images'].max()} test images per task (ideal: the same "
            f"images; std: spread over instances, points)\n\n" + markdown(wide, digits=6))


def report_markdown(table: pl.DataFrame, chip: pl.DataFrame | None = None) -> str:
    """table.md: accuracy per task and mean (Table 3), forgetting, the chip column, mask memory and energy
    (Table 2, Figure 5), then every row."""
    energy = energy_table(table).with_columns(pl.col(c) * 1e3 for c in ("inference_j", "reprogram_j", "total_j"))
    energy = energy.rename({"inference_j": "inference_mj", "reprogram_j": "reprogram_mj", "total_j": "total_mj"})

    def points(column: str) -> str:  # percentages to 2 decimals, as the paper's tables
        return markdown(accuracy_table(table, column).with_columns(pl.col(pl.Float64).round(2)), digits=6)

    return "\n\n".join([
        "# Method comparison", "## Test accuracy (%) after the last task", points("accuracy_final"),
        "## Test accuracy (%) when learned", points("accuracy_at_learn"),
        "## Forgetting (points: when learned - after the last task)", points("forgetting"),
        *([chip_markdown(table, chip)] if chip is not None and chip.height else []),
        "## Mask memory and all-in storage (bytes per task, packed: masks + re-programmed cells + per-task "
        f"BN + head) and energy (scenario {ENERGY_SCENARIO}: measured on the chip the previous task left, summed "
        "over the tasks; inference over each task's test set)", markdown(energy.drop("method", "spare_ratio")),
        "## Every configuration and task (energy in joules)", markdown(table.drop("mask_digest")),
    ]) + "\n"
