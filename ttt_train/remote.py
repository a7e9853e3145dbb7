"""Cloud output directories (s3://, gs://, az://) through fsspec: a run works in a local staging folder and
uploads each checkpoint whole once it is saved; a folder counts in the bucket only once its upload completed (a
marker file written last), so `latest` never names an interrupted upload, and rotation deletes in the bucket too.

Credentials and endpoints are the backends' own (s3fs: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
profiles; gcsfs: application default credentials; adlfs: AZURE_STORAGE_* variables). The staging folder is
$TTT_STAGING_DIR, else ~/.cache/ttt-lm/staging, one subfolder per URL.
"""

import hashlib
import os
import re
import shutil
from pathlib import Path

from ttt_train.checkpoint import order_checkpoints
from ttt_train.cli import UserError

BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
COMPLETE = ".upload-complete"  # written last into an uploaded folder


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

            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except ImportError as error:
            raise RemoteError(f"{url} needs fsspec and {backend}: pip install fsspec {backend}") from error
        except Exception as error:  # a backend's configuration errors
            raise RemoteError(f"cannot open {url}: {_reason(error)}") from error
        self.staging = staging_root() / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def _call(self, what: str, action, *args, **kwargs):
        try:
            return action(*args, **kwargs)
        except Exception as error:  # OSError, botocore's, gcsfs's, adlfs's: all mean the bucket refused or is away
            raise RemoteError(f"cannot {what} {self.url}: {_reason(error)}") from error

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
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        except Exception as error:
            raise RemoteError(f"cannot list {self.url}: {_reason(error)}") from error
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
        return sorted(name for name in names if self._call("read", self.fs.exists, self.path(f"{name}/{COMPLETE}")))

    def checkpoints(self) -> list:
        """(step, name) of the complete checkpoint-/milestone- folders, oldest first."""
        return order_checkpoints(self.complete_folders())

    def upload_folder(self, local: Path, name: str):
        """`local` as `name`: the old marker and folder go first, the new marker last."""
        target = self.path(name)
        if self.fs.exists(target):
            self._call("replace in", self.fs.rm, target, recursive=True)
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            self._call("upload to", self.fs.put_file, str(path), f"{target}/{path.relative_to(local).as_posix()}")
        self._call("upload to", self.fs.pipe, f"{target}/{COMPLETE}", b"")

    def upload_file(self, local: Path, name: str):
        if Path(local).is_file():
            self._call("upload to", self.fs.put_file, str(local), self.path(name))

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
        self._call("delete in", self.fs.rm, self.path(name), recursive=True)

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
