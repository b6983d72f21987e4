"""Flows without a Prefect server: input refusals, the params.yaml append, the workspace lock, DVC commands."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.add_task import NewTask, append_task_text, params_added, plan_new_task
from flows.dvc import (PIPELINE_ENV, StageFailed, error_line, pipeline_order, repro_command, retry_transient, run_dvc,
                       stage_env)
from flows.lock import LockTimeout, lock_path, workspace_lock
from flows.new_task import gate_target
from project import ROOT, image_folder
from xbar.errors import UserError
from xbar.params import TaskSpec, load_params

PER_TASK = ["rank_pes", "train_masks", "program_spares", "simulate_energy", "evaluate"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the files the flows read and write (no git, no DVC needed here), with three image
    folders under data/: `grey` (2 classes), `one` (1 class) and `colour` (2 classes of RGB images)."""
    tmp_path = tmp_path / "project"
    tmp_path.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    image_folder(tmp_path / "data" / "grey", ["cat", "dog"])
    image_folder(tmp_path / "data" / "one", ["cat"])
    image_folder(tmp_path / "data" / "colour", ["cat", "dog"], mode="RGB")
    return tmp_path


# --- refusals: one line, exit 2, params.yaml byte-identical -------------------------------------------------

BAD = [
    (["Bad-Name", "--dataset", "mnist5k"], "not a simple identifier"),
    (["backbone", "--dataset", "mnist5k"], "reserved"),
    (["mnist", "--dataset", "mnist5k"], "already exists"),
    (["fresh", "--dataset", "cifar1000"], "dataset"),
    (["fresh", "--dataset", "mnist5k", "--method", "magic"], "method"),
    (["fresh", "--dataset", "mnist5k", "--spare-ratio", "0"], "spare_ratio"),
    (["fresh", "--dataset", "mnist5k", "--spare-ratio", "1.5"], "spare_ratio"),
    (["fresh", "--dataset", "mnist5k", "--shift-levels", "4"], "shift_levels"),
    (["fresh", "--dataset", "mnist5k", "--epochs", "0"], "epochs"),
    # the dataset's files: each mistake named before anything runs
    (["fresh", "--dataset", "data/missing"], "data/missing is not a directory"),
    (["fresh", "--dataset", "../outside"], "outside the directories the server may read"),
    (["fresh", "--dataset", "data/one"], "has 1 class folder(s) with images"),
    (["fresh", "--dataset", "data/colour"], "has 3 channel(s) (RGB), but the dataset declares 1"),
    (["fresh", "--torchvision", "NoSuchSet", "--root", "data/grey"], "'NoSuchSet' is not a torchvision.datasets class"),
    (["fresh", "--torchvision", "MNIST"], "--torchvision needs --root"),
    (["fresh", "--dataset", "mnist5k", "--max-train", "10"], "not to the built-in dataset"),
]


@pytest.mark.parametrize("args, words", BAD)
def test_cli_refuses_bad_input_at_once_and_leaves_params_unchanged(project: Path, args: list[str], words: str):
    before = (project / "params.yaml").read_bytes()
    prefect_home = project / "prefect-home"
    out = subprocess.run([sys.executable, "-m", "xbar.cli", "add-task", *args], cwd=project, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(prefect_home)})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], out.stderr
    assert (project / "params.yaml").read_bytes() == before
    assert not (project / "dvc.lock").exists()
    assert not prefect_home.exists()  # refused before any flow (and its temporary Prefect server) started


def test_flow_level_refusals_are_user_errors(project: Path):
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        plan_new_task(project / "params.yaml", NewTask.parse(name="textures", dataset="textures"))
    with pytest.raises(UserError, match="reserved"):  # the form's regex alone would let it through
        plan_new_task(project / "params.yaml", NewTask(name="backbone", dataset="optdigits"))
    (project / "params.yaml").write_text(before.decode().replace("seed: 0", "seed: minus one"))
    with pytest.raises(UserError, match="seed"):  # a broken file is reported, never appended to
        plan_new_task(project / "params.yaml", NewTask.parse(name="fresh", dataset="optdigits"))


@pytest.mark.parametrize("field, values", [
    ("spare_ratio", [0.0, 1e-9, 1.0, 1.0001, -1.0]),
    ("shift_levels", [-1, 0, 3, 4]),
    ("epochs", [0, 1, -3]),
    ("method", ["xma2", "xbm", "magic"]),
])
def test_form_bounds_match_taskspec(field: str, values: list):
    """The form (NewTask) accepts exactly what params.yaml's TaskSpec accepts."""
    for value in values:
        try:
            TaskSpec(dataset="optdigits", **{field: value})
            spec_ok = True
        except ValueError:
            spec_ok = False
        try:
            NewTask.parse(name="t", dataset="optdigits", **{field: value})
            form_ok = True
        except UserError:
            form_ok = False
        assert form_ok == spec_ok, (field, value)


def test_dataset_outside_the_project_is_read_only_from_listed_directories(project: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """The policy: a root under the project, or under a directory in XBAR_DATA_DIRS; a symlink in the
    project pointing elsewhere is judged by where it points."""
    shared = image_folder(tmp_path / "shared" / "faces", ["a", "b"])
    (project / "data" / "link").symlink_to(shared, target_is_directory=True)
    params = project / "params.yaml"
    for root in (str(shared), "data/link"):
        with pytest.raises(UserError, match="outside the directories the server may read"):
            plan_new_task(params, NewTask.parse(name="fresh", dataset={"root": root}))
    monkeypatch.setenv("XBAR_DATA_DIRS", os.pathsep.join(["/nonexistent", str(tmp_path / "shared")]))
    for root in (str(shared), "data/link"):
        plan = plan_new_task(params, NewTask.parse(name="fresh", dataset={"root": root}))
        assert plan.params.tasks["fresh"].dataset.root == root  # recorded as given


def test_dataset_forms_are_recorded_in_full(project: Path):
    """Each kind of dataset lands in params.yaml as the spec the stages read, the backbone's image size
    and channels filled in where the form left them empty."""
    params = project / "params.yaml"
    backbone = load_params(params).source.dataset
    folder = plan_new_task(params, NewTask.parse(name="fresh", dataset={"root": "data/grey", "max_train": 5}))
    spec = folder.params.tasks["fresh"].dataset
    assert (spec.source, spec.root, spec.max_train, spec.image_size, spec.channels) == (
        "imagefolder", "data/grey", 5, backbone.image_size, backbone.channels)
    assert folder.kept_comments and "      root: data/grey\n" in folder.new_text  # block style, nested
    vision = plan_new_task(params, NewTask.parse(name="fresh", dataset={"name": "MNIST", "root": "data"}))
    spec = vision.params.tasks["fresh"].dataset
    assert (spec.source, spec.name, spec.root) == ("torchvision", "MNIST", "data")
    assert plan_new_task(params, NewTask.parse(name="fresh", dataset="optdigits")).params.tasks[
        "fresh"].dataset.source == "optdigits"
    with pytest.raises(UserError, match="^dataset.image_size: Input should be greater than 0"):
        NewTask.parse(name="fresh", dataset={"root": "data/grey", "image_size": 0})
    with pytest.raises(UserError, match="^dataset: Input should be 'mnist5k'"):
        NewTask.parse(name="fresh", dataset="cifar1000")
    with pytest.raises(UserError, match="^dataset.name: String should match"):
        NewTask.parse(name="fresh", dataset={"name": "cifar10", "root": "data"})


def test_image_folder_from_the_form_is_learned_by_the_library(project: Path, monkeypatch: pytest.MonkeyPatch):
    """What the form records is what xbar.data loads: the classes of the folder, at the backbone's size."""
    from xbar.data import load_task_data

    monkeypatch.chdir(project)
    plan = plan_new_task(project / "params.yaml", NewTask.parse(name="fresh", dataset={"root": "data/grey"}))
    data = load_task_data(plan.params.tasks["fresh"].dataset, seed=0)
    x, _ = data.train[0]
    assert data.num_classes == 2 and tuple(x.shape) == (1, 28, 28)


# --- the append -------------------------------------------------------------------------------------------------

def test_append_keeps_file_valid_ordered_and_commented(project: Path):
    path = project / "params.yaml"
    old = path.read_text()
    names = list(load_params(path).tasks)
    plan = plan_new_task(path, NewTask.parse(name="fresh", dataset="optdigits", epochs=2, spare_ratio=0.25,
                                             shift_levels=0, method="xbm"))
    assert plan.kept_comments and plan.after == names[-1]
    assert plan.new_text.startswith(old.rstrip("\n"))  # appended: every old byte and comment kept in place
    assert path.read_text() == old  # planning writes nothing

    with params_added(project, plan.task):
        params = load_params(path)
        assert list(params.tasks) == names + ["fresh"]
        fresh = params.tasks["fresh"]
        assert (fresh.after, fresh.dataset.source, fresh.method, fresh.epochs, fresh.spare_ratio,
                fresh.shift_levels) == (names[-1], "optdigits", "xbm", 2, 0.25, 0)
        assert params.tasks[names[0]] == load_params(ROOT / "params.yaml").tasks[names[0]]
    assert list(load_params(path).tasks) == names + ["fresh"]  # success keeps it

    second = plan_new_task(path, NewTask.parse(name="second", dataset="mnist5k"))
    assert second.after == "fresh"


@pytest.mark.parametrize("text", [
    "seed: 0\nsource:\n  dataset: optdigits\n",  # no tasks key
    "seed: 0\ntasks: {}   # none yet\nsource:\n  dataset: optdigits\n",  # empty flow mapping, then more keys
    "tasks:\n    a:\n        after: backbone\n        dataset: optdigits\n"
    "# about source\nsource:\n  dataset: optdigits",  # 4-space indents, a column-0 comment, no final newline
])
def test_append_handles_other_layouts(tmp_path: Path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    before = list(load_params(path).tasks)
    plan = plan_new_task(path, NewTask.parse(name="zz", dataset="optdigits"))
    assert plan.kept_comments
    path.write_text(plan.new_text)
    params = load_params(path)
    assert list(params.tasks) == before + ["zz"] and params.tasks["zz"].after == (before[-1] if before else "backbone")
    assert params.source.dataset.source == "optdigits"
    for line in text.splitlines():
        if "#" in line:
            assert line.split("#", 1)[1] in plan.new_text


@pytest.mark.parametrize("name", ["yes", "null", "on", "t1"])
def test_append_text_quotes_what_needs_quoting(name: str):
    """YAML 1.1 reads `yes:` as True and `null` as None: names and values must read back as written."""
    out = append_task_text("tasks:\n", name, {"after": "backbone", "note": "a: b # c", "flag": "no"})
    assert yaml.safe_load(out)["tasks"] == {name: {"after": "backbone", "note": "a: b # c", "flag": "no"}}


def test_failed_run_restores_params_and_dvc_lock_exactly(project: Path):
    path, lock = project / "params.yaml", project / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages: {}\n")
    os.chmod(path, 0o664)
    before, lock_before = path.read_bytes(), lock.read_bytes()
    with pytest.raises(StageFailed):
        with params_added(project, NewTask.parse(name="fresh", dataset="optdigits")):
            assert "fresh" in load_params(path).tasks
            lock.write_text("schema: '2.0'\nstages:\n  rank_pes@fresh: {}\n")  # what DVC would have recorded
            raise StageFailed("stage evaluate@fresh failed (exit 1): no-forgetting gate failed", 255)
    assert path.read_bytes() == before and lock.read_bytes() == lock_before
    assert stat.S_IMODE(path.stat().st_mode) == 0o664  # the atomic rename kept the file's mode


def test_failed_first_run_removes_the_dvc_lock_it_created(project: Path):
    with pytest.raises(RuntimeError):
        with params_added(project, NewTask.parse(name="fresh", dataset="optdigits")):
            (project / "dvc.lock").write_text("stages: {}\n")
            raise RuntimeError("cancelled")
    assert not (project / "dvc.lock").exists()


# --- the lock ---------------------------------------------------------------------------------------------------

def test_lock_serializes_two_threads(tmp_path: Path):
    spans: dict[str, tuple[float, float]] = {}
    notes: list[str] = []

    def hold(who: str, seconds: float) -> None:
        with workspace_lock(tmp_path, timeout_s=30, holder=f"holder {who}", on_wait=notes.append):
            start = time.monotonic()
            time.sleep(seconds)
            spans[who] = (start, time.monotonic())

    first = threading.Thread(target=hold, args=("first", 0.6))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=hold, args=("second", 0.0))
    second.start()
    first.join(10)
    second.join(10)
    assert set(spans) == {"first", "second"}
    assert spans["second"][0] >= spans["first"][1]  # entered only after the first left
    assert len(notes) == 1 and notes[0].startswith("waiting for the workspace lock") and "holder first, pid" in notes[0]


HOLDER = """
import sys, time
from pathlib import Path
from flows.lock import workspace_lock
with workspace_lock(Path(sys.argv[1]), timeout_s=60, holder="holder process"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_lock_serializes_two_processes_and_times_out_with_the_holder_named(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "2.0"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="holder process, pid"):
            with workspace_lock(tmp_path, timeout_s=0.3):
                pass
        start = time.monotonic()
        with workspace_lock(tmp_path, timeout_s=30):
            assert proc.poll() is not None  # we got it only once the holder exited
        assert time.monotonic() - start < 10
    finally:
        proc.kill()
        proc.wait(10)
    assert lock_path(tmp_path).read_text() == ""  # released: nobody named as holder


def test_lock_is_released_when_the_holder_dies(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        proc.kill()
        proc.wait(10)
        with workspace_lock(tmp_path, timeout_s=5):
            pass
    finally:
        proc.kill()


# --- DVC commands -------------------------------------------------------------------------------------------------

def test_repro_commands_are_argument_lists_with_this_interpreter():
    assert repro_command("evaluate@fresh") == [sys.executable, "-m", "dvc", "repro", "evaluate@fresh"]
    assert repro_command("pretrain", single_item=True) == [sys.executable, "-m", "dvc", "repro", "--single-item",
                                                           "pretrain"]
    assert gate_target("fresh") == "evaluate@fresh"


def test_pipeline_order_backbone_then_tasks_in_params_order():
    order = pipeline_order(ROOT / "dvc.yaml", ["b", "a"])
    assert order[:3] == ["pretrain", "quantize", "deploy_backbone"]
    assert order[3:] == [f"{s}@b" for s in PER_TASK] + [f"{s}@a" for s in PER_TASK]
    assert pipeline_order(ROOT / "dvc.yaml", []) == order[:3]


def test_pipeline_order_runs_trailing_plain_stages_last(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "pre": {"cmd": "x"}, "per": {"foreach": "${tasks}", "do": {"cmd": "y ${key}"}}, "report": {"cmd": "z"}}},
        sort_keys=False))
    assert pipeline_order(tmp_path / "dvc.yaml", ["t1", "t2"]) == ["pre", "per@t1", "per@t2", "report"]


def test_stage_env_uses_this_venv_and_the_pipeline_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(PIPELINE_ENV, "stale")
    env = stage_env("{\"name\": \"x\"}")
    assert env[PIPELINE_ENV] == "{\"name\": \"x\"}"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    assert PIPELINE_ENV not in stage_env(None)


def test_error_line_names_the_stage_and_its_own_error():
    lines = ["Running stage 'evaluate@fresh':", "> python -m stages.evaluate --task fresh",
             "error: no-forgetting gate failed: task mnist: accuracy 90.00% after adding fresh, 91.00% when learned",
             "ERROR: failed to reproduce 'evaluate@fresh': failed to run: python -m stages.evaluate --task fresh, "
             "exited with 1"]
    assert error_line(lines, 255) == ("stage evaluate@fresh failed (exit 1): no-forgetting gate failed: task mnist: "
                                      "accuracy 90.00% after adding fresh, 91.00% when learned")
    crash = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "TypeError: float() argument must be a string or a real number, not 'list'",
             "ERROR: failed to reproduce 'evaluate@t': failed to run: python -m stages.evaluate --task t, "
             "exited with 1"]
    assert error_line(crash, 255) == ("stage evaluate@t failed (exit 1): TypeError: float() argument must be a "
                                      "string or a real number, not 'list'")
    assert error_line(["ERROR: Unable to acquire lock."], 255) == "dvc: Unable to acquire lock."
    assert "exited with 3" in error_line([], 3)


def _fake(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_dvc_streams_output_and_fails_with_one_line(tmp_path: Path):
    logged: list[str] = []
    code = ("import sys; print('working'); print('error: dataset root missing', file=sys.stderr); "
            "print(\"ERROR: failed to reproduce 'train_masks@x': failed to run: ..., exited with 2\"); sys.exit(255)")
    with pytest.raises(StageFailed) as info:
        run_dvc(_fake(code), tmp_path, dict(os.environ), logged.append)
    assert str(info.value) == "stage train_masks@x failed (exit 2): dataset root missing"
    assert not info.value.transient and "working" in logged
    run_dvc(_fake("print('ok')"), tmp_path, dict(os.environ), logged.append)  # success: no exception


def test_only_transient_failures_are_retried(tmp_path: Path):
    from prefect.states import Failed

    busy = "print('ERROR: Unable to acquire lock. Most likely another DVC process is running'); raise SystemExit(255)"
    with pytest.raises(StageFailed) as info:
        run_dvc(_fake(busy), tmp_path, dict(os.environ), lambda _: None)
    assert info.value.transient
    assert retry_transient(None, None, Failed(data=info.value))
    for code in ("raise SystemExit(2)", "print('error: gate'); raise SystemExit(1)"):
        with pytest.raises(StageFailed) as info:
            run_dvc(_fake(code), tmp_path, dict(os.environ), lambda _: None)
        assert not retry_transient(None, None, Failed(data=info.value))
    assert not retry_transient(None, None, Failed(data=ValueError("bug")))


def test_run_dvc_timeout_stops_the_whole_process_group(tmp_path: Path):
    marker = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(StageFailed, match="timed out"):
        run_dvc(_fake(code), tmp_path, dict(os.environ), lambda _: None, timeout_s=1.5)
    assert time.monotonic() - start < 20
    child = int(marker.read_text())
    for _ in range(50):  # the grandchild (the "stage") got the signal too
        if not _alive(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage process outlived the timeout")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


# --- the flows' MLflow parent run -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real MLflow SQLite store; returns a function listing the pipeline runs as (key, status)."""
    from workflow.tracking import tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def pipeline_runs() -> list[tuple[str, str]]:
        with tracker() as t:
            return [(r.data.tags["xbar.pipeline_key"], r.info.status) for r in t.find("tags.`xbar.kind` = 'pipeline'")]

    return pipeline_runs


def _gate_stage(root: Path, spec: dict, task: str) -> str:
    """What evaluate does with XBAR_PIPELINE_RUN: create (or find) the parent, close it, record it."""
    from workflow.tracking import pipeline_parent, tracker

    with tracker() as t:
        parent = pipeline_parent(t, spec)
        assert pipeline_parent(t, spec) == parent  # a later stage finds the same run by its key
        if spec["closed_by"] == task:
            t.finish(parent)
    record = root / "metrics" / "tasks" / task / "evaluate.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"mlflow_parent_run_id": parent, "pipeline_key": spec["tags"]["xbar.pipeline_key"]}))
    return parent


def test_a_new_task_flow_that_succeeds_never_opens_mlflow_itself(project: Path, store, monkeypatch):
    from flows import continual

    def no_mlflow():  # noqa: ANN202
        raise AssertionError("the flow opened MLflow")

    with continual.pipeline_run(project, "add-fresh", {"xbar.flow": "new-task"}, closed_by="fresh") as run:
        spec = json.loads(run.env)
        monkeypatch.setattr(continual, "tracker", no_mlflow)
        parent = _gate_stage(project, spec, "fresh")
    assert run.run_id == parent
    assert store() == [(spec["tags"]["xbar.pipeline_key"], "FINISHED")]


def test_a_failed_flow_closes_its_parent_run_failed_even_before_any_stage_made_it(project: Path, store):
    from flows.continual import pipeline_run

    with pytest.raises(StageFailed), pipeline_run(project, "add-fresh", {}, closed_by="fresh") as run:
        raise StageFailed("stage train_masks@fresh failed (exit 2): lr", 255)
    assert store() == [(json.loads(run.env)["tags"]["xbar.pipeline_key"], "FAILED")] and run.run_id


def test_a_continual_flow_closes_the_run_its_stages_made(project: Path, store):
    from flows.continual import pipeline_run

    with pipeline_run(project, "continual", {}) as run:
        spec = json.loads(run.env)
        parent = _gate_stage(project, spec, "first")
        _gate_stage(project, spec, "second")
    assert run.run_id == parent and store() == [(spec["tags"]["xbar.pipeline_key"], "FINISHED")]
    with pipeline_run(project, "continual", {}) as empty:  # nothing to learn: the flow makes the run itself
        pass
    assert len(store()) == 2 and empty.run_id not in (None, parent)


# --- the served deployments' forms and the compare flow's tables -------------------------------------------------


@pytest.mark.parametrize("flow_name", ["new_task", "compare"])
def test_deployment_forms_are_typed(flow_name: str):
    """Every parameter of a served flow reaches the UI with its type (an annotation Prefect cannot resolve,
    e.g. a return type that is not a class, silently drops them all and the form becomes untyped JSON)."""
    from prefect.utilities.callables import parameter_schema

    from flows.compare import compare
    from flows.new_task import new_task

    schema = parameter_schema({"new_task": new_task, "compare": compare}[flow_name]).model_dump()
    untyped = [k for k, v in schema["properties"].items() if not {"type", "anyOf", "allOf", "$ref"} & set(v)]
    assert not untyped, untyped


def test_compare_form_refuses_bad_values():
    from pydantic import TypeAdapter, ValidationError

    from flows.compare import DaskAddress, Methods, Seeds

    for kind, value in ((Methods, []), (Methods, ["magic"]), (Seeds, [-1]), (DaskAddress, "10.0.0.5:8786")):
        with pytest.raises(ValidationError):
            TypeAdapter(kind).validate_python(value)
    assert TypeAdapter(DaskAddress).validate_python("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"


def test_several_seeds_average_every_number_and_report_the_spread():
    import polars as pl

    from flows.compare import seed_mean, seeds_markdown
    from library.test_compare import fake_result
    from xbar.compare import accuracy_table, comparison_table

    one, _ = comparison_table([fake_result("xma2@10", [80.0, 70.0], [[80.0], [80.0, 70.0]], 0.1)])
    two, _ = comparison_table([fake_result("xma2@10", [90.0, 60.0], [[90.0], [90.0, 60.0]], 0.1)])
    mean = seed_mean([one, two])
    assert mean.columns == one.columns and mean.height == one.height
    assert mean["accuracy_final"].to_list() == [85.0, 65.0]
    assert accuracy_table(mean)["mean"].to_list() == [75.0]
    text = seeds_markdown([one, two], [3, 7])
    assert "| seed 3 | seed 7 | mean |" in text and "| xma2@10 | 75     | 75     | 75   | 0   |" in text
    assert pl.concat([one, two]).height == 4


def test_mlflow_link_points_at_the_ui(monkeypatch: pytest.MonkeyPatch):
    from flows.compare import mlflow_run_url

    monkeypatch.delenv("XBAR_MLFLOW_UI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x/mlflow.db")
    assert mlflow_run_url("1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org/")
    assert mlflow_run_url("1", "abc") == "https://mlflow.example.org/#/experiments/1/runs/abc"
    monkeypatch.setenv("XBAR_MLFLOW_UI", "http://tunnel:5001")
    assert mlflow_run_url("2", "d") == "http://tunnel:5001/#/experiments/2/runs/d"
