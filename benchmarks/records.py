"""Result records: every figure that docs/results.md shows comes from one of these files.

A benchmark that produces a result calls `save_record(name, ...)`; it writes
`benchmarks/records/<name>.json` atomically with the command that produced it, the commit, the date,
the recipe and the seeds. `python -m benchmarks.results` renders docs/results.md from the records.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RECORDS = Path(__file__).resolve().parent / "records"
NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def commit() -> str:
    """The checkout's commit, with `+dirty` when the work tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def running_command() -> str:
    """This process's command line as a user types it: `python -m benchmarks.x ARGS` for a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name.removesuffix('.__main__')}" if spec and spec.name else \
        f"python {Path(sys.argv[0]).name if sys.argv else '?'}"
    return " ".join([head, *sys.argv[1:]])


def save_record(name: str, *, recipe: str | dict, seeds: list[int] | None, rows: list[dict[str, Any]],
                title: str, command: str | None = None, notes: str = "", **extra: Any) -> Path:
    """Write one result record. `rows` are flat dicts (one table row each); a mean with its CI is
    `{"mean": .., "ci95": .., "n": ..}` (`xbar.stats.MeanCI.as_dict`)."""
    if not NAME.match(name) or name == "index":  # `index`: the README block that lists every record
        raise ValueError(f"record name {name!r}: expected lower-case letters, digits, - or _ (not 'index')")
    record = {
        "name": name,
        "title": title,
        "command": command or running_command(),
        "commit": commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "recipe": recipe,
        "seeds": seeds,
        "notes": notes,
        "rows": rows,
        **extra,
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=RECORDS, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_records() -> list[dict[str, Any]]:
    """Every record, by name."""
    return [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]
