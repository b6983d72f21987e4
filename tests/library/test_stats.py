"""Means with 95% t-intervals (xbar.stats): the interval a reported accuracy carries."""

import math

import pytest

from xbar.errors import UserError
from xbar.stats import check_instances, check_seeds, mean_ci, paired_ci, t975


def test_t_quantiles_match_the_tables_and_approach_the_normal():
    assert t975(2) == pytest.approx(4.303, abs=1e-3)
    assert t975(30) == pytest.approx(2.042, abs=1e-3)
    # exact t_{0.975} at df = 40, 60, 120 from the standard tables
    for df, exact in ((40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert t975(df) == pytest.approx(exact, abs=2e-4)


def test_mean_ci_is_the_student_interval():
    ci = mean_ci([1.0, 2.0, 3.0])
    # sd = 1, n = 3: half-width = t(2) / sqrt(3)
    assert ci.mean == pytest.approx(2.0)
    assert ci.half_width == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert ci.n == 3


def test_one_run_has_no_interval():
    ci = mean_ci([5.0])
    assert math.isnan(ci.half_width) and ci.as_dict()["ci95"] is None


def test_paired_differences_cancel_what_the_seeds_share():
    a = [80.0, 90.0, 70.0]
    b = [79.0, 89.0, 69.0]
    d = paired_ci(a, b)
    assert d.mean == pytest.approx(1.0) and d.half_width == pytest.approx(0.0)
    assert mean_ci(a).half_width > 10  # unpaired, the seeds' spread would swamp it


def test_bad_seed_lists_and_instances_are_one_line_errors():
    with pytest.raises(UserError, match="seeds: expected at least one seed"):
        check_seeds([])
    with pytest.raises(UserError, match="seed 3 is given twice"):
        check_seeds([1, 3, 3])
    assert check_seeds([2, 0]) == (2, 0)
    with pytest.raises(UserError, match="at least 2 chip instances"):
        check_instances(1)
