"""benchmarks/stage_probe measures a stage process from outside (benchmarks/figures.py relies on it):
one line per stage process with its wall time, its time in MLflow calls and its peak memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from project import ROOT

STAGE = """
import time

from workflow.io import stage_main
from workflow.tracking import retry


def run(params):
    retry(lambda: time.sleep(0.5), "a slow MLflow call")


if __name__ == "__main__":
    stage_main(run)
"""


def test_the_probe_logs_each_stage_process_and_its_mlflow_time(tmp_path: Path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "slow_mlflow.py").write_text(STAGE)
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    log = tmp_path / "stages.jsonl"
    path = os.pathsep.join(filter(None, [str(ROOT / "benchmarks/stage_probe"), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "XBAR_BENCH_LOG": str(log)}
    for args in (["-m", "stages.slow_mlflow"], ["-c", "import workflow.tracking"]):  # a stage, then another process
        out = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]  # the stage's line only
    assert line["stage"] == "slow_mlflow" and line["task"] is None
    assert 0.5 <= line["mlflow_seconds"] <= line["seconds"]  # the wrapped call, inside the process's wall time
    assert line["peak_rss_mb"] > 0

