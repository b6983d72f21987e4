"""The fixtures the test files share.

Tests are grouped by layer: tests/library/ (xbar/, the library) and tests/workflow/ (stages, DVC,
flows, MLflow, the command line run as real processes). Helpers that are plain functions live in
tests/project.py (a tiny copy of the project and the commands run in it) and tests/tiny_backbone.py
(a tiny quantized backbone in memory); pytest puts tests/ on sys.path (pyproject.toml), so a test
file imports them as `project` and `tiny_backbone`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from project import BACKBONE_STAGES, T1_STAGES, TinyProject, make_tiny_project, run_stages


@pytest.fixture
def tiny_project(tmp_path: Path) -> TinyProject:
    """A git + DVC copy of the project with tiny params and no tasks."""
    return make_tiny_project(tmp_path / "project")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> TinyProject:
    """A tiny project (tasks t1, t2) with the backbone and every t1 stage but evaluate run (no DVC, no MLflow).

    Built once; a test that changes it works on a copy."""
    project = make_tiny_project(tmp_path_factory.mktemp("built") / "project", {"t1": {}, "t2": {}}, git=False)
    run_stages(project, BACKBONE_STAGES)
    run_stages(project, T1_STAGES, "t1")
    return project


@pytest.fixture(scope="module")
def backbone() -> tuple:
    """(params, quant.pt contents, levels.pt contents) of a tiny quantized backbone (tiny_backbone.py)."""
    from tiny_backbone import tiny_backbone  # torch and the library: only for the tests that use it

    return tiny_backbone()


@pytest.fixture(scope="session")
def pretrained() -> tuple:
    """(params, quant.pt contents, levels.pt contents) of a tiny backbone pretrained on optdigits
    (tiny_backbone.pretrained_backbone): for tests that train a task and need it to converge."""
    from tiny_backbone import pretrained_backbone

    return pretrained_backbone()
