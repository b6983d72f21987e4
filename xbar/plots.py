"""Figures from polars tables, one function per figure, each returning a matplotlib Figure.

Figures are built with the object-oriented API (`matplotlib.figure.Figure`,
rendered by Agg), never pyplot: no global figure state, so plotting is safe
beside other threads and needs no display. `png(fig)` gives the file's bytes.

* `accuracy_vs_ratio`: the comparison's test accuracy against XMA2's spare-PE
  ratio P, the other methods as horizontal lines (one panel per task + mean).
* `energy_by_method`: the comparison's energy per method, inference and
  re-programming stacked (the paper's Figure 5), one panel per task + all tasks.
* `chip_sweeps`: the comparison's accuracy on the chip against ADC bits, device
  noise and time since programming, one line per configuration.
"""

from __future__ import annotations

import io
import math

import polars as pl
from matplotlib.figure import Figure

def png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _panels(n: int, width: float = 4.0, height: float = 3.4) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _tasks(table: pl.DataFrame) -> list[str]:
    return table.sort("order")["task"].unique(maintain_order=True).to_list()


def accuracy_vs_ratio(table: pl.DataFrame, column: str = "accuracy_final") -> Figure:
    """`table`: the comparison table (label, method, spare_ratio, task, order, `column`)."""
    tasks = _tasks(table)
    mean = (table.group_by("label", maintain_order=True)
            .agg(pl.col("method").first(), pl.col("spare_ratio").first(), pl.col(column).mean())
            .with_columns(task=pl.lit("mean")))
    fig, axes = _panels(len(tasks) + 1)
    colors = iter(f"C{i}" for i in range(1, 10))
    swept = pl.col("spare_ratio").is_not_null()  # XMA2: one configuration per spare-PE ratio
    others = table.filter(~swept)["label"].unique(maintain_order=True).to_list()
    color = {label: next(colors) for label in others}
    for ax, task in zip(axes, [*tasks, "mean"]):
        rows = mean if task == "mean" else table.filter(pl.col("task") == task)
        sweep = rows.filter(swept).sort("spare_ratio")
        if sweep.height:
            ratios = (sweep["spare_ratio"] * 100).to_list()
            ax.plot(ratios, sweep[column].to_list(), "o-", color="C0", label=sweep["method"][0], zorder=3)
            ax.set_xticks(ratios)
        for label in others:
            value = rows.filter(pl.col("label") == label)[column]
            if value.len():
                ax.axhline(value[0], color=color[label], linestyle="--", linewidth=1, label=label)
        ax.set_title(task)
        ax.set_xlabel("spare PEs P (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("accuracy vs spare-PE ratio (XMA2), other methods as lines")
    return fig


def energy_by_method(table: pl.DataFrame) -> Figure:
    """`table`: the comparison table (label, task, order, inference_j, reprogram_j); mJ per task. Rows
    without energy (the fp32 ceiling: not on a chip) are left out."""
    table = table.filter(pl.col("inference_j").is_not_null())
    tasks = _tasks(table)
    total = (table.group_by("label", maintain_order=True).agg(pl.col("inference_j", "reprogram_j").sum())
             .with_columns(task=pl.lit("all tasks")))
    fig, axes = _panels(len(tasks) + 1)
    for ax, task in zip(axes, [*tasks, "all tasks"]):
        rows = total if task == "all tasks" else table.filter(pl.col("task") == task)
        labels = rows["label"].to_list()
        inference = (rows["inference_j"] * 1e3).to_list()
        reprogram = (rows["reprogram_j"] * 1e3).to_list()
        ax.bar(labels, inference, label="inference", color="C0")
        ax.bar(labels, reprogram, bottom=inference, label="re-programming", color="C3")
        ax.set_title(task)
        ax.set_ylabel("energy (mJ)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("energy per method: inference (test set) + re-programming")
    return fig


CHIP_AXES = {"adc_bits": ("ADC bits", "linear"), "noise": ("device noise (x the preset's sigmas)", "linear"),
             "time": ("seconds since programming", "symlog")}


def chip_sweeps(sweep: pl.DataFrame) -> Figure:
    """`sweep`: xbar.compare.chip_sweep_table (sweep, x, label, chip_mean, chip_std, ideal): accuracy on the
    chip (mean over the tasks) against ADC bits, device noise and time, one line per configuration; its
    ideal accuracy on the same images dotted."""
    names = [s for s in CHIP_AXES if s in set(sweep["sweep"].to_list())]
    fig, axes = _panels(max(len(names), 1), width=4.4)
    labels = sweep["label"].unique(maintain_order=True).to_list()
    for ax, name in zip(axes, names):
        rows = sweep.filter(pl.col("sweep") == name).sort("x")
        for i, label in enumerate(labels):
            line = rows.filter(pl.col("label") == label)
            x = line["x"].to_list()
            ax.errorbar(x, line["chip_mean"].to_list(), yerr=line["chip_std"].to_list(), fmt="o-", ms=3,
                        color=f"C{i % 10}", label=label, capsize=2)
            ax.plot(x, line["ideal"].to_list(), ":", color=f"C{i % 10}", linewidth=1)
        xlabel, scale = CHIP_AXES[name]
        ax.set_xscale(scale, **({"linthresh": 1.0} if scale == "symlog" else {}))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy on the chip (%, mean over tasks)")
        ax.grid(alpha=0.3)
    if names:
        axes[0].legend(fontsize=7)
        first = sweep.row(0, named=True)
        fig.suptitle(f"accuracy on the chip (device {first['device']}, {first['instances']} instances; "
                     "dotted: ideal on the same images)")
    return fig


# --- per-task pipeline figures (stages write them; dvc.yaml declares them as plots) -----------


def pe_ranking(table: pl.DataFrame, task: str) -> Figure:
    """PE scores in rank order, the PEs selected as spare PEs in red (stage rank_pes)."""
    ranked = table.sort("rank")
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:red" if s else "tab:gray" for s in ranked["selected"].to_list()]
    ax.bar(range(ranked.height), ranked["score"].to_list(), color=colors, width=1.0)
    ax.set_xlabel("PE, by rank")
    ax.set_ylabel("normalized |dL/dm_PE|")
    ax.set_title(f"{task}: PE scores ({int(ranked['selected'].sum())} spare PEs, red)")
    return fig


def mask_levels(counts: dict[str, dict[str, int]], task: str) -> Figure:
    """Columns of frozen PEs per column-mask level, stacked, per layer (stage train_masks)."""
    layers = list(counts)
    levels = sorted({v for c in counts.values() for v in c}, key=float)
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.subplots()
    bottom = [0] * len(layers)
    for level in levels:
        heights = [counts[name].get(level, 0) for name in layers]
        ax.bar(range(len(layers)), heights, bottom=bottom, label=f"mask {level}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    ax.set_ylabel("columns of frozen PEs")
    ax.set_title(f"{task}: column-mask levels per layer" if layers else f"{task}: this method has no column masks")
    if levels:
        ax.legend(fontsize=7)
    return fig


def accuracy_matrix(rows: dict[str, dict[str, float]]) -> Figure:
    """Test accuracy %, task learned (row: after learning it) x task evaluated (stage evaluate)."""
    names = list(rows)
    grid = [[rows[learned].get(evaluated, math.nan) for evaluated in names] for learned in names]
    fig = Figure(figsize=(1.1 * len(names) + 3, 0.9 * len(names) + 1.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after learning")
    fig.colorbar(image, ax=ax, label="test accuracy %")
    return fig
