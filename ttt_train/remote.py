"""Cloud output directories (s3://, gs://, az://) through fsspec: a run works in a local staging folder and
uploads each checkpoint whole once it is saved; a folder counts in the bucket only once its upload completed (a
marker file written last), so `latest` never names an interrupted upload, and rotation deletes in the bucket too.

A bucket folder has one writer: a run claims it with a claim object (CLAIM: an owner id, host, process, start
time) before writing anything. A fresh run creates it with a conditional put (S3's If-None-Match; on stores
without one, a write read back), so a second fresh run is refused naming the first; a resume takes the claim
over; and every upload first checks that the claim is still this run's, so a run whose folder another run took
stops with one line instead of mixing their files.

Every remote operation has a bound: the backend's connect/read timeouts are TTT_REMOTE_TIMEOUT seconds (default
60) with few retries, and the operation as a whole is abandoned after operation_deadline() (3 timeouts, plus one
per 100 MiB it moves): a stalled endpoint is one error line, the local staging copy intact.

Credentials and endpoints are the backends' own (s3fs: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
profiles; gcsfs: application default credentials; adlfs: AZURE_STORAGE_* variables). The staging folder is
$TTT_STAGING_DIR, else ~/.cache/ttt-lm/staging, one subfolder per URL.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from ttt_train.cli import UserError
from ttt_train.rundir import order_checkpoints

BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
COMPLETE = ".upload-complete"  # written last into an uploaded folder
CLAIM = ".run-claim.json"  # the run that writes the folder (see the module's docstring)
RETRIES = 3  # attempts of a remote operation (the backend's own retry loop)


def remote_timeout() -> float:
    """Seconds of silence after which one attempt of a remote operation is given up (TTT_REMOTE_TIMEOUT)."""
    try:
        value = float(os.environ.get("TTT_REMOTE_TIMEOUT", "60"))
    except ValueError:
        raise RemoteError(f"TTT_REMOTE_TIMEOUT={os.environ['TTT_REMOTE_TIMEOUT']} is not a number of seconds") from None
    if not value > 0:
        raise RemoteError(f"TTT_REMOTE_TIMEOUT must be positive, got {value}")
    return value


def operation_deadline(size: int = 0) -> float:
    """The most one remote operation may take: RETRIES timeouts, and one more per 100 MiB it moves."""
    return remote_timeout() * (RETRIES + size / (100 * 2**20))


def backend_options(scheme: str) -> dict:
    """The bounded timeouts and retries, in the backend's own options (s3fs; the others keep their defaults)."""
    if BACKENDS.get(scheme) != "s3fs":
        return {}
    timeout = remote_timeout()
    return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                              "retries": {"max_attempts": 1, "mode": "standard"}}}


class RemoteError(UserError):
    """A bucket that cannot be reached, read or written: the message names the URL and the reason."""


def is_remote(path) -> bool:
    return isinstance(path, str) and re.match(r"^[a-z][a-z0-9+.-]*://", path) is not None


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]


def staging_root() -> Path:
    return Path(os.environ.get("TTT_STAGING_DIR", Path.home() / ".cache" / "ttt-lm" / "staging"))


class RemoteDir:
    """A folder in a bucket, and the local staging folder that mirrors what a run needs of it."""

    def __init__(self, url: str):
        scheme, _, rest = url.partition("://")
        self.url = f"{scheme}://{rest.rstrip('/')}"
        backend = BACKENDS.get(scheme)
        if backend is None:
            raise RemoteError(f"{url}: unsupported storage scheme {scheme}:// (s3://, gs://, az:// are)")
        if not rest.strip("/"):
            raise RemoteError(f"{url} names no bucket: give {scheme}://BUCKET/FOLDER")
        try:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **backend_options(scheme))
            if backend == "s3fs":
                self.fs.retries = RETRIES  # s3fs's own retry loop (a class setting of 5)
        except ImportError as error:
            raise RemoteError(f"{url} needs fsspec and {backend}: pip install fsspec {backend}") from error
        except Exception as error:  # a backend's configuration errors
            raise RemoteError(f"cannot open {url}: {_reason(error)}") from error
        self.staging = staging_root() / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.owner = None  # this run's claim, once claimed
        self.wrote = False  # whether this run uploaded anything (a fresh run that wrote nothing gives its claim back)

    def _call(self, what: str, action, *args, size: int = 0, **kwargs):
        """action(*args, **kwargs) within operation_deadline(size); any failure is one RemoteError. A call past
        its deadline is abandoned (its thread is left to the backend's own timeouts; the process may exit)."""
        outcome = {}

        def work():
            try:
                outcome["value"] = action(*args, **kwargs)
            except BaseException as error:  # noqa: B036 (handed to the caller's thread)
                outcome["error"] = error

        deadline = operation_deadline(size)
        worker = threading.Thread(target=work, daemon=True, name=f"remote {what}")
        worker.start()
        worker.join(deadline)
        if worker.is_alive():
            raise RemoteError(f"cannot {what} {self.url}: no answer within {deadline:.0f} s (TTT_REMOTE_TIMEOUT="
                              f"{remote_timeout():g} s per attempt, {RETRIES} attempts); the endpoint stalled or "
                              f"is unreachable; the local copy is in {self.staging}")
        error = outcome.get("error")
        if isinstance(error, RemoteError):
            raise error
        if error is not None:  # OSError, botocore's, gcsfs's, adlfs's: all mean the bucket refused or is away
            raise RemoteError(f"cannot {what} {self.url}: {_reason(error)}") from error
        return outcome.get("value")

    # ------------------------------------------------------------------------------------------------------------
    # One writer: the claim

    def read_claim(self) -> dict | None:
        """The claim in the bucket folder, or None when there is none."""
        def read():
            try:
                return self.fs.cat_file(self.path(CLAIM))
            except FileNotFoundError:
                return None

        raw = self._call("read the claim of", read)
        if raw is None:
            return None
        try:
            claim = json.loads(raw)
            return claim if isinstance(claim, dict) else {"owner": "unreadable"}
        except (ValueError, UnicodeDecodeError):
            return {"owner": "unreadable"}

    @staticmethod
    def describe_claim(claim: dict) -> str:
        return (f"run {claim.get('owner')} (pid {claim.get('pid')} on {claim.get('host')}, started "
                f"{claim.get('started')})")

    def claim(self, fresh: bool) -> str | None:
        """Makes this run the folder's one writer before anything is written there. Fresh: the claim must not
        exist (created atomically where the store can); resume: an earlier run's claim is taken over. Returns a
        note when a claim was taken over."""
        claim = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        data = json.dumps(claim).encode()
        previous = self.read_claim()
        if fresh:
            if previous is not None:
                raise RemoteError(self._claimed_message(previous))
            self._create(data, claim)
        else:
            self._call("claim", self.fs.pipe, self.path(CLAIM), data)
        self.owner = claim["owner"]
        self.check_owner(writing=False)
        if previous is not None and not fresh:
            return f"took over the claim of {self.describe_claim(previous)}"
        return None

    def _create(self, data: bytes, claim: dict):
        """Writes the claim only if none exists: S3's conditional put, else a write read back after a pause."""
        if BACKENDS.get(self.url.split("://", 1)[0]) == "s3fs":
            def create():
                try:
                    self.fs.pipe_file(self.path(CLAIM), data, mode="create")
                    return None
                except FileExistsError:  # s3fs's name for S3's 412 PreconditionFailed: another run created it first
                    return self.read_claim() or {"owner": "unknown"}

            other = self._call("claim", create)
            if other is not None:
                raise RemoteError(self._claimed_message(other))
            return
        self._call("claim", self.fs.pipe, self.path(CLAIM), data)
        time.sleep(1.0)  # a second writer's claim lands within this; the read below sees the last one
        current = self.read_claim() or {}
        if current.get("owner") != claim["owner"]:
            raise RemoteError(self._claimed_message(current))

    def _claimed_message(self, claim: dict) -> str:
        return (f"output_dir {self.url} is claimed by {self.describe_claim(claim)}; one run writes a bucket folder "
                f"at a time: choose another --output_dir, pass --resume_from_checkpoint latest to continue that run "
                f"(taking it over), or, if no run will write there again, delete {self.url}/{CLAIM}")

    def release_if_unused(self, fresh: bool):
        """A fresh run that stopped before uploading anything (bad input, a failed start) deletes its claim, so
        that the next attempt is not refused; a run that wrote there keeps it."""
        if fresh and self.owner is not None and not self.wrote:
            current = self.read_claim()
            if current is not None and current.get("owner") == self.owner:
                self._call("give back the claim of", self.fs.rm, self.path(CLAIM))
            self.owner = None

    def check_owner(self, writing: bool = True):
        """Before every write: the claim is still this run's (a resume elsewhere takes it over)."""
        if self.owner is None:
            return
        self.wrote = self.wrote or writing
        current = self.read_claim()
        if current is None or current.get("owner") != self.owner:
            who = self.describe_claim(current) if current else "nobody (the claim was deleted)"
            raise RemoteError(f"output_dir {self.url} is now claimed by {who}, not this run; this run stops "
                              f"without writing there again (its local copy is in {self.staging})")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def check_writable(self):
        """Write and delete a probe: an unreachable, missing or unauthorised bucket fails here, before training."""
        probe = self.path(f".probe-{os.getpid()}")
        self._call("write to", self.fs.pipe, probe, b"probe")
        self._call("write to", self.fs.rm, probe)

    def complete_folders(self) -> list:
        """Names of the subfolders whose upload completed."""
        self.fs.invalidate_cache()

        def listing():
            try:
                return self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []

        entries = self._call("list", listing)
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
        return sorted(name for name in names if self._call("read", self.fs.exists, self.path(f"{name}/{COMPLETE}")))

    def checkpoints(self) -> list:
        """(step, name) of the complete checkpoint-/milestone- folders, oldest first."""
        return order_checkpoints(self.complete_folders())

    def upload_folder(self, local: Path, name: str):
        """`local` as `name`: the old marker and folder go first, the new marker last."""
        self.check_owner()
        target = self.path(name)
        if self._call("read", self.fs.exists, target):
            self._call("replace in", self.fs.rm, target, recursive=True)
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            self._call("upload to", self.fs.put_file, str(path), f"{target}/{path.relative_to(local).as_posix()}",
                       size=path.stat().st_size)
        self._call("upload to", self.fs.pipe, f"{target}/{COMPLETE}", b"")

    def upload_file(self, local: Path, name: str):
        if Path(local).is_file():
            self.check_owner()
            self._call("upload to", self.fs.put_file, str(local), self.path(name), size=Path(local).stat().st_size)

    def download(self, name: str, local: Path):
        """A remote file or folder to `local` (replaced)."""
        source = self.path(name)
        if not self._call("read", self.fs.exists, source):
            raise RemoteError(f"{self.url}/{name} does not exist")
        if Path(local).exists():
            shutil.rmtree(local) if Path(local).is_dir() else Path(local).unlink()
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if self._call("read", self.fs.isdir, source):
            self._call("download from", self.fs.get, source, str(local), recursive=True)
            (Path(local) / COMPLETE).unlink(missing_ok=True)
        else:
            self._call("download from", self.fs.get_file, source, str(local))

    def remove(self, name: str):
        self.check_owner()
        self._call("delete in", self.fs.rm, self.path(name), recursive=True)

    def move(self, name: str, to: str):
        """The folder `name` to `to`, file by file: every file copied first, then the original goes, its upload
        marker first (a move cut short leaves the original complete, or no longer listed, and never loses a file).
        (fsspec's recursive mv copies the folders' own keys too, which S3 does not have: NoSuchKey.)"""
        self.check_owner()
        source, target = self.path(name), self.path(to)
        files = self._call("list", self.fs.find, source)
        for file in files:
            self._call("move in", self.fs.copy, file, f"{target}/{file[len(source) + 1:]}")
        if f"{source}/{COMPLETE}" in files:
            self._call("move in", self.fs.rm, f"{source}/{COMPLETE}")
        self._call("move in", self.fs.rm, source, recursive=True)

    def prune(self, keep: int):
        """All but the newest `keep` complete checkpoint-* folders (milestones stay), in the bucket."""
        ordinary = order_checkpoints(self.complete_folders(), kinds=("checkpoint",))
        for _, name in ordinary[:-keep or None]:
            self.remove(name)


def download_model(url: str) -> str:
    """A model folder in a bucket (--init_from) as a local folder (cached by URL, refreshed each time)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    remote = RemoteDir(parent)
    local = staging_root() / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    remote.download(name, local)
    return str(local)
