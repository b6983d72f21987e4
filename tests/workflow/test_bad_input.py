"""Reliability and security guarantees (issue #8), each shown by running the real command.

1. Bad input (BAD_INPUT, one table): the real command (`python -m stages.<stage>` or
   `python -m xbar.cli ...`) run in a tiny project exits 2 with exactly one stderr line,
   `error: ...`, naming the field or file, and writes nothing: every file of the project is
   byte-identical afterwards (hashed). Rows marked slow need a built backbone and task.
2. `kill -9` half-way through writing a stage output, then `dvc repro` again: the killed
   task completes, the earlier task and the backbone stay byte-identical, a torn temp file
   never becomes the output and is cleaned up, the deployment state is consistent.
3. Two `xbar add-task` at once are serialized by the workspace lock: both tasks learned.
4. MLflow faults: retries with backoff on I/O errors (a locked store is waited for), one clear
   line when the store stays unavailable, and never a half-registered backbone or task run;
   Prefect retries only `dvc repro` and only on transient failures.
5. Security: a scan of xbar/, workflow/, stages/, flows/, benchmarks/ for unsafe loading, shells and 0.0.0.0.

The add-task refusals of test_flows.py's BAD table (bad or reserved names, unknown
dataset / method, out-of-range options) are not repeated here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from project import ROOT, TinyProject, make_tiny_project

CLI = [sys.executable, "-m", "xbar.cli"]
BACKBONE_STAGES = ("pretrain", "quantize", "map_crossbars", "deploy_backbone")
T1_STAGES = ("rank_pes", "train_masks", "program_spares", "simulate_energy")


def stage(name: str, task: str | None = None) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}", *(["--task", task] if task else [])]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


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
    row("cli-wrong-type", Bad([*ADD, "t3", *DIGITS, "--epochs", "three"], ("'--epochs'",))),
    row("cli-unknown-option", Bad([*ADD, "t3", *DIGITS, "--lr", "1"], ("--lr",))),
    # zero or negative epochs, crossbar sizes, energy constants
    row("task-epochs-zero", Bad(RANK, ("tasks.t1.epochs",), set_param(*T1, "epochs", value=0))),
    row("task-epochs-negative", Bad(RANK, ("tasks.t1.epochs",), set_param(*T1, "epochs", value=-2))),
    row("source-epochs-zero", Bad(PRETRAIN, ("source.epochs",), set_param("source", "epochs", value=0))),
    row("quant-epochs-negative", Bad(stage("quantize"), ("quant.epochs",), set_param("quant", "epochs", value=-1))),
    row("cli-epochs-negative", Bad([*ADD, "t3", *DIGITS, "--epochs", "-2"], ("epochs",))),
    row("crossbar-rows-zero", Bad(stage("map_crossbars"), ("crossbar.rows",), set_param("crossbar", "rows", value=0))),
    row("crossbar-cols-negative", Bad(stage("map_crossbars"), ("crossbar.cols",),
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
        write_text("w.pt", "not a checkpoint"),
        set_param("model", value={"name": "resnet18", "weights": "w.pt"})))),
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
    row("nan-loss-task", Bad(stage("train_masks", "t1"), ("loss is nan", "learning rate"), both(
        set_param("train", "lr", value=1e30), set_param("train", "mask_lr", value=1e30)), built=True)),
    row("nan-loss-pretrain", Bad(PRETRAIN, ("loss is", "learning rate"),
                                 set_param("source", "lr", value=1e30), built=True)),
    row("lr-overflow-task", Bad(stage("train_masks", "t1"), ("overflowed", "learning rate"),
                                set_param("train", "lr", value=1e300), built=True)),
    # the MLflow store cannot be created (its directory would be under a file): retried, then one line
    row("mlflow-unreachable", Bad(stage("evaluate", "t1"), ("MLflow store",), built=True,
                                  env={"MLFLOW_TRACKING_URI": "sqlite:///{root}/params.yaml/mlflow.db"})),
]


def _run_stages(project: TinyProject, names: tuple[str, ...], task: str | None = None) -> None:
    for name in names:
        project.run(*stage(name, task), timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> TinyProject:
    """A tiny project (tasks t1, t2) with the backbone and every t1 stage but evaluate run (no DVC, no MLflow)."""
    project = make_tiny_project(tmp_path_factory.mktemp("built") / "project", {"t1": {}, "t2": {}}, git=False)
    _run_stages(project, BACKBONE_STAGES)
    _run_stages(project, T1_STAGES, "t1")
    return project


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


# --- 2. kill -9 mid-write, then run again -----------------------------------------------------------------------


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def _kill_while_writing(project: TinyProject, target: str, log: Path, timeout_s: float = 400) -> None:
    """`dvc repro` with the write of `target` stopped half-way (XBAR_TEST_PAUSE_WRITE); kill -9 its process group."""
    from workflow.io import PAUSE_WRITE_ENV

    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project.root, stdout=out,
                                stderr=subprocess.STDOUT, env={**project.env, PAUSE_WRITE_ENV: target},
                                process_group=0)
    try:
        deadline = time.monotonic() + timeout_s
        while f"paused writing {target}" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dvc repro never reached the write of {target}:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)  # reaped: DVC's rwlock sees a dead pid, not a zombie


@pytest.mark.slow
def test_kill_9_mid_write_then_rerun_completes_the_task_and_keeps_earlier_bytes(tmp_path: Path):
    project = make_tiny_project(tmp_path / "project", {"t1": {}, "t2": {"method": "xma2", "shift_levels": 1}})
    project.dvc("repro", "map_crossbars", "evaluate@t1")  # (the mapping tables are no task's dependency)
    root = project.root
    earlier = ("artifacts/backbone", "artifacts/mapping", "artifacts/tasks/backbone", "artifacts/tasks/t1",
               "metrics/tasks/t1")

    def earlier_bytes() -> dict[str, str]:
        return {f"{d}/{k}": v for d in earlier for k, v in tree_digest(root / d).items()}

    before = earlier_bytes()
    t2 = root / "artifacts/tasks/t2"
    # train_masks@t2 killed half-way through task.pt; program_spares@t2 killed after deployment.pt,
    # half-way through deployment.json (the deployment state's two files out of step).
    for target in ("artifacts/tasks/t2/task.pt", "artifacts/tasks/t2/deployment.json"):
        _kill_while_writing(project, target, tmp_path / "killed.log")
        assert not (root / target).exists()  # the torn bytes never reached the real name
        torn = [p for p in _temps(t2) if p.name.startswith(f".{Path(target).name}.")]
        assert torn and 0 < torn[0].stat().st_size, _temps(t2)
        assert earlier_bytes() == before

    out = project.dvc("repro")  # run again
    assert "Running stage 'evaluate@t2'" in out.stdout
    assert earlier_bytes() == before
    assert _temps(root / "artifacts") == [] and _temps(root / "metrics") == []  # the killed writers' temp files
    evaluation = json.loads((root / "metrics/tasks/t2/evaluate.json").read_text())
    at_learn_t1 = json.loads((root / "metrics/tasks/t1/evaluate.json").read_text())["accuracy_at_learn"]
    assert evaluation["gate"] == "passed" and evaluation["accuracy"]["t1"] == at_learn_t1
    meta = json.loads((t2 / "deployment.json").read_text())  # the two files of the state belong together
    assert meta["tensors_sha256"] == hashlib.sha256((t2 / meta["tensors"]).read_bytes()).hexdigest()
    held = {s["task"] for s in meta["slots"] if s}  # spare PEs are placed to save writes (HA3M): t2's may reuse t1's
    assert meta["serving"] == "t2" and "t2" in held and held <= {"t1", "t2"}
    assert "up to date" in project.dvc("status").stdout


# --- 3. two add-task triggers at once ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_add_task_commands_at_once_are_serialized_and_both_learned(tmp_path: Path):
    project = make_tiny_project(tmp_path / "project")
    project.dvc("repro")  # the backbone (no task yet): the test's time goes to the two tasks
    env = {**project.env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    forms = {"alpha": ["--dataset", "optdigits", "--epochs", "1"],
             "beta": ["--dataset", "lfw_faces", "--epochs", "1", "--shift-levels", "1"]}
    procs = {name: subprocess.Popen([*CLI, "add-task", name, *args], cwd=project.root, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in forms.items()}
    outputs = {name: proc.communicate(timeout=900)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-6000:]}"
    assert any("waiting for the workspace lock" in o for o in outputs.values()), outputs  # one did wait

    from xbar.params import load_params

    params = load_params(project.params)  # valid, both tasks, chained in the order they were learned
    first, second = params.tasks
    assert {first, second} == set(forms)
    assert (params.tasks[first].after, params.tasks[second].after) == ("backbone", first)
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert {f"evaluate@{first}", f"evaluate@{second}"} <= set(lock["stages"])
    assert "up to date" in project.dvc("status").stdout  # dvc.lock matches the workspace
    t2 = project.root / "artifacts/tasks" / second
    meta = json.loads((t2 / "deployment.json").read_text())
    assert meta["tensors_sha256"] == hashlib.sha256((t2 / meta["tensors"]).read_bytes()).hexdigest()
    held = {s["task"] for s in meta["slots"] if s}
    assert meta["serving"] == second and second in held and held <= {first, second}
    row = json.loads((project.root / f"metrics/tasks/{second}/evaluate.json").read_text())
    assert row["accuracy"][first] == json.loads(
        (project.root / f"metrics/tasks/{first}/evaluate.json").read_text())["accuracy_at_learn"]

    from mlflow import MlflowClient

    client = MlflowClient(project.mlflow_uri)
    exp = client.get_experiment_by_name("xbar")
    for name in forms:
        runs = client.search_runs([exp.experiment_id], f"tags.`xbar.task` = '{name}'")
        assert len(runs) == 1 and runs[0].data.tags["xbar.gate"] == "passed" and runs[0].info.status == "FINISHED"


# --- 4. MLflow faults ---------------------------------------------------------------------------------------------


def test_mlflow_retry_backs_off_on_io_errors_then_gives_one_line(monkeypatch: pytest.MonkeyPatch):
    from sqlalchemy.exc import OperationalError

    from workflow import tracking
    from xbar.errors import UserError

    waits: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", waits.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return "ok"

    assert tracking.retry(flaky, "logging") == "ok" and len(calls) == 3
    assert waits == [0.5, 1.0]  # backoff doubles

    waits.clear()

    def down() -> None:
        raise OSError("disk I/O error\nsecond line")

    with pytest.raises(UserError) as info:
        tracking.retry(down, "creating a run", attempts=4)
    assert waits == [0.5, 1.0, 2.0]
    assert "\n" not in str(info.value) and "unavailable while creating a run: disk I/O error" in str(info.value)

    def bug() -> None:  # not I/O: never retried, never hidden
        raise KeyError("accuracy_at_learn")

    waits.clear()
    with pytest.raises(KeyError):
        tracking.retry(bug, "reading")
    assert waits == []

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    def refused() -> None:  # the store answered: a bad value is not an outage
        raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException, match="not allowed"):
        tracking.retry(refused, "logging")
    assert waits == []


def test_prefect_retries_only_what_waiting_can_fix():
    """The one Prefect task that retries is `dvc repro`, and only on transient failures
    (test_flows.py::test_only_transient_failures_are_retried checks which those are); flows never retry."""
    from prefect.states import Failed

    from flows.continual import continual
    from flows.dvc import StageFailed, dvc_repro, retry_transient
    from flows.new_task import new_task
    from xbar.errors import UserError

    assert dvc_repro.retries == 2 and dvc_repro.retry_condition_fn is retry_transient
    assert not new_task.retries and not continual.retries
    assert not retry_transient(None, None, Failed(data=StageFailed("stage x failed (exit 2): bad", 2)))
    assert not retry_transient(None, None, Failed(data=UserError("params.yaml: seed: bad")))
    assert retry_transient(None, None, Failed(data=StageFailed("could not start dvc", -1, transient=True)))


@pytest.mark.slow
def test_mlflow_locked_or_failing_mid_way_leaves_no_half_registered_task(built: TinyProject, tmp_path: Path):
    from mlflow import MlflowClient

    shutil.copytree(built.root, tmp_path / "project", symlinks=True)
    root = tmp_path / "project"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**built.env, "MLFLOW_TRACKING_URI": uri, "PYTHONDONTWRITEBYTECODE": "1"}
    client = MlflowClient(uri)
    blocked = root / "blocked-artifacts"  # a file where the experiment's artifact directory should be
    exp = client.create_experiment("xbar", artifact_location=blocked.as_uri())
    metrics = root / "metrics/tasks/t1/evaluate.json"

    def evaluate() -> subprocess.CompletedProcess:
        return subprocess.run(stage("evaluate", "t1"), cwd=root, env=env, capture_output=True, text=True, timeout=600)

    def runs(kind: str) -> list:
        return client.search_runs([exp], f"tags.`xbar.kind` = '{kind}'")

    def learned() -> list[tuple[str, str]]:
        from workflow.tracking import Tracker, report

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            return [(t["name"], t["gate"], t["run_id"]) for t in report(Tracker())["tasks"]]

    def failed_with_one_line(out: subprocess.CompletedProcess, words: str) -> None:
        assert out.returncode == 2, out.stderr[-3000:]
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: MLflow store"), out.stderr[-3000:]
        assert words in out.stderr and not metrics.exists()

    # (a) the artifact store fails while the backbone run is logged: one line, and that run is never reused
    blocked.write_text("blocked\n")
    failed_with_one_line(evaluate(), "logging")
    assert runs("task") == [] and [r.info.status for r in runs("backbone")] == ["FAILED"]

    # (b) the store is back but held by an exclusive transaction when evaluate reaches it: it waits, then
    # registers the task once, completely
    blocked.unlink()
    holder = sqlite3.connect(root / "mlflow.db", timeout=0, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = subprocess.Popen(stage("evaluate", "t1"), cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not _has_open(proc.pid, "mlflow.db"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        assert proc.poll() is None  # it cannot finish without writing: it is waiting for the store
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(metrics.read_text())["gate"] == "passed"
    (good,) = learned()
    assert good[:2] == ("t1", "passed")

    # (c) it fails again after the task run was created and its metrics logged: the run stays "pending"
    metrics.unlink()
    shutil.rmtree(blocked)  # the artifacts logged in (b)
    blocked.write_text("blocked\n")
    failed_with_one_line(evaluate(), "logging")
    cut = [r for r in runs("task") if r.info.run_id != good[2]]
    assert len(cut) == 1 and cut[0].data.tags["xbar.gate"] == "pending" and cut[0].info.status == "FAILED"
    assert "accuracy_at_learn" in cut[0].data.metrics  # it did get half-way
    assert learned() == [good]  # ... and is not a learned task


def _has_open(pid: int, name: str) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).endswith(name):
                return True
        except OSError:
            continue
    return False


# --- 5. security: a scan of the source tree -------------------------------------------------------------------------

SCANNED = ("xbar", "workflow", "stages", "flows", "benchmarks")
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "_UniqueKeyLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_calls(source: str, name: str = "<source>") -> list[str]:
    """Every unsafe construct in one Python file, as `name:line: what`."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch", "dill", "marshal", "shelve"):
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler"):
                    found.append(f"{where}: from {node.module} import {alias.name}")
        if isinstance(node, ast.ClassDef):
            if any(_dotted(b).endswith("Unpickler") for b in node.bases) and not any(
                    isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                found.append(f"{where}: unpickler {node.name} without find_class (restricted unpickler)")
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if func.endswith("torch.load"):
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                found.append(f"{where}: torch.load without weights_only=True")
        if func in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "marshal.loads",
                    "shelve.open", "yaml.unsafe_load", "yaml.full_load", "os.system", "os.popen", "eval", "exec",
                    "subprocess.getoutput", "subprocess.getstatusoutput"):
            found.append(f"{where}: {func}")
        if func.endswith("np.load") or func.endswith("numpy.load"):
            allow = kw.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value:
                found.append(f"{where}: np.load with allow_pickle=True")
        if func == "yaml.load":
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if _dotted(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{where}: yaml.load without a safe loader")
        shell = kw.get("shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append(f"{where}: {func}(shell=...)")
    return found


def test_scanner_flags_each_unsafe_construct():
    """The scan below would catch a regression: each construct here is flagged."""
    bad = {
        "import torch\ntorch.load('x.pt')": "weights_only",
        "import torch\ntorch.load('x.pt', weights_only=False)": "weights_only",
        "import pickle\npickle.load(open('x', 'rb'))": "pickle.load",
        "import pickle\npickle.loads(b'')": "pickle.loads",
        "from pickle import loads": "import loads",
        "import pickle\nclass U(pickle.Unpickler):\n    pass": "find_class",
        "import subprocess\nsubprocess.run('ls', shell=True)": "shell",
        "import subprocess, os\nsubprocess.Popen(['ls'], shell=os.environ.get('X'))": "shell",
        "import os\nos.system('ls')": "os.system",
        "import yaml\nyaml.load('a: 1', Loader=yaml.Loader)": "safe loader",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)": "allow_pickle",
    }
    for code, words in bad.items():
        found = unsafe_calls(code)
        assert found and words in found[0], (code, found)
    assert unsafe_calls("import torch\ntorch.load('x', map_location='cpu', weights_only=True)") == []
    assert unsafe_calls("import subprocess\nsubprocess.run(['ls'], shell=False)") == []


def test_source_tree_has_no_unsafe_loading_shells_or_open_binds():
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            text = path.read_text()
            found += unsafe_calls(text, rel)
            found += [f"{rel}: binds 0.0.0.0" for line in text.splitlines() if "0.0.0.0" in line]
    # servers the docs tell people to start listen on 127.0.0.1 only
    for path in [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "0.0.0.0" in line:
                found.append(f"{path.name}:{n}: 0.0.0.0")
            if re.search(r"(prefect server start|mlflow (ui|server))\b", line) and "--host 127.0.0.1" not in line:
                found.append(f"{path.name}:{n}: a server started without --host 127.0.0.1")
    assert found == []
    # the one pickle reader is the restricted unpickler of Animal-MNIST (numpy arrays only)
    from xbar.data import _NumpyOnly

    with pytest.raises(Exception, match="refusing"):
        import io
        import pickle

        _NumpyOnly(io.BytesIO(pickle.dumps(os.system))).load()
