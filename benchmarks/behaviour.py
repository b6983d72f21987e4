"""Behaviour preserved: every figure of a pipeline run, recorded once and compared after a change.

    dvc repro && xbar compare --ratios 0.1          # in a workspace, on the code before the change
    python -m benchmarks.behaviour record before.json
    ... change the code, run the same commands ...
    python -m benchmarks.behaviour check before.json   # exit 1 and the differences if any figure moved

It collects, from the workspace's outputs: the digest of every task.pt's tensors (levels, masks, spare PEs,
BN and head state), every metrics JSON of the pipeline without its timings and run ids, the tables of
program.parquet / energy_*.parquet, the comparison's table.csv (when present), and `xbar memory` /
`xbar energy` on ResNet-50. A refactor that claims to preserve behaviour must leave all of them equal.

benchmarks/snapshots/round1-default.json is the record of the code before round 2's redesign (commit 12e92fe,
`dvc repro` on the default params.yaml, no comparison). Expected differences after the redesign: `xbar
memory`'s packed column-mask bytes (one formula now: 3 codes in ceil(3 log2 K) bits), `xbar energy`'s
`finetune` entry now named `finetune_separate`, and the energy metrics' `typical_methods` likewise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import torch

VOLATILE = ("seconds", "mlflow", "pipeline_key", "run_id")  # timings and run ids differ run to run


def tensor_digest(obj) -> str:  # noqa: ANN001 (nested dicts / lists of tensors)
    h = hashlib.sha256()

    def walk(x, key: str = "") -> None:  # noqa: ANN001
        if isinstance(x, dict):
            for k in sorted(x):
                walk(x[k], f"{key}/{k}")
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")
        elif isinstance(x, torch.Tensor):
            h.update(f"{key}:{x.dtype}:{tuple(x.shape)}".encode())
            h.update(x.detach().contiguous().cpu().numpy().tobytes())
        else:
            h.update(f"{key}={x!r}".encode())

    walk(obj)
    return h.hexdigest()[:16]


def stable(obj):  # noqa: ANN001, ANN201
    """A metrics JSON without its volatile fields."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if not any(word in k for word in VOLATILE)}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def table_digest(path: Path) -> str:
    df = pl.read_csv(path) if path.suffix == ".csv" else pl.read_parquet(path)
    df = df.select([c for c in df.columns if not any(word in c for word in VOLATILE)])
    return hashlib.sha256(df.write_csv().encode()).hexdigest()[:16]


def cli_json(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "xbar.cli", *args, "--json"], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def collect(root: Path) -> dict:
    out: dict = {"task_pt": {}, "metrics": {}, "tables": {}}
    for path in sorted((root / "artifacts/tasks").glob("*/task.pt")):
        out["task_pt"][path.parent.name] = tensor_digest(torch.load(path, map_location="cpu", weights_only=True))
    for path in sorted((root / "metrics").rglob("*.json")):
        out["metrics"][path.relative_to(root).as_posix()] = stable(json.loads(path.read_text()))
    for pattern in ("artifacts/tasks/*/program.parquet", "artifacts/tasks/*/energy_*.parquet",
                    "artifacts/comparison/table.csv"):
        for path in sorted(root.glob(pattern)):
            out["tables"][path.relative_to(root).as_posix()] = table_digest(path)
    out["xbar_memory_resnet50"] = cli_json("memory", "--model", "resnet50")
    out["xbar_energy_resnet50"] = cli_json("energy", "--model", "resnet50", "--preset", "paper")
    return out


def differences(before, after, where: str = "") -> list[str]:  # noqa: ANN001
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for k in sorted(set(before) | set(after)):
            if k not in after:
                found.append(f"{where}/{k}: gone")
            elif k not in before:
                found.append(f"{where}/{k}: new")
            else:
                found += differences(before[k], after[k], f"{where}/{k}")
        return found
    return [] if before == after else [f"{where}: {before!r} -> {after!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.behaviour")
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("file", type=Path)
    parser.add_argument("--root", type=Path, default=Path("."), help="the workspace (default: here)")
    args = parser.parse_args()
    now = collect(args.root)
    if args.action == "record":
        args.file.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now['task_pt'])} task.pt, {len(now['metrics'])} metrics files, "
              f"{len(now['tables'])} tables -> {args.file}")
        return
    found = differences(json.loads(args.file.read_text()), json.loads(json.dumps(now)))
    for line in found:
        print(line)
    print(f"{len(found)} differences" + ("" if found else ": behaviour preserved"))
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
