"""The one owner of a run's output directory, local or in a bucket (staged in a local folder, each saved folder
uploaded whole): it claims the directory (the lock; a bucket's claim), finds the checkpoint a resume starts from,
sets aside an abandoned continuation, uploads and rotates checkpoints, and lets go at the end. The names, listings
and checks it works with are those of ttt_train/rundir.py (a leaf module: train_ttt.py checks a folder with it
before importing torch).

Its methods that read or change the directory are the main process's; the trainer hands their outcome to every
process (ttt_train.distributed.main_decides).
"""

import shutil
import time
from pathlib import Path

from ttt_train import rundir
from ttt_train.cli import UserError
from ttt_train.remote import RemoteDir, is_remote
from ttt_train.rundir import METRICS_FILE, TRAINING_ARGS

# What a bucket receives beside each saved folder, so that the bucket alone resumes and describes the run.
RUN_FILES = (METRICS_FILE, TRAINING_ARGS)


class RunDirectory:
    """`output_dir`: a folder, or s3:// gs:// az:// (then `path` is its local staging folder and `remote` the
    bucket). `where` names it in messages."""

    def __init__(self, output_dir: str):
        self.remote = RemoteDir(output_dir) if is_remote(output_dir) else None
        self.path = self.remote.staging if self.remote else Path(output_dir)
        self.where = self.remote.url if self.remote else self.path
        self.lock = rundir.RunLock(self.path)
        self.created = not self.path.exists()

    # ------------------------------------------------------------------------------------------------ claiming

    def stage(self, resume: str | None) -> str | None:
        """A bucket: the local staging folder made afresh with what the run needs of it (the checkpoint `resume`
        names, metrics.jsonl, the best model's score), after checking that the bucket is writable and the run's
        to take (a fresh run into a bucket that holds one is refused). Returns the local copy of the checkpoint
        (None: a fresh run). A local directory needs no staging: `resume` as given."""
        remote = self.remote
        if remote is None:
            return resume
        remote.check_writable()
        if self.path.exists():  # another trainer staging the same URL on this machine holds its lock: refused here
            probe = rundir.RunLock(self.path)
            probe.acquire()
            probe.release()
        shutil.rmtree(self.path, ignore_errors=True)  # a cache of the bucket, never the only copy of anything
        self.path.mkdir(parents=True)
        checkpoints, folders = remote.checkpoints(), remote.complete_folders()
        if not resume:
            if checkpoints or rundir.FINAL_MODEL in folders:
                raise UserError(f"output_dir {remote.url} already holds a run (checkpoints or final_model); pass "
                                f"--resume_from_checkpoint latest to continue it, or choose another --output_dir")
            remote.claim(fresh=True)
            return None
        if resume == "latest":
            name = rundir.newest(checkpoints, remote.url, " (uploads that did not complete do not count)")
        elif resume.startswith(remote.url + "/"):
            name = resume[len(remote.url) + 1:].strip("/")
            if name not in folders:
                raise rundir.CheckpointError(f"{resume} is not a complete checkpoint (missing, or its upload did "
                                             f"not complete)")
        else:
            raise UserError(f"--resume_from_checkpoint {resume}: with --output_dir {remote.url}, give 'latest' or "
                            f"a checkpoint under it")
        note = remote.claim(fresh=False)
        if note:
            print(f"{remote.url}: {note}")
        remote.download(name, self.path / name)
        if remote._call("read", remote.fs.exists, remote.path(METRICS_FILE)):
            remote.download(METRICS_FILE, self.path / METRICS_FILE)
        if rundir.BEST_MODEL in folders:  # its score, for --save_best's comparisons (the weights stay in the bucket)
            best_state = f"{rundir.BEST_MODEL}/{rundir.TRAINER_STATE}"
            remote.download(best_state, self.path / best_state)
        return str(self.path / name)

    def claim(self, resume: str | None, overwrite: bool, extra=()) -> tuple:
        """Takes the lock, restores what a killed save left, and checks what the directory holds against what was
        asked: a fresh run (`resume` None; `overwrite`: --overwrite_output_dir; `extra`: the tracker's folder), or
        a resume from `resume` ('latest' or a checkpoint folder). Returns (notes, the checkpoint folder or None)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output_dir {self.path} is a file, not a folder")
        try:
            taken_over = self.lock.acquire()
        except OSError as error:
            raise UserError(f"cannot write to output_dir {self.path}: {error.strerror or error}") from error
        notes = [taken_over] * bool(taken_over) + rundir.clean_interrupted_saves(self.path)
        notes += rundir.check_run_directory(self.path, fresh=not resume, overwrite=overwrite, extra=extra)
        return notes, rundir.resolve_checkpoint(resume, self.path) if resume else None

    def branch_from(self, step: int) -> list:
        """Resuming from `step` where a continuation went further: its later checkpoints, milestones, final (and
        best) model move to abandoned/<time>/ (never deleted; a copy of metrics.jsonl goes with them, whose lines
        after `step` the run then drops), locally and in the bucket, so that `latest` and rotation follow the new
        branch. Returns notes."""
        notes = []
        best = rundir.read_best(self.path)  # a bucket's best model is staged as its score: read before it moves
        abandoned = rundir.branch_from(self.path, step)
        if abandoned:
            if (self.path / METRICS_FILE).is_file():
                shutil.copy2(self.path / METRICS_FILE, abandoned / METRICS_FILE)
            notes.append(f"resuming from step {step}: the later checkpoints of the abandoned continuation (and a "
                         f"copy of metrics.jsonl) moved to {abandoned}")
        if self.remote:
            folders = self.remote.complete_folders()
            later = rundir.abandoned_names(step, rundir.order_checkpoints(folders), folders, best)
            destination = f"{rundir.ABANDONED_DIR}/{time.strftime('%Y%m%d-%H%M%S')}"
            for name in later:
                self.remote.move(name, f"{destination}/{name}")
            if later:
                notes.append(f"resuming from step {step}: {', '.join(later)} of the abandoned continuation moved to "
                             f"{self.remote.url}/{destination}")
        return notes

    # ----------------------------------------------------------------------------------------------- saving

    def saved(self, folder: str):
        """`folder` (a checkpoint or model) was saved in the local directory: a bucket receives it whole, with the
        run's files beside it."""
        if self.remote:
            self.remote.upload_folder(self.path / folder, folder)
            self.upload(*RUN_FILES)

    def upload(self, *names: str):
        """The run's files `names` to the bucket (nothing for a local directory)."""
        if self.remote:
            for name in names:
                self.remote.upload_file(self.path / name, name)

    def rotate(self, keep: int):
        """Keeps the newest `keep` checkpoint-<step>/ folders, locally and in the bucket (milestones stay)."""
        rundir.prune_checkpoints(self.path, keep)
        if self.remote:
            self.remote.prune(keep)

    # ----------------------------------------------------------------------------------------------- letting go

    def release(self, fresh: bool, main_process: bool):
        """The end of the run, however it ended: the lock goes; a fresh run that wrote nothing gives back its
        bucket's claim and leaves no empty folder behind."""
        self.lock.release()
        if not main_process:
            return
        if self.remote:
            try:
                self.remote.release_if_unused(fresh)
            except UserError as error:  # the run's own outcome (or error) is what the user must see
                print(f"note: {error}")
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # a run that stopped on bad input leaves no folder behind
