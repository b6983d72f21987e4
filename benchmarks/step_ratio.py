"""XMA2 training step time / plain fine-tuning step time, measured side by side in one run.

    python -m benchmarks.step_ratio [--batch 128] [--steps 20]

Both steps run on the same quantized backbone (the default params.yaml model,
untrained: the cost does not depend on the weights' values) and the same
batch: forward, backward, optimizer step. "Plain" is `finetune_separate`
(4-bit QAT of every weight, no mask); XMA2 has 10% spare PEs and column shift
masks on every other PE. Target: ratio <= 1.3 (masks are applied to the
weights once per step, never per activation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from xbar.crossbar import map_model
from xbar.methods import build_task_model, crossbar_spec, quantized_net
from xbar.params import load_params
from xbar.quant import export_levels
from xbar.training import as_input, seed_everything


def step_time(model, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:  # noqa: ANN001 (TaskModel)
    trainable = [p for p in model.net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=1e-3)
    model.net.train()
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        start = time.perf_counter()
        loss = F.cross_entropy(model.net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    params = load_params(args.params)
    seed_everything(params.seed, params.train.threads)
    x = as_input(torch.randint(0, 256, (args.batch, 1, 28, 28), dtype=torch.uint8))
    y = torch.randint(0, 10, (args.batch,))
    net = quantized_net(params, 10, 1)
    net(x)  # initialise the quantizers' clips
    quant = {"state_dict": net.state_dict(), "num_classes": 10, "channels": 1}
    mapping = map_model(net, crossbar_spec(params))
    levels = {k: v for k, v in export_levels(net).items() if k in {lm.name for lm in mapping.layers}}
    spare = torch.arange(0, mapping.n_pes, 10)  # 10% of the PEs, spread over the layers
    task = next(iter(params.tasks.values()))
    plain = build_task_model(params, task.model_copy(update={"method": "finetune_separate"}), quant, levels, 10)
    xma2 = build_task_model(params, task.model_copy(update={"method": "xma2"}), quant, levels, 10, spare_pes=spare)
    results = {}
    for _ in range(2):  # interleave the two so drift of the machine hits both alike
        results.setdefault("plain", []).append(step_time(plain, x, y, args.steps))
        results.setdefault("xma2", []).append(step_time(xma2, x, y, args.steps))
    plain_s, xma2_s = min(results["plain"]), min(results["xma2"])
    print(f"plain fine-tuning step: {plain_s * 1e3:.1f} ms (batch {args.batch}, {params.train.threads} threads)")
    print(f"XMA2 step:              {xma2_s * 1e3:.1f} ms ({spare.numel()} spare PEs of {mapping.n_pes})")
    print(f"ratio XMA2 / plain:     {xma2_s / plain_s:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
