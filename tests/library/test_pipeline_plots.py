"""The per-task pipeline figures: what they draw, from the stage's own data."""

from __future__ import annotations

import polars as pl

from xbar.plots import accuracy_matrix, mask_levels, pe_ranking, png


def test_accuracy_matrix_labels_each_known_cell_and_leaves_the_future_blank():
    fig = accuracy_matrix({"a": {"a": 90.0}, "b": {"a": 90.0, "b": 81.25}})
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["81.2", "90.0", "90.0"]  # (b, a) and (a, a); (a, b) is blank
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_mask_levels_stack_every_level_per_layer():
    counts = {"conv1": {"0": 2, "1": 10}, "conv2": {"0.5": 3, "1": 5}}
    ax = mask_levels(counts, "t").axes[0]
    tops = {}
    for bar in ax.patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0), bar.get_y() + bar.get_height())
    assert tops == {0: 12, 1: 8}  # each layer's stack adds up to its columns
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mask 0", "mask 0.5", "mask 1"]


def test_pe_ranking_colours_exactly_the_selected_pes():
    table = pl.DataFrame({"pe": [0, 1, 2, 3], "layer": ["l"] * 4, "score": [0.1, 0.4, 0.2, 0.3],
                          "rank": [4, 1, 3, 2], "selected": [False, True, False, True]})
    ax = pe_ranking(table, "t").axes[0]
    heights = [round(b.get_height(), 2) for b in ax.patches]
    assert heights == [0.4, 0.3, 0.2, 0.1]  # in rank order
    red = [b.get_facecolor() == ax.patches[0].get_facecolor() for b in ax.patches]
    assert red == [True, True, False, False]
