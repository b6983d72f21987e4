"""XMA2 training step time / plain fine-tuning step time, measured side by side in one run.

    python -m benchmarks.step_ratio [--params params.yaml] [--rounds 30]

Both models sit on the same quantized backbone (artifacts/backbone/quant.pt and
levels.pt when they exist, else a freshly initialized one of params.model: the
timing does not depend on the weights) and train on the same batch of
train.batch_size images: "plain" is finetune_separate (4-bit QAT of every
weight), "xma2" has the top spare_ratio PEs as spare PEs and column shift masks
on every other PE. A step is forward + backward + optimizer steps. Rounds
alternate between the two so that machine noise hits both alike; the medians
are compared. Target: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workflow.io import BACKBONE, load_torch
from xbar.crossbar import map_model
from xbar.methods import (TaskModel, backbone_net, build_task_model, crossbar_spec, deploy_cells, optimizers,
                          quantized_net)
from xbar.methods.recipe import train_mode
from xbar.params import TaskSpec, load_params
from xbar.quant import export_levels
from xbar.ranking import rank_pes
from xbar.training import as_input, seed_everything


def backbone(params) -> tuple[dict, dict]:  # noqa: ANN001
    if (BACKBONE / "quant.pt").exists() and (BACKBONE / "levels.pt").exists():
        return load_torch(BACKBONE / "quant.pt"), load_torch(BACKBONE / "levels.pt")
    net = quantized_net(params, 10, 1)
    net.eval()
    net(torch.rand(64, 1, 28, 28))  # initializes every clip
    mapped = {lm.name for lm in map_model(net, crossbar_spec(params)).layers}
    return ({"state_dict": net.state_dict(), "num_classes": 10, "channels": 1},
            {k: v for k, v in export_levels(net).items() if k in mapped})


def stepper(model: TaskModel, train, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN001, ANN201
    """A training step of `model` on (x, y) as the pipeline trains (its optimizers, its train mode): forward,
    backward, every optimizer's step. benchmarks.scale times the same step."""
    opts = optimizers(model, train)
    train_mode(model)(model.net)

    def step() -> None:
        loss = F.cross_entropy(model.net(x), y)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()

    return step


def timed(step, device: torch.device | None = None) -> float:  # noqa: ANN001
    """Seconds `step()` takes; on a CUDA `device`, until the device has finished it."""
    start = time.perf_counter()
    step()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(params, rounds: int = 30) -> tuple[float, float, int]:  # noqa: ANN001
    """Median seconds of a plain and an XMA2 training step, interleaved; and the number of spare PEs."""
    seed_everything(params.seed, params.train.threads)
    quant, levels = backbone(params)
    classes = 10
    x = as_input(torch.randint(0, 256, (params.train.batch_size, 1, 28, 28), dtype=torch.uint8))
    y = torch.randint(0, classes, (params.train.batch_size,))
    spare_ratio = next(iter(params.tasks.values())).spare_ratio if params.tasks else 0.1

    net = backbone_net(params, quant)
    deploy_cells(net, levels, crossbar_spec(params))
    table, _ = rank_pes(net, (x * 255).to(torch.uint8), y, classes, spare_ratio)
    spare = table.filter("selected")["pe"].to_list()

    def model(method: str) -> TaskModel:
        spec = TaskSpec(dataset="mnist5k", method=method, spare_ratio=spare_ratio, shift_levels=3)
        return build_task_model(params, spec, quant, levels, classes, spare_pes=spare if method == "xma2" else None)

    steps = {"plain": stepper(model("finetune_separate"), params.train, x, y),
             "xma2": stepper(model("xma2"), params.train, x, y)}
    for step in steps.values():  # warm-up: allocator, clip initialization, kernels
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    return statistics.median(times["plain"]), statistics.median(times["xma2"]), len(spare)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    params = load_params(Path(args.params))
    plain, xma2, n_spare = step_times(params, args.rounds)
    print(f"plain fine-tuning step: {plain * 1e3:.1f} ms (median of {args.rounds}, batch {params.train.batch_size}, "
          f"{torch.get_num_threads()} threads)")
    print(f"xma2 step ({n_spare} spare PEs, column shift masks elsewhere): {xma2 * 1e3:.1f} ms")
    print(f"ratio xma2 / plain: {xma2 / plain:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
