"""A tiny, self-contained copy of the project for integration tests (import: `from project import ...`).

`make_tiny_project(dest, tasks)` copies the code (xbar, stages, flows, dvc.yaml)
into `dest`, writes a tiny params.yaml (model width 4, 1 block, optdigits source,
1 epoch everywhere), and makes it a git + DVC repository with one commit, so
`dvc repro`, the stages and the flows run there exactly as in the real project
but in seconds. Commands run in it import that copy (cwd first on sys.path).
MLflow goes to a sqlite store inside it; DVC analytics are off (no network here).

`tiny_project` is a pytest fixture with no tasks yet; request it in a test module
with `from project import tiny_project  # noqa: F401`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE = ("xbar", "workflow", "stages", "flows", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml")
TINY_SOURCE = {"source": "optdigits"}


def tiny_params(tasks: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The shipped params.yaml shrunk to seconds per stage; `tasks` maps name -> spec (without `after`)."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["model"] = {**data.get("model", {}), "name": "small_resnet", "width": 4, "blocks": 1}
    data["source"] = {"dataset": TINY_SOURCE, "epochs": 1, "lr": 0.1}
    data["quant"] = {**data.get("quant", {}), "epochs": 1}
    data.setdefault("train", {})["threads"] = 1  # two stages' tests may share 2 cores
    chained, after = {}, "backbone"
    for name, spec in (tasks or {}).items():
        chained[name] = {"after": after, "dataset": "optdigits", "epochs": 1, **spec}
        after = name
    data["tasks"] = chained
    return data


def image_folder(root: Path, classes: list[str], mode: str = "L", per_class: int = 3) -> Path:
    """A tiny ImageFolder: `per_class` random 8x8 PNGs in a sub-directory per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (8, 8, 3) if mode == "RGB" else (8, 8)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


@dataclass
class TinyProject:
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """A command in the project (argument list, no shell), output captured."""
        out = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        return out

    def python(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, *args, timeout=timeout, check=check)

    def dvc(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return self.python("-m", "dvc", *args, timeout=timeout, check=check)


def project_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),  # DVC's `python`
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "xbar tests", "GIT_AUTHOR_EMAIL": "tests@xbar.invalid",
        "GIT_COMMITTER_NAME": "xbar tests", "GIT_COMMITTER_EMAIL": "tests@xbar.invalid",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("XBAR_PIPELINE_RUN", None)
    return env


def make_tiny_project(dest: Path, tasks: dict[str, dict[str, Any]] | None = None, git: bool = True) -> TinyProject:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*.swp")
    for name in CODE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text("# tiny test configuration (tests/project.py)\n"
                                      + yaml.safe_dump(tiny_params(tasks), sort_keys=False))
    project = TinyProject(dest, project_env(dest))
    if git:
        project.run("git", "init", "-q")
        project.dvc("init", "-q")
        project.run("git", "add", "-A")
        project.run("git", "commit", "-q", "-m", "tiny project")
    return project


@pytest.fixture
def tiny_project(tmp_path: Path) -> TinyProject:
    """A git + DVC copy of the project with tiny params and no tasks."""
    return make_tiny_project(tmp_path / "project")
