"""How much longer the chip forward takes than the ideal forward on the default benchmark's test sets
(target: at most 12x; xbar.chip.forward). Writes the record benchmarks/records/chip_speed.json.

    python -m benchmarks.chip_speed [--params params.yaml] [--adc-bits 5] [--device paper] [--signed offset]

Uses the learned tasks (artifacts/tasks/<task>/task.pt over artifacts/backbone/levels.pt) when the
pipeline has run; otherwise a stand-in of the same architecture: the untrained quantized backbone of
params.yaml with an xma2 task per entry (10% spare PEs, random column masks). Speed does not depend on
the weights. Per task: one ideal evaluation of the test split, and one chip instance's evaluation
(programming the spare PEs, drawing the cells, calibrating the ADCs by params.yaml's range rule on
chip.calibration_images training images, the test split through the chip forward). Ideal and chip runs alternate, so both see the same machine load;
CPU time (this process, all threads) is reported next to wall time, as it depends less on other load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from workflow.io import load_torch
from xbar.chip.devices import resolve_device
from benchmarks.records import save_record
from xbar.chip.evaluate import calibration_images, chip_accuracy, chip_settings
from xbar.crossbar import map_model, spare_pe_count
from xbar.data import load_task_data
from xbar.methods import build_task_model, crossbar_spec, load_task_model, quantized_net
from xbar.params import load_params
from xbar.quant import export_levels
from xbar.training import accuracy, as_input, seed_everything


def stand_in(params, name: str, num_classes: int, channels: int, seed: int):  # noqa: ANN001, ANN201
    """An xma2 task model on the untrained quantized backbone (clips set on random images)."""
    seed_everything(seed)
    net = quantized_net(params, num_classes, channels)
    net.eval()
    size = params.source.dataset.image_size
    net(as_input(torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8)))
    mapped = {lm.name for lm in map_model(net, crossbar_spec(params)).layers}
    levels = {k: v for k, v in export_levels(net).items() if k in mapped}
    quant = {"state_dict": net.state_dict(), "num_classes": num_classes, "channels": channels}
    mapping = map_model(net, crossbar_spec(params))
    spare = torch.randperm(mapping.n_pes)[: spare_pe_count(0.1, mapping.n_pes)]
    spec = params.tasks[name].model_copy(update={"method": "xma2"})
    model = build_task_model(params, spec, quant, levels, num_classes, spare_pes=spare)
    for layer in model.layers().values():
        layer.column_mask.real.data = torch.randn(layer.column_mask.real.shape) * 3
    model.net.eval()
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--adc-bits", type=int, default=5)
    parser.add_argument("--device", default="paper")
    parser.add_argument("--signed", default=None)
    args = parser.parse_args()
    params = load_params(Path(args.params))
    seed_everything(params.seed, params.train.threads)
    _, adc = chip_settings(params, adc_bits=args.adc_bits, signed=args.signed)
    device = resolve_device(args.device)
    levels_pt = Path("artifacts/backbone/levels.pt")
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    total = {c: [0.0, 0.0] for c in clocks}
    rows = []
    for name, spec in params.tasks.items():
        data = load_task_data(spec.dataset, params.seed)
        task_pt = Path("artifacts/tasks") / name / "task.pt"
        if task_pt.exists() and levels_pt.exists():
            model = load_task_model(load_torch(task_pt), load_torch(levels_pt), params)
            origin = "learned"
        else:
            model = stand_in(params, name, data.num_classes, data.channels, params.seed)
            origin = "stand-in"
        calib = calibration_images(data.train, params.chip.calibration_images, params.seed)
        start = {c: f() for c, f in clocks.items()}
        accuracy(model.net, data.test, params.train.eval_batch_size)
        ideal = {c: f() - start[c] for c, f in clocks.items()}
        begin = {c: f() for c, f in clocks.items()}
        chip_accuracy(model, data.test, device, adc, instances=1, seed=params.seed,
                      batch_size=params.train.eval_batch_size, calibration=calib)
        # chip_accuracy runs the ideal evaluation once too: take it out
        chip = {c: max(f() - begin[c] - ideal[c], 0.0) for c, f in clocks.items()}
        for c in clocks:
            total[c][0] += ideal[c]
            total[c][1] += chip[c]
        rows.append({"task": name, "origin": origin, "test_images": len(data.test),
                     **{f"{c}_ideal_s": round(ideal[c], 3) for c in clocks},
                     **{f"{c}_chip_s": round(chip[c], 3) for c in clocks},
                     "cpu_ratio": round(chip["cpu"] / max(ideal["cpu"], 1e-9), 2)})
        print(f"{name:12s} ({origin}, {len(data.test)} test images): "
              + ", ".join(f"{c} ideal {ideal[c]:6.2f} s chip {chip[c]:6.2f} s ({chip[c] / ideal[c]:4.1f}x)"
                          for c in clocks))
    print("all tasks, one chip instance: " + ", ".join(
        f"{c} ideal {i:.2f} s, chip {ch:.2f} s -> ratio {ch / i:.1f}x" for c, (i, ch) in total.items())
        + f" (target <= 12x); {args.adc_bits}-bit ADC, device {args.device}, {adc.signed} weights, "
        f"ADC range {adc.rule}")
    rows.append({"task": "all", **{f"{c}_ideal_s": round(i, 3) for c, (i, _) in total.items()},
                 **{f"{c}_chip_s": round(ch, 3) for c, (_, ch) in total.items()},
                 "cpu_ratio": round(total["cpu"][1] / max(total["cpu"][0], 1e-9), 2)})
    save_record("chip_speed", recipe={"adc_bits": args.adc_bits, "device": args.device, "signed": adc.signed,
                                      "adc_range": adc.rule, "model": params.model.name},
                seeds=[params.seed], rows=rows, title="Chip forward time against the ideal forward (one instance)")


if __name__ == "__main__":
    main()
