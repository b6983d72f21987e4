"""Reliability (issue #8), 1: bad input is one line, exit 2, and writes nothing.

BAD_INPUT, one table: the real command (`python -m stages.<stage>` or `python -m xbar.cli ...`)
run in a tiny project exits 2 with exactly one stderr line, `error: ...`, naming the field or
file, and writes nothing: every file of the project is byte-identical afterwards (hashed). Rows
marked slow need a built backbone and task (the `built` fixture, tests/conftest.py).

The add-task refusals of test_flows.py's BAD table (bad or reserved names, unknown
dataset / method, out-of-range options) are not repeated here.

The other reliability guarantees: test_kill_resume.py (kill -9, then run again),
test_concurrency.py (two add-task at once), test_mlflow_faults.py, test_security.py.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from project import CLI, TinyProject, make_tiny_project, stage, tree_digest


def quiet_env(project: TinyProject) -> dict[str, str]:
    """The project's environment, without .pyc writes (so "nothing written" means nothing at all)."""
    env = {**project.env, "PYTHONDONTWRITEBYTECODE": "1", "PREFECT_HOME": str(project.root / ".prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return env


# --- editing a project ---------------------------------------------------------------------------------------


def set_param(*path: str, value: Any) -> Callable[[Path], None]:
    """Set params.yaml's `path` (keys) to `value`."""

    def edit(root: Path) -> None:
        data = yaml.safe_load((root / "params.yaml").read_text())
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    return edit


def rename_task(new: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = yaml.safe_load((root / "params.yaml").read_text())
        data["tasks"] = {(new if k == "t1" else k): ({**v, "after": new} if v.get("after") == "t1" else v)
                         for k, v in data["tasks"].items()}
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    return edit


def write_text(rel: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_text(text)


def append_text(rel: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_text((root / rel).read_text() + text)


def truncate(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = (root / rel).read_bytes()
        assert len(data) > 16, rel
        (root / rel).write_bytes(data[: len(data) // 2])

    return edit


def garble(rel: str) -> Callable[[Path], None]:
    """Same size, random bytes."""
    def edit(root: Path) -> None:
        size = (root / rel).stat().st_size
        (root / rel).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())

    return edit


def torch_file(rel: str, obj: Any) -> Callable[[Path], None]:
    """A well-formed torch file with the wrong content."""
    def edit(root: Path) -> None:
        import torch

        torch.save(obj, root / rel)

    return edit


def image_folder(rel: str, classes: int, per_class: int = 10, corrupt: int = 0) -> Callable[[Path], None]:
    """An ImageFolder dataset of 9x7 grey PNGs (any size is resized);
    `corrupt` non-image .png files in the last class."""
    def edit(root: Path) -> None:
        from PIL import Image

        for c in range(classes):
            folder = root / rel / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                path = folder / f"{i}.png"
                if c == classes - 1 and i < corrupt:
                    path.write_bytes(b"not a png")
                else:
                    Image.fromarray(np.full((9, 7), (c * 97 + i * 13) % 256, np.uint8)).save(path)

    return edit


def rgb_project(root: Path) -> None:
    """The source and every task as 3-channel images (grey images are replicated)."""
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["source"]["dataset"] = {**data["source"]["dataset"], "channels": 3}
    for spec in data["tasks"].values():
        spec["dataset"] = {"source": spec["dataset"], "channels": 3} if isinstance(spec["dataset"], str) \
            else {**spec["dataset"], "channels": 3}
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def state_dict_file(rel: str) -> Callable[[Path], None]:
    """A well-formed state_dict of no torchvision architecture."""
    def edit(root: Path) -> None:
        import torch

        torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, root / rel)

    return edit


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)

    return edit


# --- the table ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    cmd: list[str]
    words: tuple[str, ...]  # the error line names the field or file
    edit: Callable[[Path], None] | None = None
    built: bool = False  # needs the backbone and task t1 built (slow)
    env: dict[str, str] = field(default_factory=dict)  # "{root}" is replaced by the project's root


def row(case_id: str, bad: Bad):  # noqa: ANN201
    return pytest.param(bad, id=case_id, marks=[pytest.mark.slow] if bad.built else [])


T1 = ("tasks", "t1")
CUDA = torch.cuda.is_available()
PRETRAIN, RANK = stage("pretrain"), stage("rank_pes", "t1")
ADD = [*CLI, "add-task"]  # + name
DIGITS = ["--dataset", "optdigits"]
NAME = "simple identifier"  # xbar.params.check_task_name's refusal
BAD_INPUT = [
    # params.yaml: syntax, unknown keys, types
    row("yaml-malformed", Bad(PRETRAIN, ("params.yaml", "not valid YAML"), append_text("params.yaml", "seed: [0\n"))),
    row("yaml-not-a-mapping", Bad(PRETRAIN, ("params.yaml", "mapping"), write_text("params.yaml", "- 1\n- 2\n"))),
    row("yaml-binary", Bad(PRETRAIN, ("params.yaml",), lambda r: (r / "params.yaml").write_bytes(b"\xff\xfe\x00"))),
    row("unknown-key", Bad(PRETRAIN, ("colour", "unknown key"), set_param("colour", value="red"))),
    row("unknown-nested-key", Bad(PRETRAIN, ("train.lrr", "unknown key"), set_param("train", "lrr", value=0.1))),
    row("unknown-task-key", Bad(RANK, ("tasks.t1.lr", "unknown key"), set_param(*T1, "lr", value=1))),
    row("wrong-type", Bad(PRETRAIN, ("train.batch_size",), set_param("train", "batch_size", value="big"))),
    row("wrong-type-task", Bad(RANK, ("tasks.t1.epochs",), set_param(*T1, "epochs", value="three"))),
    # task names in params.yaml and on the command line
    row("name-slash", Bad(PRETRAIN, ("'a/b'", NAME), rename_task("a/b"))),
    row("name-dotdot", Bad(PRETRAIN, ("'..'", NAME), rename_task(".."))),
    row("name-duplicate", Bad(PRETRAIN, ("params.yaml", "duplicate key 't1'"),
                              append_text("params.yaml", "  t1:\n    after: t2\n    dataset: optdigits\n"))),
    row("stage-task-path", Bad(stage("train_masks", "../t1"), ("--task", "'../t1'", "not a task"))),
    row("cli-name-slash", Bad([*ADD, "a/b", *DIGITS], ("'a/b'", NAME))),
    row("cli-name-dotdot", Bad([*ADD, "..", *DIGITS], ("'..'", NAME))),
    row("cli-name-space", Bad([*ADD, "a b", *DIGITS], ("'a b'", NAME))),
    row("cli-name-control", Bad([*ADD, "a\x1bb", *DIGITS], ("'a\\x1bb'", NAME))),
    row("cli-name-newline", Bad([*ADD, "a\nb", *DIGITS], ("'a\\nb'", NAME))),
    row("cli-name-too-long", Bad([*ADD, "x" * 33, *DIGITS], ("x" * 33, NAME))),
    row("cli-name-empty", Bad([*ADD, "", *DIGITS], ("''", NAME))),
    row("cli-name-used", Bad([*ADD, "t2", *DIGITS], ("'t2'", "already exists"))),
    # datasets, methods, ranges
    row("unknown-dataset", Bad(RANK, ("tasks.t1.dataset",), set_param(*T1, "dataset", value="cifar1000"))),
    row("unknown-method", Bad(RANK, ("tasks.t1.method",), set_param(*T1, "method", value="magic"))),
    row("spare-ratio-zero", Bad(RANK, ("tasks.t1.spare_ratio",), set_param(*T1, "spare_ratio", value=0))),
    row("spare-ratio-negative", Bad(RANK, ("tasks.t1.spare_ratio",), set_param(*T1, "spare_ratio", value=-0.1))),
    row("spare-ratio-above-one", Bad(RANK, ("tasks.t1.spare_ratio",), set_param(*T1, "spare_ratio", value=1.5))),
    row("spare-ratio-above-chip", Bad(RANK, ("spare_pe_ratio",), set_param(*T1, "spare_ratio", value=0.5))),
    row("shift-levels-negative", Bad(RANK, ("tasks.t1.shift_levels",), set_param(*T1, "shift_levels", value=-1))),
    row("shift-levels-four", Bad(RANK, ("tasks.t1.shift_levels",), set_param(*T1, "shift_levels", value=4))),
    row("cli-spare-ratio-negative", Bad([*ADD, "t3", *DIGITS, "--spare-ratio", "-0.1"], ("spare_ratio",))),
    row("cli-shift-levels-negative", Bad([*ADD, "t3", *DIGITS, "--shift-levels", "-1"], ("shift_levels",))),
    row("cli-memory-shift-levels", Bad([*CLI, "memory", "--model", "small_resnet", "--shift-levels", "4"],
                                       ("--shift-levels",))),
    row("cli-memory-spare-ratio", Bad([*CLI, "memory", "--model", "small_resnet", "--spare-ratio", "0"],
                                      ("--spare-ratio",))),
    row("cli-energy-scenario-unknown", Bad([*CLI, "energy", "--model", "small_resnet", "--preset", "paper",
                                            "--scenario", "nope"], ("--scenario", "steady", "first-task", "paper"))),
    row("cli-wrong-type", Bad([*ADD, "t3", *DIGITS, "--epochs", "three"], ("'--epochs'",))),
    row("cli-unknown-option", Bad([*ADD, "t3", *DIGITS, "--lr", "1"], ("--lr",))),
    # zero or negative epochs, crossbar sizes, energy constants
    row("task-epochs-zero", Bad(RANK, ("tasks.t1.epochs",), set_param(*T1, "epochs", value=0))),
    row("task-epochs-negative", Bad(RANK, ("tasks.t1.epochs",), set_param(*T1, "epochs", value=-2))),
    row("source-epochs-zero", Bad(PRETRAIN, ("source.epochs", "model.weights"), set_param("source", "epochs", value=0))),
    row("quant-epochs-negative", Bad(stage("quantize"), ("quant.epochs",), set_param("quant", "epochs", value=-1))),
    row("cli-epochs-negative", Bad([*ADD, "t3", *DIGITS, "--epochs", "-2"], ("epochs",))),
    row("crossbar-rows-zero", Bad(stage("deploy_backbone"), ("crossbar.rows",), set_param("crossbar", "rows", value=0))),
    row("crossbar-cols-negative", Bad(stage("deploy_backbone"), ("crossbar.cols",),
                                      set_param("crossbar", "cols", value=-72))),
    row("energy-constant-zero", Bad(stage("program_spares", "t1"), ("energy.overrides.read_j",),
                                    set_param("energy", "overrides", value={"read_j": 0.0}))),
    row("energy-constant-negative", Bad(stage("simulate_energy", "t1"), ("energy.overrides.adc_j",),
                                        set_param("energy", "overrides", value={"adc_j": -1e-12}))),
    row("energy-preset-unknown", Bad(stage("program_spares", "t1"), ("energy.preset",),
                                     set_param("energy", "preset", value="nope"))),
    # datasets the backbone cannot take
    row("dataset-rgb-on-grey-backbone", Bad(RANK, ("tasks.t1.dataset.channels",),
                                            set_param(*T1, "dataset", value={"source": "optdigits", "channels": 3}))),
    row("dataset-image-size-not-the-backbones", Bad(RANK, ("tasks.t1.dataset.image_size", "28x28"),
                                                    set_param(*T1, "dataset", value={"source": "optdigits",
                                                                                     "image_size": 32}))),
    row("torchvision-dataset-not-under-root", Bad(RANK, ("dataset CIFAR10", "cannot open under data/cifar"),
                                                  set_param(*T1, "dataset", value={"source": "torchvision",
                                                                                   "name": "CIFAR10",
                                                                                   "root": "data/cifar"}))),
    row("model-weights-not-a-state-dict", Bad(PRETRAIN, ("model.weights", "w.pt"), both(
        rgb_project, write_text("w.pt", "not a checkpoint"),
        set_param("model", value={"name": "resnet18", "weights": "w.pt"})))),
    row("model-weights-other-architecture", Bad(PRETRAIN, ("model.weights", "w.pt", "resnet18"), both(
        rgb_project, state_dict_file("w.pt"), set_param("model", value={"name": "resnet18", "weights": "w.pt"})))),
    row("model-weights-grey-source", Bad(PRETRAIN, ("model.weights", "source.dataset.channels"), both(
        state_dict_file("w.pt"), set_param("model", value={"name": "resnet18", "weights": "w.pt"})))),
    row("normalize-stats-wrong-length", Bad(PRETRAIN, ("model.normalize", "channel"), set_param(
        "model", "normalize", value={"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}))),
    # train.device (#17): the field's values, and cuda asked for on a machine without it, from any stage
    row("device-unknown", Bad(PRETRAIN, ("train.device", "'auto', 'cpu' or 'cuda'"),
                              set_param("train", "device", value="gpu"))),
    pytest.param(Bad(PRETRAIN, ("train.device: cuda asked for", "no CUDA device", "use auto or cpu"),
                     set_param("train", "device", value="cuda")), id="device-cuda-without-cuda-pretrain",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    pytest.param(Bad(RANK, ("train.device: cuda asked for",), set_param("train", "device", value="cuda")),
                 id="device-cuda-without-cuda-rank", marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    row("crop-larger-than-image", Bad(RANK, ("tasks.t1.dataset", "crop 40", "image_size 28"),
                                      set_param(*T1, "dataset", value={"source": "optdigits", "crop": 40}))),
    row("imagefolder-single-class", Bad(RANK, ("data/one", "at least 2 classes"), both(
        image_folder("data/one", classes=1),
        set_param(*T1, "dataset", value={"source": "imagefolder", "root": "data/one"})))),
    row("imagefolder-no-class", Bad(RANK, ("dataset.root", "data/none"), both(
        lambda r: (r / "data/none").mkdir(parents=True),
        set_param(*T1, "dataset", value={"source": "imagefolder", "root": "data/none"})))),
    # corrupt or truncated artifacts (backbone, masks, deployment state)
    row("checkpoint-truncated", Bad(RANK, ("artifacts/backbone/quant.pt", "corrupt or truncated"),
                                    truncate("artifacts/backbone/quant.pt"), built=True)),
    row("checkpoint-garbled", Bad(stage("program_spares", "t1"), ("artifacts/backbone/levels.pt",),
                                  garble("artifacts/backbone/levels.pt"), built=True)),
    row("checkpoint-missing", Bad(stage("quantize"), ("artifacts/backbone/fp32.pt", "missing"),
                                  lambda r: (r / "artifacts/backbone/fp32.pt").unlink(), built=True)),
    row("mask-truncated", Bad(stage("program_spares", "t1"), ("artifacts/tasks/t1/task.pt", "corrupt or truncated"),
                              truncate("artifacts/tasks/t1/task.pt"), built=True)),
    row("mask-wrong-content", Bad(stage("program_spares", "t1"), ("artifacts/tasks/t1/task.pt",),
                                  torch_file("artifacts/tasks/t1/task.pt", {"method": "xma2"}), built=True)),
    row("ranking-corrupt", Bad(stage("train_masks", "t1"), ("artifacts/tasks/t1/ranking.parquet",),
                               garble("artifacts/tasks/t1/ranking.parquet"), built=True)),
    row("deployment-json-truncated", Bad(stage("program_spares", "t2"), ("artifacts/tasks/t1/deployment.json",),
                                         truncate("artifacts/tasks/t1/deployment.json"), built=True)),
    row("deployment-tensors-truncated", Bad(stage("program_spares", "t2"), ("artifacts/tasks/t1/deployment.pt",),
                                            truncate("artifacts/tasks/t1/deployment.pt"), built=True)),
    row("imagefolder-corrupt-image", Bad(RANK, ("data/bad/class1/", "unreadable image"), both(
        image_folder("data/bad", classes=2, corrupt=3),
        set_param(*T1, "dataset", value={"source": "imagefolder", "root": "data/bad"}),
        set_param(*T1, "rank_batch_size", value=16)), built=True)),
    # an absurd learning rate: NaN loss, and the previous outputs stay as they were
    row("nan-loss-task", Bad(stage("train_masks", "t1"), ("loss is nan", "lower train.lr"), both(
        set_param("train", "lr", value=1e30), set_param("train", "mask_lr", value=1e30)), built=True)),
    row("nan-loss-pretrain", Bad(PRETRAIN, ("loss is", "learning rate"),
                                 set_param("source", "lr", value=1e30), built=True)),
    row("lr-overflow-task", Bad(stage("train_masks", "t1"), ("overflowed", "lower train.lr"),
                                set_param("train", "lr", value=1e300), built=True)),
    # the MLflow store cannot be created (its directory would be under a file): retried, then one line
    row("mlflow-unreachable", Bad(stage("evaluate", "t1"), ("MLflow store",), built=True,
                                  env={"MLFLOW_TRACKING_URI": "sqlite:///{root}/params.yaml/mlflow.db"})),
]


@pytest.mark.parametrize("bad", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad: Bad, tmp_path: Path, request: pytest.FixtureRequest):
    if bad.built:
        source: TinyProject = request.getfixturevalue("built")
        shutil.copytree(source.root, tmp_path / "project", symlinks=True)
        project = TinyProject(tmp_path / "project", {**source.env})
        project.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project.root / 'mlflow.db'}"
    else:
        project = make_tiny_project(tmp_path / "project", {"t1": {}, "t2": {}}, git=False)
    if bad.edit:
        bad.edit(project.root)
    before = tree_digest(project.root)
    env = {**quiet_env(project), **{k: v.replace("{root}", str(project.root)) for k, v in bad.env.items()}}
    out = subprocess.run(bad.cmd, cwd=project.root, env=env, capture_output=True, text=True, timeout=300)
    lines = out.stderr.splitlines()
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-4000:]
    for word in bad.words:
        assert word in lines[0], (word, lines[0])
    after = tree_digest(project.root)
    assert after == before, {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
