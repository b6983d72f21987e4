"""`xbar chip`'s work: the pipeline's learned tasks (artifacts) on seeded chip instances, logged to MLflow.

The command line (xbar/cli.py) parses the options and prints; this module reads the artifacts, checks
each task's data against the digest it was learned on, evaluates (xbar.chip.evaluate) and hands the
numbers to each task's MLflow run (workflow.tracking.log_chip).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from workflow.io import BACKBONE, load_torch, task_dir
from xbar.chip.devices import DevicePreset
from xbar.chip.evaluate import evaluate_tasks
from xbar.chip.forward import AdcConfig
from xbar.data import load_task_data
from xbar.errors import UserError
from xbar.params import Params
from xbar.training import seed_everything

SWEEP_BITS = tuple(range(4, 9))  # `--sweep`: the ADC bits of the accuracy-vs-ADC figure


def run_chip(params: Params, device: DevicePreset, adc: AdcConfig, instances: int, time_s: float,
             switches: int = 0, sweep: bool = False, mlflow: bool = True) -> dict:
    """The `xbar chip --json` object: {"adc_bits", "device", "instances", "time_s", "adc_range", "adc_clip",
    "signed", "tasks": {name: {"ideal", "chip_mean", "chip_ci", "chip_std", "chip_min"}}} (with `sweep`: "adc_bits" a list and
    "sweep": {bits: tasks}); with `mlflow`, also on each task's run (a note on stderr for a task without one)."""
    learned = [n for n in params.tasks if (task_dir(n) / "task.pt").exists()]
    if not learned:
        raise UserError("no learned task (artifacts/tasks/<task>/task.pt): run the pipeline first (dvc repro)")
    seed_everything(params.seed, params.train.threads)
    levels = load_torch(BACKBONE / "levels.pt")
    tasks = {n: load_torch(task_dir(n) / "task.pt") for n in learned}
    data = {}
    for n in learned:
        data[n] = load_task_data(params.tasks[n].dataset, params.seed)
        if data[n].digest != tasks[n]["dataset_digest"]:
            raise UserError(f"task {n}: its data changed since it was learned (digest {data[n].digest} != "
                            f"{tasks[n]['dataset_digest']}); restore the dataset")
    head = {"device": device.name, "instances": instances, "time_s": time_s, "adc_range": adc.range,
            "adc_clip": adc.clip, "signed": adc.signed}
    if sweep:
        result = {**head, "adc_bits": list(SWEEP_BITS), "sweep": {
            str(b): evaluate_tasks(params, tasks, levels, data, device, replace(adc, bits=b), instances, time_s)
            for b in SWEEP_BITS}}
    else:
        result = {"adc_bits": adc.bits, **head,
                  "tasks": evaluate_tasks(params, tasks, levels, data, device, adc, instances, time_s, switches)}
    if mlflow:
        from workflow.tracking import file_digest, log_chip, tracker

        with tracker() as t:
            runs = log_chip(t, result, {n: file_digest(task_dir(n) / "task.pt") for n in learned})
        missing = [n for n, run in runs.items() if run is None]
        if missing:
            print(f"note: no MLflow run of {', '.join(missing)} for its task.pt (numbers not logged)", file=sys.stderr)
    return result
