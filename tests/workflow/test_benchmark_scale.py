"""benchmarks.scale (#17): the plain fine-tuning step against the xma2 step, each side in its own process,
on a tiny setting: exactly the documented JSON line, its ratios the quotients of its own figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from project import ROOT

KEYS = ["model", "image_size", "batch", "plain_step_s", "xma2_step_s", "step_ratio", "plain_peak_mb", "xma2_peak_mb",
        "memory_ratio"]


def test_scale_benchmark_prints_one_json_line_whose_ratios_are_its_figures_quotients():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--model", "small_resnet", "--image-size", "32",
                          "--batch", "2", "--classes", "10", "--steps", "1", "--warmup", "1", "--device", "cpu",
                          "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = out.stdout.strip().splitlines()
    result = json.loads(line)
    assert list(result) == KEYS
    assert (result["model"], result["image_size"], result["batch"]) == ("small_resnet", 32, 2)
    assert all(result[k] > 0 for k in ("plain_step_s", "xma2_step_s", "plain_peak_mb", "xma2_peak_mb"))
    assert result["step_ratio"] == result["xma2_step_s"] / result["plain_step_s"]
    assert result["memory_ratio"] == result["xma2_peak_mb"] / result["plain_peak_mb"]


def test_scale_benchmark_refuses_cuda_without_it_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--device", "cuda", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["benchmarks.scale: train.device: cuda asked for, but no CUDA device is "
                                               "available (torch.cuda.is_available() is False); use auto or cpu"]
