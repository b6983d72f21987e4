"""The comparison over seeds: mean ± 95% CI per configuration and task, and paired differences on the same
seeds (xbar.stats). Rule: a reported accuracy is a mean over seeds with its CI and names its recipe, seeds,
optimizer steps and head procedure; a difference between methods is paired, so what the seeds share cancels.
"""

from __future__ import annotations

import polars as pl

from xbar.stats import mean_ci, paired_ci

HEAD_ONLY = "head_only"
# the paper's claims, as paired differences: XMA2 (P = 10%) against Piggyback and XMA
CLAIMS = (("xma2@10", "piggyback"), ("xma2@10", "xma"))


def _fmt(ci) -> str:  # noqa: ANN001 (MeanCI)
    return f"{ci.mean:.2f}" if ci.n < 2 else f"{ci.mean:.2f} ± {ci.half_width:.2f}"


def seed_table(rows: pl.DataFrame, column: str = "accuracy_final") -> pl.DataFrame:
    """Per configuration label and task (and "mean" over its tasks, per seed): mean ± 95% CI over the seeds,
    with the row's recipe, seeds, optimizer steps and head procedure. `rows`: comparison_table rows with a
    `seed` column."""
    per_seed_mean = rows.group_by("label", "seed", maintain_order=True).agg(pl.col(column).mean(), task=pl.lit("mean"))
    every = pl.concat([rows.select("label", "seed", "task", column), per_seed_mean.select("label", "seed", "task", column)])
    meta = rows.group_by("label", maintain_order=True).agg(
        pl.col("recipe").drop_nulls().first(), pl.col("head_fit").drop_nulls().first(),
        pl.col("optimizer_steps").sum().alias("steps_all_seeds"), pl.col("masks_changed").mean())
    out = []
    for (label, task), group in every.group_by("label", "task", maintain_order=True):
        ci = mean_ci(group[column].to_list())
        out.append({"label": label, "task": task, "mean": ci.mean, "ci95": ci.half_width if ci.n > 1 else None,
                    "n": ci.n, "seeds": ",".join(str(s) for s in sorted(group["seed"].to_list()))})
    table = pl.DataFrame(out).join(meta, on="label", how="left", maintain_order="left")
    seeds = rows.group_by("label").agg(pl.col("seed").n_unique().alias("n_seeds"))
    return (table.join(seeds, on="label", how="left", maintain_order="left")
            .with_columns(optimizer_steps=pl.col("steps_all_seeds") // pl.col("n_seeds")).drop("steps_all_seeds", "n_seeds"))


def paired_table(rows: pl.DataFrame, column: str = "accuracy_final",
                 pairs: list[tuple[str, str]] | None = None) -> pl.DataFrame:
    """Paired differences a - b (per task and the mean over tasks) on the seeds both ran, mean ± 95% CI:
    by default the paper's claims (CLAIMS) and every configuration minus head only."""
    labels = rows["label"].unique(maintain_order=True).to_list()
    if pairs is None:
        pairs = [p for p in CLAIMS if p[0] in labels and p[1] in labels]
        pairs += [(label, HEAD_ONLY) for label in labels if HEAD_ONLY in labels and label != HEAD_ONLY]
    per_seed_mean = rows.group_by("label", "seed").agg(pl.col(column).mean(), task=pl.lit("mean"))
    every = pl.concat([rows.select("label", "seed", "task", column), per_seed_mean.select("label", "seed", "task", column)])
    out = []
    for a, b in pairs:
        joined = (every.filter(pl.col("label") == a)
                  .join(every.filter(pl.col("label") == b), on=["seed", "task"], suffix="_b"))
        for (task,), group in joined.group_by("task", maintain_order=True):
            ci = paired_ci(group[column].to_list(), group[f"{column}_b"].to_list())
            out.append({"difference": f"{a} - {b}", "task": task, "mean": ci.mean,
                        "ci95": ci.half_width if ci.n > 1 else None, "n": ci.n})
    return pl.DataFrame(out, schema={"difference": pl.String, "task": pl.String, "mean": pl.Float64,
                                     "ci95": pl.Float64, "n": pl.Int64})


def statistics_markdown(rows: pl.DataFrame, failures: list[str] = ()) -> str:
    """table.md's statistics sections: the seed table (mean ± CI, with each row's gain over head only) and
    the paired differences; then one line per configuration that failed."""
    from xbar.compare import markdown

    table = seed_table(rows)
    wide = (table.with_columns(cell=pl.struct("mean", "ci95", "n").map_elements(
        lambda r: _fmt(type("C", (), {"mean": r["mean"], "half_width": r["ci95"] or 0.0, "n": r["n"]})),
        return_dtype=pl.String))
        .pivot(on="task", index="label", values="cell", sort_columns=False))
    meta = table.group_by("label", maintain_order=True).agg(
        pl.col("recipe", "head_fit", "optimizer_steps", "seeds", "masks_changed").first())
    pairs = paired_table(rows)
    gain = (pairs.filter(pl.col("difference").str.ends_with(f" - {HEAD_ONLY}") & (pl.col("task") == "mean"))
            .select(pl.col("difference").str.replace(f" - {HEAD_ONLY}", "").alias("label"),
                    pl.struct("mean", "ci95", "n").map_elements(
                        lambda r: _fmt(type("C", (), {"mean": r["mean"], "half_width": r["ci95"] or 0.0, "n": r["n"]})),
                        return_dtype=pl.String).alias("gain_over_head_only")))
    wide = wide.join(gain, on="label", how="left", maintain_order="left").join(meta, on="label", maintain_order="left")
    parts = ["## Test accuracy (%) after the last task: mean ± 95% CI over seeds (Student t), with each row's "
             "recipe, seeds, optimizer steps (per seed, all tasks) and head procedure; masks_changed: the share of "
             "column masks off level 1 / element masks flipped", markdown(wide, digits=6),
             "## Paired differences (points, same seeds): mean ± 95% CI", markdown(pairs, digits=4)]
    if failures:
        parts += ["## Configurations that failed", "\n".join(f"- {line}" for line in failures)]
    return "\n\n".join(parts) + "\n"
