"""The `xbar` command line. Each command is thin: parse options, call the library, print."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import typer

from xbar.errors import UserError

app = typer.Typer(help="xbar: continual learning on ReRAM crossbars with 2-tier masks (XMA2).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def one_line_errors(fn: Callable) -> Callable:
    """A user mistake prints one line on stderr and exits with code 2: no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN202
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def main() -> None:
    """Run `xbar COMMAND --help` for a command's options."""


@app.command()
@one_line_errors
def report(as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table.")) -> None:
    """Tasks learned so far: accuracy now / at learn, forgetting, energy, mask memory (read from MLflow)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from stages.tracking import report as build_report
    from stages.tracking import tracker

    with tracker() as t:
        rep = build_report(t)
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    if not rep["tasks"]:
        print("no task in MLflow yet: run `make run` (dvc repro) or `xbar add-task`")
        return
    table = Table(title="xbar tasks (MLflow)")
    for col in ("#", "task", "dataset", "method", "acc now %", "acc at learn %", "forgetting", "spare PEs",
                "mask bytes", "energy J", "gate"):
        table.add_column(col)
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rep["tasks"]:
        table.add_row(str(r["order"]), r["name"], r["dataset"], r["method"], fmt(r["accuracy_now"]),
                      fmt(r["accuracy_at_learn"]), fmt(r["forgetting"]), fmt(r["spare_pes"], "{:.0f}"),
                      fmt(r["mask_bytes"], "{:.0f}"), fmt(r["energy_j"], "{:.3g}"), r["gate"] or "-")
    Console().print(table)


if __name__ == "__main__":
    app()
