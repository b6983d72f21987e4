"""dvc.yaml declares, for every stage, each project source file the stage's code imports (transitively):
a change to any of them re-runs the stage, and to nothing else (`dvc repro` stays precise)."""

import ast
from pathlib import Path

import pytest
import yaml

from project import ROOT

PACKAGES = ("xbar", "workflow", "stages")  # the code stages run; flows/ and benchmarks/ drive stages, they are not part of them
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """xbar.methods -> xbar/methods.py (None outside the project's packages, or for a package itself)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if path.exists() else None


def imported_files(path: Path) -> set[Path]:
    """Project files `path` imports anywhere in its body (function-level imports included), transitively."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in ast.walk(ast.parse(current.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from xbar import plots`
            todo += [f for f in map(module_file, names) if f is not None]
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_every_source_file_it_imports(name: str):
    stage = STAGES[name].get("do", STAGES[name])  # a foreach stage's template
    module = stage["cmd"].split("python -m ")[1].split()[0]
    needed = {f.relative_to(ROOT).as_posix() for f in imported_files(module_file(module))}
    missing = sorted(needed - set(stage["deps"]))
    assert not missing, f"dvc.yaml stage {name}: add to deps: {', '.join(missing)}"


def test_the_import_scan_sees_function_level_and_transitive_imports():
    """The scan must not miss an import that only happens inside a function (xbar/energy/layer_io.py has
    one), nor one made by a module the stage imports (pretrain gets xbar/params.py through workflow/io.py)."""
    assert ROOT / "xbar/models.py" in imported_files(ROOT / "xbar/energy/layer_io.py")
    assert ROOT / "xbar/params.py" in imported_files(ROOT / "stages/pretrain.py")
