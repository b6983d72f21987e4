"""One exception type for user mistakes: the CLI and stages print its message as
one line and exit with code 2, never a traceback."""


class UserError(Exception):
    """Bad input (parameters, files, options): `str(err)` is the one line to print."""


class Diverged(UserError):
    """A training run that diverged (the divergence guard: xbar.training.fit, xbar.methods.recipe); the
    task recipe retries it at lower learning rates before the line reaches the user."""
