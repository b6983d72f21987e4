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


if __name__ == "__main__":
    app()
