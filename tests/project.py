"""A tiny, self-contained copy of the project for integration tests (import: `from project import ...`).

`make_tiny_project(dest, tasks)` copies the code (xbar, workflow, stages, flows, dvc.yaml)
into `dest`, writes a tiny params.yaml (model width 4, 1 block, optdigits source,
1 epoch everywhere), and makes it a git + DVC repository with one commit, so
`dvc repro`, the stages and the flows run there exactly as in the real project
but in seconds. Commands run in it import that copy (cwd first on sys.path).
MLflow goes to a sqlite store inside it; DVC analytics are off (no network here).

`stage`, `CLI` and `tree_digest` are the commands the tests run in such a project and how they
check that nothing was written. The fixtures built from these (`tiny_project`, `built`) are in
tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE = ("xbar", "workflow", "stages", "flows", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml")
TINY_SOURCE = {"source": "optdigits"}
CLI = [sys.executable, "-m", "xbar.cli"]
BACKBONE_STAGES = ("pretrain", "quantize", "deploy_backbone")
T1_STAGES = ("rank_pes", "train_masks", "program_spares", "simulate_energy")  # task t1's stages but evaluate


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


def stage(name: str, task: str | None = None) -> list[str]:
    """The command line of stage `name` (of `task`)."""
    return [sys.executable, "-m", f"stages.{name}", *(["--task", task] if task else [])]


def run_stages(project: TinyProject, names: tuple[str, ...], task: str | None = None) -> None:
    for name in names:
        project.run(*stage(name, task), timeout=600)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
