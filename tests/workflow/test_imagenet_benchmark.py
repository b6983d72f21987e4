"""The RGB benchmark (benchmarks/imagenet) end to end on a few images: its params file validates, its stages
build the ImageNet backbone in the benchmark's own workspace (nothing of the project's is touched), and the
comparison learns a task with XMA2 and writes its report. The full run is not in CI."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
import yaml

from project import ROOT
from xbar.errors import UserError
from xbar.params import load_params

PARAMS = ROOT / "benchmarks" / "imagenet" / "params.yaml"


def test_the_benchmark_file_is_the_imagenet_backbone_on_four_new_rgb_tasks():
    params = load_params(PARAMS)
    assert params.model.name == "efficientnet_lite0" and params.model.weights == "imagenet"
    assert params.source.epochs == 0 and params.source.dataset.channels == 3
    assert len(params.tasks) >= 4 and params.source.dataset.source not in {s.dataset.source for s in params.tasks.values()}
    assert {s.dataset.source for s in params.tasks.values()} >= {"colour_textures", "mnist5k"}  # RGB, and far


def test_the_claim_compares_the_gain_with_the_distance():
    from benchmarks.imagenet.__main__ import claim

    accuracy = pl.DataFrame({"label": ["xma", "xma2@10"], "near": [90.0, 91.0], "far": [60.0, 70.0]})
    distance = pl.DataFrame({"task": ["near", "far"], "frechet_distance": [10.0, 50.0], "linear_probe": [95.0, 40.0]})
    text = claim(accuracy, distance, "xma2@10")
    assert "largest gain of xma2@10 over xma: far" in text and "holds by distance, holds by the probe" in text
    text = claim(accuracy, distance.with_columns(frechet_distance=pl.Series([50.0, 10.0])), "xma2@10")
    assert "does not hold by distance, holds by the probe" in text
    assert "needs xma and xma2" in claim(accuracy.head(1), distance, "xma2@10")


@pytest.mark.slow
def test_the_benchmark_runs_on_a_few_images(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch):
    from benchmarks.imagenet.__main__ import build_backbone, main

    raw = yaml.safe_load(PARAMS.read_text())
    raw["quant"] |= {"max_train": 16, "epochs": 1}
    raw["source"]["dataset"] |= {"image_size": 16, "test_fraction": 0.05}
    # one task, the far one (every task step costs the recipe's 50 optimizer steps over 4.6 M masked weights)
    raw["tasks"] = {"digits": raw["tasks"]["digits"] | {"after": "backbone", "epochs": 1, "rank_batch_size": 16}}
    raw["tasks"]["digits"]["dataset"] |= {"image_size": 16, "max_train": 40, "test_fraction": 0.01}
    small = tmp_path / "params.yaml"
    small.write_text(yaml.safe_dump(raw, sort_keys=False))
    work = tmp_path / "work"
    # 16 px and 4 images a class: the recipe's guards may refuse the run (a one-line UserError, reported as
    # failed); any other error fails the test
    try:
        table = main(["--params", str(small), "--workdir", str(work), "--methods", "xma2"])
    except UserError as err:
        assert str(err).startswith("every configuration failed"), err
        table = None
    report = (work / "comparison" / "table.md").read_text()
    out = capsys.readouterr().out
    for label in ("xma2@10",):
        ran = table is not None and label in set(table["label"])
        refused = re.search(rf"- {re.escape(label)}: {re.escape(label)} \(seed \d+\): {re.escape(label)} \w+: "
                            "training (diverged|ended at loss)", report)
        assert ran != bool(refused), (label, report[-2000:])
    if table is not None:
        assert set(table["task"]) == set(raw["tasks"]) and "The paper's claim" in report
        assert (table.filter(pl.col("method") == "xma2")["forgetting"].abs() < 1e-9).all()  # masks do not forget
        assert pl.read_csv(work / "comparison" / "accuracy.csv")["mean"].is_between(0, 100).all()
    assert (work / "artifacts" / "backbone" / "levels.pt").exists() and not (tmp_path / "artifacts").exists()
    assert "pretrain: fp32 test accuracy" in out and "quantize: fp32" in out
    monkeypatch.chdir(work)  # the backbone is built once per params file
    build_backbone(load_params(small), small.read_text(), fresh=False)
    assert "was built from this params file" in capsys.readouterr().out
