"""The run directory: the names a run writes in its output directory (a closed list: it deletes, renames or
overwrites nothing else), recognising the trainer's own folders, listing and ordering checkpoints, the checks a run
makes before it writes there, clean-up after a killed save, branches, rotation, and the lock.

A leaf module (standard library only): train_ttt.py checks an output directory with it before importing torch.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from ttt_train.cli import UserError

TRAINER_STATE = "trainer_state.json"
BEST_MODEL = "best_model"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "training_summary.json"
CHECKPOINT_NAME = re.compile(r"^(checkpoint|milestone)-(\d+)$")
LOCK_FILE = ".lock"
ABANDONED_DIR = "abandoned"
FINAL_MODEL = "final_model"
TRAINING_ARGS = "training_args.json"
TOKENIZER_DIR = "tokenizer"  # --train_tokenizer's tokenizer
# Written first into every folder the trainer makes that is not (yet) a checkpoint (a save's .X.partial/, the
# trained tokenizer/): what tells the trainer's own folders from a user's that happen to have the same name. A
# complete checkpoint is recognised by its trainer_state.json.
TRAINER_MARK = ".ttt-trainer"
# The closed list of names a run writes in its output directory, besides checkpoint-N/ and milestone-N/, the
# hidden .X.partial/ and .X.previous/ of a save of X, and the tracker's folder (--report_to): it deletes, renames
# or overwrites nothing else there.
OWNED_NAMES = frozenset({LOCK_FILE, METRICS_FILE, METRICS_FILE + ".tmp", TRAINING_ARGS, SUMMARY_FILE, FINAL_MODEL,
                         BEST_MODEL, ABANDONED_DIR, TOKENIZER_DIR, "wandb"})
# Owned files that a fresh run with --overwrite_output_dir replaces (a run that stopped before its first save
# left them); everything else of an earlier run (checkpoints, models, abandoned/) is never replaced.
REPLACEABLE_FILES = (METRICS_FILE, METRICS_FILE + ".tmp", TRAINING_ARGS, SUMMARY_FILE)
SAVE_SIDE_NAME = re.compile(r"^\.(.+)\.(partial|previous)$")


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or corrupt: the message names the file."""


def partial_of(folder: Path) -> Path:
    """Where a save writes `folder` before renaming it into place."""
    return folder.with_name(f".{folder.name}.partial")


def read_best(output_dir: Path) -> tuple | None:
    """(step, eval_loss) of `output_dir`'s best_model, or None when there is none (or it is not complete)."""
    try:
        state = json.loads((Path(output_dir) / BEST_MODEL / TRAINER_STATE).read_text())
        return int(state["step"]), float(state["eval_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def order_checkpoints(items, kinds=("checkpoint", "milestone")) -> list:
    """(step, item) of the items (paths, or folder names in a bucket) named like a checkpoint of `kinds`, oldest
    first (at equal steps, the milestone first)."""
    found = []
    for item in items:
        match = CHECKPOINT_NAME.match(Path(item).name)
        if match and match.group(1) in kinds:
            found.append((int(match.group(2)), match.group(1) == "checkpoint", item))
    return [(step, item) for step, _, item in sorted(found)]


def list_checkpoints(output_dir: Path, kinds=("checkpoint", "milestone")) -> list:
    """(step, path) of the complete checkpoints in `output_dir`, oldest first."""
    folders = Path(output_dir).iterdir() if Path(output_dir).is_dir() else []
    # a link is never one of the run's checkpoints (pruning would delete through it): refused at start
    return order_checkpoints([path for path in folders if not path.is_symlink() and (path / TRAINER_STATE).is_file()],
                             kinds)


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    """`latest` is the highest step among `output_dir`'s checkpoints and milestones; anything else is a path."""
    return Path(spec) if spec != "latest" else newest(list_checkpoints(output_dir), output_dir)


def newest(found: list, where, why_not: str = ""):
    """What `latest` means: the last of the (step, folder) pairs `found` (a local or a bucket's listing, in step
    order), or the error that `where` holds none (`why_not`: what the listing leaves out)."""
    if not found:
        raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint-*/ or milestone-*/ "
                              f"folder in {where}{why_not}")
    return found[-1][1]


def tracker_folders(logging) -> tuple:
    """The folder TensorBoard writes in the output directory (Accelerate: project_dir / the project name);
    `logging`: ttt_train.config.LoggingArguments."""
    return (logging.wandb_project,) if logging.report_to in ("tensorboard", "all") else ()


def is_owned(name: str, extra=()) -> bool:
    """Whether `name` is one the trainer writes in an output directory (OWNED_NAMES, checkpoint-N, milestone-N,
    the save side-names of those, and `extra`: the tracker's folder)."""
    side = SAVE_SIDE_NAME.match(name)
    base = side.group(1) if side else name
    return bool(CHECKPOINT_NAME.match(base)) or base in OWNED_NAMES or base in extra


def is_trainers(folder: Path) -> bool:
    """A real folder (not a link) that this trainer wrote: its mark, or a complete save's trainer state."""
    return folder.is_dir() and not folder.is_symlink() and (
        (folder / TRAINER_MARK).is_file() or (folder / TRAINER_STATE).is_file())


def is_empty_partial(folder: Path) -> bool:
    """An empty real `.X.partial` folder: what a kill leaves between a save's mkdir and its mark (nothing in it to
    lose, so the start-up clean-up removes it like a marked one)."""
    return folder.name.endswith(".partial") and folder.is_dir() and not folder.is_symlink() \
        and not any(folder.iterdir())


def check_run_directory(output_dir: Path, fresh: bool, overwrite: bool = False, extra=(),
                        apply: bool = True) -> list:
    """What the output directory holds, against what the run may do there: nothing it would write through a link
    or over a folder of someone else's; for a fresh run, no earlier run's results, and no files it does not own
    (or, with `overwrite`, foreign files are left beside the run and, if `apply`, an earlier attempt's replaceable
    files are removed). Returns notes; raises one CheckpointError / UserError naming the entries. With `apply`
    False it only reads (train_ttt.py's check before any import)."""
    output_dir = Path(output_dir)
    entries = sorted(p for p in output_dir.iterdir() if p.name != LOCK_FILE) if output_dir.is_dir() else []
    owned = [p for p in entries if is_owned(p.name, extra)]
    links = [p.name for p in owned if p.is_symlink()]
    if links:
        raise CheckpointError(f"output_dir {output_dir}: {', '.join(links)} is a symbolic link; the trainer does "
                              f"not follow links in its run directory (a save, prune or clean-up would write or "
                              f"delete through it); move the link away")
    not_ours = [p.name for p in owned if p.is_dir() and (SAVE_SIDE_NAME.match(p.name) or CHECKPOINT_NAME.match(p.name))
                and not is_trainers(p) and not is_empty_partial(p)]
    if not_ours:
        raise CheckpointError(f"output_dir {output_dir} holds {', '.join(not_ours)} without {TRAINER_STATE} or "
                              f"the trainer's mark (not written, or not completely, by this trainer) under names "
                              f"a run saves to; move it elsewhere")
    if not fresh:
        return []
    results = [p.name for p in owned if CHECKPOINT_NAME.match(p.name) or p.name in (FINAL_MODEL, BEST_MODEL)]
    if results:
        raise UserError(f"output_dir {output_dir} already holds a run ({', '.join(results[:3])}); pass "
                        f"--resume_from_checkpoint latest to continue it, or choose another --output_dir")
    foreign = [p.name + "/" * p.is_dir() for p in entries if not is_owned(p.name, extra)]
    if foreign and not overwrite:
        raise UserError(f"output_dir {output_dir} holds files this trainer did not write ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty --output_dir, or pass "
                        f"--overwrite_output_dir to train beside them (they are left untouched)")
    leftovers = [p for p in owned if p.name in REPLACEABLE_FILES or p.name == TOKENIZER_DIR]
    if leftovers and not overwrite:
        names = ", ".join(p.name for p in leftovers)
        raise UserError(f"output_dir {output_dir} holds {names} of a run that saved no checkpoint (it stopped "
                        f"before its first save); pass --overwrite_output_dir to replace them, or choose another "
                        f"--output_dir")
    notes = []
    for path in leftovers:
        if path.is_dir() and not is_trainers(path):
            raise UserError(f"output_dir {output_dir}: {path.name}/ was not written by this trainer; a run would "
                            f"replace it (--train_tokenizer saves there): move it")
        if apply:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            notes.append(f"--overwrite_output_dir: removed {path.name}, left by a run that saved no checkpoint")
    return notes


def clean_interrupted_saves(output_dir: Path) -> list:
    """Folders a killed save of this trainer left behind: `.X.partial` (incomplete: the trainer's mark or state
    inside) is removed; `.X.previous` (the earlier complete X, moved aside while the new one was renamed in) is put
    back if X is missing, else removed. Only for names the trainer owns, never through a link, never a folder it
    did not write. Returns messages."""
    notes = []
    for path in sorted(Path(output_dir).glob(".*.previous")):
        if not is_owned(path.name) or path.is_symlink() or not (path / TRAINER_STATE).is_file():
            continue
        target = path.with_name(path.name[1:-len(".previous")])
        if target.exists() or target.is_symlink():
            shutil.rmtree(path)
        else:
            os.replace(path, target)
            notes.append(f"restored {target.name} from an interrupted save")
    for path in sorted(Path(output_dir).glob(".*.partial")):
        if is_owned(path.name) and (is_trainers(path) or is_empty_partial(path)):
            shutil.rmtree(path)
            notes.append(f"removed {path.name}, left by an interrupted save")
    return notes


def abandoned_names(step: int, checkpoints: list, names, best: tuple | None) -> list:
    """What a resume from `step` sets aside of a continuation that went further: its checkpoints and milestones
    after `step` (`checkpoints`: (step, name) in step order), the final model, and the best model when it is from
    after `step` (`best`: read_best's). `names`: the folders the directory (or bucket) holds."""
    later = [name for s, name in checkpoints if s > step]
    later += [FINAL_MODEL] * (FINAL_MODEL in names)
    later += [BEST_MODEL] * (best is not None and best[0] > step and BEST_MODEL in names)
    return later


def branch_from(output_dir: Path, step: int) -> Path | None:
    """Resuming from step `step` while the output directory holds later checkpoints or milestones (or a final
    model) of an abandoned continuation: those (abandoned_names) move to `abandoned/<time>/` (never deleted), so
    that `latest` and retention follow the new branch. Returns that folder, or None when nothing was later."""
    output_dir = Path(output_dir)
    names = {path.name for path in output_dir.iterdir()}
    later = abandoned_names(step, [(s, path.name) for s, path in list_checkpoints(output_dir)], names,
                            read_best(output_dir))
    if not later:
        return None
    destination = output_dir / ABANDONED_DIR / time.strftime("%Y%m%d-%H%M%S")
    destination.mkdir(parents=True, exist_ok=False)
    for name in later:
        os.replace(output_dir / name, destination / name)
    return destination


def prune_checkpoints(output_dir: Path, keep: int):
    """Deletes all but the newest `keep` checkpoint-* folders (milestones are never deleted). It runs right after
    a save, and a resumed run's later-step leftovers were moved aside (branch_from), so the newest are this run's
    and the checkpoint it resumed from goes only once a newer one of the run is complete."""
    for _, path in list_checkpoints(output_dir, kinds=("checkpoint",))[:-keep or None]:
        shutil.rmtree(path)


class RunLock:
    """Exclusive ownership of an output directory while a run (all its processes) works in it: an advisory lock
    (flock) on the directory itself, held by the main process, released by the kernel when the process ends, even
    by kill -9. A note `<output_dir>/.lock` says who holds it while it is held and is deleted on release, so a
    finished run leaves no lock file; a note found on acquiring is that of a holder that ended without releasing.
    (The lock is on the directory, not on the note: deleting a locked file would let a second trainer lock a new
    file of the same name while the first still holds the old one.)"""

    def __init__(self, output_dir: Path):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_FILE
        self.fd = None

    def acquire(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.in_use(self.holder()) from None
        self.fd = fd
        previous = self.holder(default="")
        self.path.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        # an empty note is what releases in order wrote before they deleted it: nothing to report
        return f"took over the lock of a trainer that ended without releasing it ({previous})" if previous else None

    def holder(self, default="another process") -> str:
        try:
            return self.path.read_text().strip() or default
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return default

    def in_use(self, holder: str) -> CheckpointError:
        return CheckpointError(f"output_dir {self.folder} is in use by a running trainer ({holder}); wait for it "
                               f"to finish, stop it, or choose another --output_dir")

    def check_free(self):
        """Only looks (creates nothing): the lock is not held by a running trainer, else its CheckpointError."""
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # no folder (or not one, or unreadable): nobody holds it; the caller reports the rest
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self.in_use(self.holder()) from None
        finally:
            os.close(fd)

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: no other trainer can be writing its own note
            os.close(self.fd)  # closing releases the flock
            self.fd = None
