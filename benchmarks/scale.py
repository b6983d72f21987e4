"""The plain fine-tuning step against the XMA2 step on a real-scale backbone: time and peak memory.

    python -m benchmarks.scale [--model resnet50] [--image-size 224] [--batch 8] [--classes 1000]
                               [--steps 5] [--warmup 2] [--device auto|cpu|cuda] [--threads N] [--json]
                               [--record NAME]

The backbone is a freshly initialized quantized `--model` (any registered backbone, xbar.backbones, or any
torchvision classification model; resnet50 by default: timing and memory do not depend on the weights) on
3-channel `--image-size` images, its clips set on random
images, with a `--classes`-way head (1000 by default, ImageNet's). One batch of `--batch` random uint8
images and labels, seeded, is the training batch of both sides:

- **plain**: finetune_separate, the fine-tuning step every method is measured against: 4-bit QAT of
  every weight (TensorAdam in levels), SGD on BN, clips and head;
- **xma2**: the top 10% PEs (ranked by `xbar.ranking.rank_pes` on the same batch, in this process) as
  spare PEs with trainable 4-bit weights, a column shift mask (3 shift levels) on every other PE.

Both are built as the pipeline builds them (`build_task_model`, `optimizers`, `train_mode`), and a step
is forward + backward + every optimizer's step (benchmarks.step_ratio's `stepper` and `timed`). Each side
runs in its own process, one after the other: `--warmup` steps, then the median of `--steps` timed steps
(CUDA: synchronized).

Peak memory of a side: what building the task model and training it adds on top of a process that
holds the backbone's quant.pt / levels.pt contents and the batch. On the CPU: the peak resident set
(ru_maxrss, its high-water mark reset just before the build through /proc/self/clear_refs where Linux
offers it) minus the resident set at that moment; so it counts the task model's own tensors (cells,
trainable weights, masks, index bookkeeping), the optimizer state, activations and temporaries. Where
the mark cannot be reset, loading the backbone's own peak may count too (said in the output). On CUDA:
torch.cuda.max_memory_allocated over the same span, minus what was allocated at its start.

Goals (printed, not asserted): xma2 step time at most 1.0x the plain step's, peak memory at most 0.9x.
`--record NAME` also writes benchmarks/records/NAME.json (benchmarks.records). With `--json` it prints
exactly one line: {"model", "image_size", "batch", "plain_step_s",
"xma2_step_s", "step_ratio", "plain_peak_mb", "xma2_peak_mb", "memory_ratio"}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from xbar.errors import UserError

SIDES = {"plain": "finetune_separate", "xma2": "xma2"}
GOALS = {"step_ratio": 1.0, "memory_ratio": 0.9}  # the XMA2 step against plain fine-tuning (issue #32)
SPARE_RATIO = 0.1
SHIFT_LEVELS = 3
ROOT = Path(__file__).resolve().parent.parent


def bench_params(model: str, image_size: int, batch: int):  # noqa: ANN201
    from xbar.params import parse_params

    return parse_params({"model": {"name": model}, "train": {"batch_size": batch},
                         "source": {"dataset": {"source": "torchvision", "name": "ImageNet",
                                                "image_size": image_size, "channels": 3}}}, "benchmarks.scale")


def batch_of(params, classes: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The seeded training batch: uint8 RGB images and labels."""
    g = torch.Generator().manual_seed(params.seed)
    size, n = params.source.dataset.image_size, params.train.batch_size
    return (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, classes, (n,), generator=g))


def make_backbone(params, classes: int, folder: Path) -> list[int]:  # noqa: ANN001
    """quant.pt / levels.pt contents of a freshly initialized backbone into `folder`; returns the spare PEs
    rank_pes picks on the benchmark's batch."""
    from xbar.crossbar import map_model
    from xbar.methods import backbone_net, crossbar_spec, deploy_cells, quantized_net
    from xbar.quant import export_levels
    from xbar.ranking import rank_pes
    from xbar.training import as_input, seed_everything

    seed_everything(params.seed)
    images, labels = batch_of(params, classes)
    net = quantized_net(params, classes, 3)
    net.eval()
    with torch.no_grad():
        net(as_input(images))  # initializes every clip
    mapped = {lm.name for lm in map_model(net, crossbar_spec(params)).layers}
    quant = {"state_dict": net.state_dict(), "num_classes": classes, "channels": 3}
    levels = {k: v for k, v in export_levels(net).items() if k in mapped}
    torch.save(quant, folder / "quant.pt")
    torch.save(levels, folder / "levels.pt")
    deployed = backbone_net(params, quant)
    deploy_cells(deployed, levels, crossbar_spec(params))
    table, _ = rank_pes(deployed, images, labels, classes, SPARE_RATIO)
    return table.filter("selected")["pe"].to_list()


# --- one side, in its own process ---------------------------------------------------------------


def rss_mb() -> float:
    """The resident set now (Linux: /proc/self/statm), else the peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the resident set's high-water mark (Linux >= 4.0); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def warm_runtime(device: torch.device) -> None:
    """One small conv training step before the baseline, so the runtime's own one-time memory is not
    booked to the side: thread pools, the autograd engine, kernel libraries, and the modules torch.optim
    imports on its first optimizer (120 MB of them on the CPU, measured)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    F.cross_entropy(net(torch.rand(2, 3, 16, 16, device=device)), torch.zeros(2, dtype=torch.int64, device=device)
                    ).backward()
    opt.step()


def run_side(side: str, params, folder: Path, spare: list[int], classes: int, steps: int, warmup: int,  # noqa: ANN001
             device: torch.device) -> dict:
    from benchmarks.step_ratio import stepper, timed
    from xbar.methods import build_task_model
    from xbar.params import TaskSpec
    from xbar.training import as_input, seed_everything

    seed_everything(params.seed)
    quant = torch.load(folder / "quant.pt", weights_only=True)
    levels = torch.load(folder / "levels.pt", weights_only=True)
    images, labels = batch_of(params, classes)
    x, y = as_input(images).to(device), labels.to(device)
    warm_runtime(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base, reset = torch.cuda.memory_allocated(device) / 2**20, True
    else:
        reset = reset_peak_rss()
        base = rss_mb()
    spec = TaskSpec(dataset="mnist5k", method=SIDES[side], spare_ratio=SPARE_RATIO, shift_levels=SHIFT_LEVELS)
    model = build_task_model(params, spec, quant, levels, classes, spare_pes=spare if side == "xma2" else None)
    model.net.to(device)
    step = stepper(model, params.train, x, y)
    for _ in range(warmup):  # allocator, kernels, the optimizers' state
        timed(step, device)
    times = [timed(step, device) for _ in range(steps)]
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mb()) - base
    return {"step_s": statistics.median(times), "peak_mb": peak, "peak_reset": reset,
            "threads": torch.get_num_threads()}


def side_process(side: str, args: argparse.Namespace, folder: Path, spare: list[int]) -> dict:
    """`run_side` in a fresh process (its own peak memory); its one JSON line back."""
    command = [sys.executable, "-m", "benchmarks.scale", "--side", side, "--backbone-dir", str(folder),
               "--spare", ",".join(map(str, spare)), "--model", args.model, "--image-size", str(args.image_size),
               "--batch", str(args.batch), "--classes", str(args.classes), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"benchmarks.scale: the {side} side failed (exit {out.returncode}): "
                         f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> tuple[dict, dict]:
    """(the one-line result, details) of both sides."""
    from xbar.runtime import compute_device

    compute_device(args.device)  # a bad --device fails here, once
    params = bench_params(args.model, args.image_size, args.batch)
    with tempfile.TemporaryDirectory(prefix="xbar-scale-") as tmp:
        folder = Path(tmp)
        spare = make_backbone(params, args.classes, folder)
        sides = {side: side_process(side, args, folder, spare) for side in SIDES}
    plain, xma2 = sides["plain"], sides["xma2"]
    result = {"model": args.model, "image_size": args.image_size, "batch": args.batch,
              "plain_step_s": plain["step_s"], "xma2_step_s": xma2["step_s"],
              "step_ratio": xma2["step_s"] / plain["step_s"],
              "plain_peak_mb": plain["peak_mb"], "xma2_peak_mb": xma2["peak_mb"],
              "memory_ratio": xma2["peak_mb"] / plain["peak_mb"]}
    details = {"spare_pes": len(spare), "threads": plain["threads"], "peak_reset": plain["peak_reset"]}
    return result, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a registered backbone or a torchvision model name")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000, help="classes of the task head")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (their median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (as train.device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--record", default=None, help="also save the result as benchmarks/records/NAME.json")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # one side, in a child process
    parser.add_argument("--backbone-dir", help=argparse.SUPPRESS)
    parser.add_argument("--spare", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        from xbar.runtime import compute_device

        spare = [int(p) for p in args.spare.split(",") if p]
        params = bench_params(args.model, args.image_size, args.batch)
        print(json.dumps(run_side(args.side, params, Path(args.backbone_dir), spare, args.classes, args.steps,
                                  args.warmup, compute_device(args.device))))
        return
    try:
        result, details = measure(args)
    except UserError as err:  # e.g. --device cuda on a machine without CUDA
        raise SystemExit(f"benchmarks.scale: {err}") from None
    if args.record:
        from benchmarks.records import save_record

        save_record(args.record, recipe={"spare_ratio": SPARE_RATIO, "shift_levels": SHIFT_LEVELS,
                                         "classes": args.classes, "steps": args.steps, "warmup": args.warmup,
                                         "device": args.device, "threads": details["threads"]},
                    seeds=[0], rows=[result | {"spare_pes": details["spare_pes"]}],
                    title=f"XMA2 step against plain fine-tuning: {args.model} at {args.image_size} px",
                    notes="one process per side; peak memory: what building and training the task model adds",
                    load_average=round(os.getloadavg()[0], 1))  # other processes' load skews the step times
    if args.json:
        print(json.dumps(result))
        return
    where = "CUDA (max_memory_allocated)" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else (
        f"CPU, {details['threads']} threads (peak RSS" + ("" if details["peak_reset"] else ", mark not reset") + ")")
    print(f"{args.model} at {args.image_size} px, batch {args.batch}, {args.classes}-class head; {where}; "
          f"median of {args.steps} steps after {args.warmup}")
    print(f"plain fine-tuning step: {result['plain_step_s']:.3f} s, peak {result['plain_peak_mb']:.0f} MB")
    print(f"xma2 step ({details['spare_pes']} spare PEs, column shift masks elsewhere): "
          f"{result['xma2_step_s']:.3f} s, peak {result['xma2_peak_mb']:.0f} MB")
    for key, goal in GOALS.items():
        value = result[key]
        print(f"{key}: {value:.2f} (goal <= {goal}: {'met' if value <= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
