"""Local path or Hugging Face Hub id: which a name is, and a fast, clear failure when the Hub cannot be reached.

A name is local when it exists, or when it cannot be a Hub id: it starts with `.`, `/` or `~`, ends in a data
file suffix, has more than one `/` (Hub ids are `name` or `namespace/name`), or its first component is a folder
here (`outputs/nope` where `outputs/` exists). A missing local path is reported at once instead of being looked
up on the Hub. A Hub look-up without a network would otherwise retry for 30 to 60 s; it is refused after one
quick connection attempt, naming HF_HUB_OFFLINE=1 (which makes the Hub libraries read only their local cache).
"""

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ttt_train.cli import UserError

DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".arrow", ".safetensors", ".bin")
CONNECT_TIMEOUT = 3.0  # seconds: a reachable Hub answers well within it


class HubError(UserError):
    """A name that is neither an existing local path nor a reachable Hub id; the message says which and why."""


def looks_local(name: str) -> bool:
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or path.suffix.lower() in DATA_SUFFIXES:
        return True
    parts = name.strip("/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    """The Hub's URL: HF_ENDPOINT (a mirror, or a test's loopback server), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.cache
def hub_unreachable_reason() -> str | None:
    """None when a TCP connection to the Hub endpoint opens within CONNECT_TIMEOUT, else why not."""
    url = urlparse(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT).close()
        return None
    except OSError as error:
        return f"{url.hostname}:{port} cannot be reached ({error.strerror or error})"


ALTERNATIVES = {  # what a user without the Hub can give instead, per kind of name
    "dataset": "a local file or folder (--dataset_name my_corpus.txt), or builtin:synthetic",
    "tokenizer": "a local tokenizer folder, builtin:bytes, or --train_tokenizer",
    "model": "a local model folder (a final_model/ or a converted checkpoint)",
}


def cache_dir() -> Path:
    """Where the Hub libraries keep what they downloaded (their own rule, without importing them)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def alternatives(what: str) -> str:
    kind = next((k for k in ALTERNATIVES if k in what), "model")
    return f"give {ALTERNATIVES[kind]} instead (README: 'Data without a network')"


def offline_miss(what: str, name: str) -> HubError:
    """A Hub id under HF_HUB_OFFLINE=1 that the local cache cannot serve: what is missing and what to do."""
    return HubError(f"{what} {name!r} is not in the local Hub cache ({cache_dir()}) and HF_HUB_OFFLINE=1 forbids "
                    f"downloading it: download it once where there is a network (the cache is reused), or "
                    f"{alternatives(what)}")


def resolve(name: str, what: str) -> str:
    """`name` if it is an existing local path or a Hub id the Hub libraries may load (online, or offline from
    their cache under HF_HUB_OFFLINE=1); otherwise a HubError naming `what` (e.g. "dataset") and the problem."""
    if Path(name).expanduser().exists():
        return name
    if looks_local(name):
        raise HubError(f"{what} path {name} does not exist")
    if not offline():
        reason = hub_unreachable_reason()
        if reason:
            raise HubError(f"{what} {name!r} is not a local path, and the Hugging Face Hub is unreachable: {reason}; "
                           f"if it was downloaded before, set HF_HUB_OFFLINE=1 to load it from the local Hub cache "
                           f"({cache_dir()}); otherwise {alternatives(what)}")
    return name
