"""What every stage shares: the artifact layout, atomic writes, one-line errors."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xbar.errors import UserError
from xbar.params import Params, load_params

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
BACKBONE = ARTIFACTS / "backbone"
MAPPING = ARTIFACTS / "mapping"


def task_dir(task: str) -> Path:
    return ARTIFACTS / "tasks" / task


def task_metrics(task: str, stage: str) -> Path:
    return METRICS / "tasks" / task / f"{stage}.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees half a file.

    A file that exists keeps its permissions; a new one gets 0644 (mkstemp would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: Path) -> Any:
    """Checkpoints hold tensors and plain containers only: weights_only=True, never pickled code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing (run the stage that writes it first: dvc repro)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated / corrupt / not a torch file
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}); delete it and run dvc repro") from None


def save_parquet(path: Path, df) -> None:  # noqa: ANN001 (polars DataFrame)
    buf = io.BytesIO()
    df.write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())


def stage_main(fn: Callable[..., None], task_arg: bool = False) -> None:
    """Run a stage: parse `--params` (and `--task`), turn a UserError into one line + exit 2."""
    parser = argparse.ArgumentParser(prog=f"python -m {fn.__module__}")
    parser.add_argument("--params", default="params.yaml")
    if task_arg:
        parser.add_argument("--task", required=True)
    args = parser.parse_args()
    try:
        params: Params = load_params(args.params)
        if task_arg:
            if args.task not in params.tasks:
                raise UserError(f"--task: {args.task!r} is not a task in {args.params} (tasks: {', '.join(params.tasks)})")
            fn(params, args.task)
        else:
            fn(params)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
