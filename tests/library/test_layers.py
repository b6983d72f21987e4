"""The library is free of orchestration: nothing under xbar/ but the command line (xbar/cli.py)
imports prefect, dvc, mlflow, or the layers above the library (stages, flows, workflow).

Function-level imports count too (an import hidden in a function still ties the library to the
tool), and so do imports by name (`importlib.import_module("mlflow")`)."""

import ast

from project import ROOT

ORCHESTRATION = ("prefect", "dvc", "mlflow", "stages", "flows", "workflow")
ABOVE_THE_LIBRARY = ("xbar/cli.py",)  # the command line drives flows and the tracking service


def orchestration_imports(source: str, name: str = "<source>") -> list[str]:
    """Every import of an orchestration package in one Python file, as `name:line: module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # `from . import x` stays in the package
            modules = [node.module or ""]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                                                       "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                modules = [node.args[0].value]
        found += [f"{name}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in ORCHESTRATION]
    return found


def test_the_library_imports_no_orchestration():
    files = sorted((ROOT / "xbar").rglob("*.py"))
    assert ROOT / "xbar/params.py" in files  # the scan sees the library (and its sub-packages, rglob)
    found = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel not in ABOVE_THE_LIBRARY:
            found += orchestration_imports(path.read_text(), rel)
    assert found == [], "the library imports orchestration (move the code to workflow/, stages/ or flows/):\n" \
        + "\n".join(found)


def test_the_scan_would_catch_a_regression():
    """Each of these is flagged, at the top level or hidden in a function; library imports are not."""
    bad = {
        "import mlflow": "mlflow",
        "import prefect.states as s": "prefect.states",
        "from dvc.repo import Repo": "dvc.repo",
        "def log():\n    from workflow.tracking import tracker\n    return tracker": "workflow.tracking",
        "class A:\n    def f(self):\n        import stages.evaluate": "stages.evaluate",
        "def run():\n    from flows import new_task": "flows",
        "import importlib\nimportlib.import_module('mlflow.client')": "mlflow.client",
        "__import__('prefect')": "prefect",
    }
    for source, module in bad.items():
        found = orchestration_imports(source, "x.py")
        assert len(found) == 1 and found[0].endswith(f": {module}"), (source, found)
    fine = ("import torch\nfrom xbar.params import Params\nfrom . import masks\nimport dvclive_not_dvc\n"
            "def f():\n    from xbar.errors import UserError\n    import workflows_other")
    assert orchestration_imports(fine) == []
