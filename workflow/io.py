"""What every stage shares: the artifact layout, atomic writes, one-line errors."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from xbar.errors import UserError
from xbar.params import Params, load_params
from xbar.runtime import compute_device, to_cpu

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
    The temp file's name holds the writer's pid: a temp file left by a killed writer is removed here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    _remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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


def _remove_dead_temps(path: Path) -> None:
    """Delete `.<name>.<pid>.*.tmp` beside `path` whose writer process no longer exists."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive, another user's
            pass


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """A stage's JSON output (metrics), or one line naming it when it is missing."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing (run the stage that writes it first: dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON (corrupt or truncated); re-run the stage that writes it") from None


def save_torch(path: Path, obj: Any) -> None:
    """Atomically, and always as CPU tensors: a checkpoint written on a GPU loads on a CPU machine."""
    buf = io.BytesIO()
    torch.save(to_cpu(obj), buf)
    atomic_write_bytes(path, buf.getvalue())


# What the stages rely on in each checkpoint they read by name (docs/artifacts.md).
REQUIRED_KEYS = {
    "fp32.pt": ("state_dict", "num_classes", "channels"),
    "quant.pt": ("state_dict", "num_classes", "channels"),
    "task.pt": ("method", "levels", "scales", "spare_pes", "num_classes", "channels", "model_state"),
}


def load_torch(path: Path) -> Any:
    """Checkpoints hold tensors and plain containers only: weights_only=True, never pickled code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing (run the stage that writes it first: dvc repro)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated / corrupt / not a torch file
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}); delete it and run dvc repro") from None
    need = REQUIRED_KEYS.get(path.name, ())
    missing = [k for k in need if not isinstance(obj, dict) or k not in obj]
    if missing:  # a readable torch file, but not what the stage that writes this name writes
        raise UserError(f"{path}: not an xbar {path.name} (no {missing[0]!r}); delete it and run dvc repro")
    return obj


def save_parquet(path: Path, df) -> None:  # noqa: ANN001 (polars DataFrame)
    buf = io.BytesIO()
    df.write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())


def stage_main(fn: Callable[..., None], task_arg: bool = False,
               around: Callable[[str, str], AbstractContextManager] | None = None) -> None:
    """Run a stage: parse `--params` (and `--task`), turn a UserError into one line + exit 2 (`train.device: cuda`
    on a machine without CUDA is one, before the stage reads anything else). `around(task, stage)` wraps a
    per-task stage's work (workflow.attempts.stage_attempt: the task's MLflow run spans its stages)."""
    main = sys.modules["__main__"]  # `python -m stages.X` runs X as __main__; its spec keeps the name
    own_process = fn.__module__ == "__main__"  # else a caller (a test) runs the stage in its process
    module = main.__spec__.name if own_process and main.__spec__ else fn.__module__
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--params", default="params.yaml")
    if task_arg:
        parser.add_argument("--task", required=True)
    args = parser.parse_args()
    try:
        params: Params = load_params(args.params)
        compute_device(params.train.device)
        if task_arg:
            if args.task not in params.tasks:
                raise UserError(f"--task: {args.task!r} is not a task in {args.params} (tasks: {', '.join(params.tasks)})")
            with around(args.task, module.rsplit(".", 1)[-1]) if around else nullcontext():
                fn(params, args.task)
        else:
            fn(params)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if own_process:
        exit_without_teardown()


def exit_without_teardown() -> None:
    """Exit 0 now. Every output is written and closed; the interpreter's teardown (freeing torch's,
    polars' and matplotlib's objects one by one) would add 0.5-1.5 s to every stage, seconds per task."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

