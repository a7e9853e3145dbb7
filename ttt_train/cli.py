"""What the command-line tools (train_ttt.py, evaluate.py, generate.py, plot_metrics.py) share: the class of
errors that are the user's to fix, and the wrapper that prints them as one line. Any other exception is a bug
and keeps its traceback."""

import sys


class UserError(ValueError):
    """Bad input (a flag, a file, a checkpoint, a directory): the message names what is wrong and how to fix it."""


def run(work, *args):
    """work(*args); a UserError becomes `<program>: error: <message>` on stderr and exit status 1."""
    try:
        return work(*args)
    except UserError as error:
        print(f"{sys.argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1)
