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
    """xbar.step -> xbar/step.py; a sub-package or a module in one -> its directory (xbar.methods.xma2 ->
    xbar/methods: a package may load its modules by name, e.g. the method registry); None outside the
    project's packages or for a top-level package itself."""
    parts = name.split(".")
    if parts[0] not in PACKAGES or len(parts) < 2:
        return None
    package = ROOT.joinpath(*parts[:2])
    if package.is_dir():
        return package
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if path.exists() else None


def sources(path: Path) -> list[Path]:
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def imported_files(path: Path) -> set[Path]:
    """Project files (and sub-package directories) `path` imports anywhere in its body, function-level
    imports included, transitively. Not followed: xbar/params.py's look-up of the method names in the
    registry when it validates a task (no stage's output depends on a method it does not run)."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for source in sources(current):
            tree = ast.parse(source.read_text())
            skip = set()
            if source == ROOT / "xbar/params.py":
                skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
            for node in ast.walk(tree):
                if id(node) in skip:
                    continue
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from xbar import plots`
                todo += [f for f in map(module_file, names) if f is not None and f != current]
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


def test_a_sub_package_is_one_dependency_and_params_method_look_up_is_not_followed():
    """Editing any method file re-runs the stages that learn tasks, not the backbone's."""
    assert ROOT / "xbar/methods" in imported_files(ROOT / "stages/train_masks.py")
    assert ROOT / "xbar/methods" not in imported_files(ROOT / "stages/pretrain.py")
