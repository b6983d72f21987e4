"""The README as a user follows it: its params.yaml snippets are valid params, its plugin example registers a
backbone, its commands exist, and it stays short enough to read."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import yaml

from project import ROOT

README = (ROOT / "README.md").read_text()
MAX_LINES = 150  # a user's README, not a lab notebook (docs/ holds the rest)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def test_readme_is_short():
    assert len(README.splitlines()) <= MAX_LINES


def test_the_two_commands_come_first():
    assert README.index("make run") < README.index("make test") < README.index("## XMA2 on your own data")


def test_yaml_snippets_are_valid_params(tmp_path):
    """Each snippet, over the shipped params.yaml, parses (the plugin's module and model written as the README
    shows them): run in a fresh interpreter, so the plugin's registration stays there."""
    snippets = blocks("yaml")
    assert len(snippets) >= 3
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        class MyNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3)
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(8, 10)

            def forward(self, x):
                return self.fc(self.pool(self.conv(x).relu()).flatten(1))
    """))
    (tmp_path / "my_backbones.py").write_text(blocks("python")[0])
    script = textwrap.dedent("""
        import sys, yaml
        from xbar.params import parse_params

        base = yaml.safe_load(open(sys.argv[1]).read())
        snippet = yaml.safe_load(sys.argv[2])
        tasks = snippet.pop("tasks", None)
        data = {**base, **snippet}
        if tasks:
            data["tasks"] = {**base["tasks"], **tasks}
        if "source" in snippet:  # another backbone's input: the default tasks' grey 28 px images do not fit it
            data["tasks"] = {}
        params = parse_params(data)
        print(params.model.name, sorted(params.tasks))
    """)
    for snippet in snippets:
        out = subprocess.run([sys.executable, "-c", script, str(ROOT / "params.yaml"), snippet], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120,
                             env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, f"{snippet}\n{out.stderr[-2000:]}"
    assert "leaves" in README and yaml.safe_load(snippets[0])["tasks"]["leaves"]["method"] == "xma2"


def test_the_commands_it_names_exist():
    from xbar.cli import app

    named = set(re.findall(r"^xbar ([a-z][a-z-]+)", "\n".join(blocks("bash")), re.MULTILINE))
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert named and named <= commands
