"""What the command-line tools (train_ttt.py, evaluate.py, generate.py, plot_metrics.py) share: the class of
errors that are the user's to fix, and the wrapper that prints them as one line. Any other exception is a bug
and keeps its traceback."""

import os
import shlex
import sys
from pathlib import Path


class UserError(ValueError):
    """Bad input (a flag, a file, a checkpoint, a directory): the message names what is wrong and how to fix it."""


class Stopped(Exception):
    """The run stopped early on a signal after saving what resumes it: the process exits 128 + the signal's number
    (143 for SIGTERM, 130 for SIGINT), as shells and schedulers expect of a process a signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def unwritable_folder(path) -> str | None:
    """Why the folder `path` (existing or to be created) cannot be written, or None: checked before any work, so a
    bad output path is one line at once, not a traceback after the work. Nothing is created."""
    path = Path(path).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so no folder can be made under it"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable, so {path} cannot be made"
    return None


def command_line(argv=None) -> str:
    """A command as a user types it: `python train_ttt.py ...` (or a console script's name and its arguments);
    `argv`: sys.argv, or the arguments a library call passed to train_ttt.main (then under train_ttt.py's name)."""
    argv = list(sys.argv) if argv is None else ["train_ttt.py", *argv]
    program = Path(argv[0]).name
    return shlex.join(["python", program, *argv[1:]] if program.endswith(".py") else [program, *argv[1:]])


def resume_command(argv=None) -> str:
    """The command line of this process with `--resume_from_checkpoint latest` (replacing any resume flag given)."""
    argv = list(sys.argv if argv is None else argv)
    kept, skip = [], False
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif name in ("--resume_from_checkpoint", "--resume-from-checkpoint", "--resume-from"):
            skip = "=" not in arg
        else:
            kept.append(arg)
    program = ["python", argv[0]] if argv[0].endswith(".py") else [argv[0]]
    return shlex.join([*program, *kept, "--resume_from_checkpoint", "latest"])


def run(work, *args):
    """work(*args); a UserError becomes `<program>: error: <message>` on stderr and exit status 1; a Stopped run
    prints its message and exits 128 + the signal's number."""
    try:
        return work(*args)
    except UserError as error:
        print(f"{sys.argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except Stopped as stop:
        print(f"{sys.argv[0]}: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
