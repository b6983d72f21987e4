"""Reliability (issue #8), 5: security, a scan of xbar/, workflow/, stages/, flows/, benchmarks/
for unsafe loading, shells and 0.0.0.0."""

from __future__ import annotations

import ast
import os
import re

import pytest

from project import ROOT


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
    from xbar.sources import _NumpyOnly

    with pytest.raises(Exception, match="refusing"):
        import io
        import pickle

        _NumpyOnly(io.BytesIO(pickle.dumps(os.system))).load()


def test_a_class_folder_or_image_linked_outside_the_readable_directories_is_refused(tmp_path, monkeypatch):
    """`xbar add-task` / the server: an image folder under the project whose class folder (or image) is a
    symbolic link to a directory outside the project and XBAR_DATA_DIRS is refused, params.yaml untouched."""
    import shutil

    from flows.add_task import NewTask, plan_new_task
    from project import image_folder
    from xbar.errors import UserError

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")
    root = image_folder(project / "data" / "faces", ["a", "b"])
    outside = image_folder(tmp_path / "outside", ["c"])
    (root / "c").symlink_to(outside / "c", target_is_directory=True)
    before = (project / "params.yaml").read_bytes()
    monkeypatch.delenv("XBAR_DATA_DIRS", raising=False)
    with pytest.raises(UserError, match=r"class folder .*faces/c links to .*outside the directories"):
        plan_new_task(project / "params.yaml", NewTask.parse(name="fresh", dataset={"root": "data/faces"}))
    assert (project / "params.yaml").read_bytes() == before
    monkeypatch.setenv("XBAR_DATA_DIRS", str(tmp_path / "outside"))
    plan = plan_new_task(project / "params.yaml", NewTask.parse(name="fresh", dataset={"root": "data/faces"}))
    assert plan.params.tasks["fresh"].dataset.root == "data/faces"
