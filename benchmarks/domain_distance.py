"""How far each task of params.yaml is from the source task, seen through the deployed backbone.

    python -m benchmarks.domain_distance [--params params.yaml] [--images 2000]

Needs artifacts/backbone/quant.pt and levels.pt (dvc repro quantize). Two figures per task,
on the backbone's pooled features (what every method's head sees before any mask is learned):

* Frechet distance between the features of the source's test images and the task's test
  images (FID's formula on our backbone): how different the inputs look to the backbone;
* linear-probe test accuracy: a ridge head on the frozen backbone (what XMA2 starts from,
  `xbar.methods.init_head`). The gap to `finetune_separate` (docs/results.md) is how
  much the backbone's features fall short for the task: what masks and spare PEs must
  recover.

The issue's "task farthest from the source" is not one number; the two can disagree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.utils.data import Dataset

from workflow.io import BACKBONE, load_torch
from xbar.data import load_task_data
from xbar.methods import backbone_net, crossbar_spec, deploy_cells, ridge_head
from xbar.params import load_params
from xbar.training import as_input, seed_everything


@torch.no_grad()
def features(net: nn.Module, data: Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled float64 features and labels of up to `n` seeded images of `data`."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    images, labels = zip(*(data[int(i)] for i in idx))
    x = torch.stack(images)
    f = torch.cat([net.features(as_input(x[i:i + 512])) for i in range(0, len(x), 512)])
    return f.double(), torch.as_tensor(labels)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2), as in FID."""
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum()) + float(np.trace(ca + cb - 2 * root))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", type=int, default=2000, help="images per split and task (at most)")
    args = parser.parse_args()
    params = load_params(Path(args.params))
    if not (BACKBONE / "levels.pt").exists():
        raise SystemExit("error: artifacts/backbone/levels.pt missing: run the pipeline first (make run)")
    seed_everything(params.seed, params.train.threads)
    net = backbone_net(params, load_torch(BACKBONE / "quant.pt"))
    deploy_cells(net, load_torch(BACKBONE / "levels.pt"), crossbar_spec(params))
    net.eval()
    source, _ = features(net, load_task_data(params.source.dataset, params.seed).test, args.images, params.seed)
    print(f"source {params.source.dataset.source}; backbone features, up to {args.images} images per split")
    for name, spec in params.tasks.items():
        data = load_task_data(spec.dataset, params.seed)
        train_f, train_y = features(net, data.train, args.images, params.seed)
        test_f, test_y = features(net, data.test, args.images, params.seed)
        weight, bias = ridge_head(train_f, train_y, data.num_classes)
        probe = float(((test_f @ weight.T + bias).argmax(1) == test_y).double().mean()) * 100
        print(f"{name:12s} {spec.dataset.source:14s} Frechet distance to the source {frechet_distance(source, test_f):8.2f}"
              f"   linear probe {probe:5.1f}% ({len(data.test)} test images)")


if __name__ == "__main__":
    main()
