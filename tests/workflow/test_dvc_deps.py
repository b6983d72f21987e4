"""dvc.yaml declares, for every stage, each project source file the stage's code imports (transitively), itself
or through a directory: a change to any of them re-runs the stage. The backbone stages list their files; the
per-task stages depend on the library as one directory (`xbar`), and what no stage imports is in .dvcignore,
so that editing it (the command line, the comparison) re-runs nothing."""

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


def template(name: str) -> dict:
    return STAGES[name].get("do", STAGES[name])  # a foreach stage's template


def needed(name: str) -> set[str]:
    """The project files (and sub-package directories) stage `name` imports, relative to the project."""
    module = template(name)["cmd"].split("python -m ")[1].split()[0]
    return {f.relative_to(ROOT).as_posix() for f in imported_files(module_file(module))}


def covered(path: str, deps: list[str]) -> bool:
    """`path` is a dependency itself or lies in a directory dependency."""
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


def dvc_ignored_files() -> set[str]:
    """The project files .dvcignore names one by one (its glob patterns, e.g. *.pyc, are not files)."""
    lines = (line.strip() for line in (ROOT / ".dvcignore").read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#") and (ROOT / line).is_file()}


def library_units() -> set[str]:
    """xbar's modules and sub-packages as the import scan names them (its own __init__.py runs on any import)."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "xbar").iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_every_source_file_it_imports(name: str):
    missing = sorted(path for path in needed(name) if not covered(path, template(name)["deps"]))
    assert not missing, f"dvc.yaml stage {name}: add to deps: {', '.join(missing)}"


def test_what_no_stage_imports_is_dvc_ignored_and_nothing_a_stage_imports_is():
    """A library module no stage imports would, through the per-task stages' `xbar` directory, re-run every
    task when edited: .dvcignore must name it. And DVC does not see an ignored file change: no stage may
    import one."""
    imported = set().union(*(needed(name) for name in STAGES))
    ignored = dvc_ignored_files()
    unused = sorted(library_units() - imported - ignored)
    assert not unused, f"no stage imports {', '.join(unused)}: add to .dvcignore"
    assert not ignored & imported, f"stages import {', '.join(sorted(ignored & imported))}: remove from .dvcignore"


def test_the_import_scan_sees_function_level_and_transitive_imports():
    """The scan must not miss an import that only happens inside a function (xbar/energy/layer_io.py has
    one), nor one made by a module the stage imports (pretrain gets xbar/params.py through workflow/io.py)."""
    assert ROOT / "xbar/models.py" in imported_files(ROOT / "xbar/energy/layer_io.py")
    assert ROOT / "xbar/params.py" in imported_files(ROOT / "stages/pretrain.py")


def test_a_sub_package_is_one_dependency_and_params_method_look_up_is_not_followed():
    """Editing any method file re-runs the stages that learn tasks, not the backbone's."""
    assert ROOT / "xbar/methods" in imported_files(ROOT / "stages/train_masks.py")
    assert ROOT / "xbar/methods" not in imported_files(ROOT / "stages/pretrain.py")
