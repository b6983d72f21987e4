"""Results in the docs come from the result records: docs/results.md and the generated blocks of README.md
and docs/*.md are what `python -m benchmarks.results` renders from benchmarks/records/, and no other line of
the README or the docs types a result figure (docs/decisions.md holds dated history instead)."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import results
from project import ROOT

# Docs whose owners are still moving their figures into records (a figure there is not checked yet). A file
# leaves this list once it holds none (test_pending_docs_still_hold_figures says when).
PENDING = {
    "docs/energy.md": "the chip and energy docs",
    "docs/memory.md": "the chip and energy docs",
    "docs/accounting.md": "the methods' accounting",
    "docs/scale.md": "the backbones",
}
HISTORY = "docs/decisions.md"  # figures allowed, in entries dated "as measured on <commit>, <date>"
DATED = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")  # an entry with figures names the date they were measured on

RECORD = {"name": "demo", "title": "Demo", "command": "python -m benchmarks.demo --seeds 0 1 2",
          "commit": "0123456789ab", "date": "2026-01-02 03:04 UTC", "recipe": "default", "seeds": [0, 1, 2],
          "notes": "", "rows": [{"method": "xma2", "accuracy": {"mean": 81.25, "ci95": 1.5, "n": 3}},
                                {"method": "piggyback", "accuracy": {"mean": 80.0, "ci95": None, "n": 1}}]}


def checked_docs() -> list:
    return [p for p in results.block_files(ROOT)
            if p.relative_to(ROOT).as_posix() not in PENDING and p.relative_to(ROOT).as_posix() != HISTORY]


def test_every_file_of_the_records_folder_is_a_result_record():
    for path in sorted(results.RECORDS.glob("*.json")):
        assert results.is_record(json.loads(path.read_text())), f"{path.name}: not a save_record file"


def test_docs_are_what_the_records_render():
    assert results.stale() == [], "run: python -m benchmarks.results"


@pytest.mark.parametrize("path", checked_docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_result_figure_is_typed_outside_a_generated_block(path):
    typed = results.hand_figures(path.read_text())
    assert typed == [], f"{path.name}: figures typed by hand (put them in a record, or history in {HISTORY})"


def test_history_figures_are_dated():
    text = (ROOT / HISTORY).read_text()
    for section in re.split(r"\n(?=## )", text)[1:]:
        if results.hand_figures(section):
            assert DATED.search(section), f"{HISTORY}: {section.splitlines()[0]!r} holds figures without a date"


def test_pending_docs_still_hold_figures():
    for name in PENDING:
        assert results.hand_figures((ROOT / name).read_text()), f"{name} holds no figure now: drop it from PENDING"


def test_a_record_renders_its_ci_recipe_seeds_command_and_commit():
    text = results.render_record(RECORD)
    assert "| 81.25 ± 1.50 (n=3) |" in text and "| 80.00 (n=1) |" in text
    assert "Recipe: default" in text and "Seeds: 0, 1, 2 (3)" in text
    assert "`python -m benchmarks.demo --seeds 0 1 2`" in text and "`0123456789ab`" in text


def test_generated_blocks_are_rewritten_from_records_and_nothing_else():
    doc = ("intro 1\n<!-- results:demo -->\nstale 12.5%\n<!-- /results -->\noutro\n"
           "<!-- results:none -->\n<!-- /results -->\n")
    out = results.render_blocks(doc, {"demo": RECORD})
    assert out.startswith("intro 1\n<!-- results:demo -->\n|") and "stale" not in out
    assert "81.25 ± 1.50" in out and "\noutro\n" in out
    assert "No record `none` yet" in out
    assert results.render_blocks(out, {"demo": RECORD}) == out  # idempotent
    index = results.render_blocks("<!-- results:index -->\n<!-- /results -->", {"demo": RECORD})
    assert "- [Demo](docs/results.md#demo): `python -m benchmarks.demo --seeds 0 1 2`" in index
    assert results.hand_figures(out) == []  # a block's figures are generated


def test_a_result_figure_is_caught_and_a_parameter_is_not():
    for typed in ("XMA2 gets 87.2%", "a ratio of 3.13×", "0.94x the step", "81.85 ± 1.2", "3.3 points below"):
        assert results.hand_figures(typed), typed
    for fine in ("spare_ratio: 0.1", "lr 1e-4", "72x72 crossbars", "a 3x3 conv", "0x1f", "2 x channels",
                 "the 95% CI", "4 bits"):
        assert not results.hand_figures(fine), fine


def test_results_md_lists_every_record(tmp_path):
    text = results.render_results([RECORD, {**RECORD, "name": "other", "title": "Other"}])
    assert text.index("## Demo") < text.index("## Other")
    assert "## Demo" in results.render_results([RECORD]) and "No result records yet" in results.render_results([])
