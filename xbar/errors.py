"""One exception type for user mistakes: the CLI and stages print its message as
one line and exit with code 2, never a traceback."""


class UserError(Exception):
    """Bad input (parameters, files, options): `str(err)` is the one line to print."""
