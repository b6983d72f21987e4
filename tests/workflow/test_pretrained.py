"""A pretrained backbone (issue #17): `model.weights` with `source.epochs: 0` is used as it is, with its
lineage (file and digest), the ImageNet input statistics, and QAT on a capped stratified subset."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from project import make_tiny_project, stage
from xbar.models import imagenet_stats


@pytest.mark.slow
def test_weights_are_used_as_they_are_and_qat_takes_a_capped_subset(tmp_path):
    import torchvision

    project = make_tiny_project(tmp_path / "p", git=False)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(weights, project.root / "w.pt")
    data = yaml.safe_load(project.params.read_text())
    data["model"] = {"name": "resnet18", "weights": "w.pt"}
    data["source"] = {"dataset": {"source": "optdigits", "channels": 3}, "epochs": 0}
    data["quant"] = {**data["quant"], "max_train": 64}
    project.params.write_text(yaml.safe_dump(data, sort_keys=False))

    out = project.run(*stage("pretrain"))
    assert "model.weights as they are" in out.stdout
    fp32 = torch.load(project.root / "artifacts/backbone/fp32.pt", weights_only=True)["state_dict"]
    body = {k.removeprefix("body."): v for k, v in fp32.items() if k.startswith("body.")}
    assert all(torch.equal(body[k], v) for k, v in weights.items() if not k.startswith("fc."))  # no fp32 training
    assert torch.equal(fp32["input_norm.mean"], torch.tensor(imagenet_stats("resnet18")[0]))
    metrics = json.loads((project.root / "metrics/pretrain.json").read_text())
    assert metrics["epochs"] == 0 and metrics["weights_file"] == "w.pt"
    assert metrics["weights_sha256"] == hashlib.sha256((project.root / "w.pt").read_bytes()).hexdigest()
    assert metrics["test_accuracy"] > 100 / 10  # the closed-form head beats chance even on a random body

    project.run(*stage("quantize"))
    quant = json.loads((project.root / "metrics/quantize.json").read_text())
    assert 64 - 10 <= quant["qat_images"] <= 64 + 10  # stratified: each of 10 classes rounds on its own
    assert quant["qat_images"] < metrics["train_images"]
