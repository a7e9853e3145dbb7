import os
import socket
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton's interpreter runs the kernels of ttt_kernels.py on CPU tensors (test_triton_kernels.py).
# It must be chosen before Triton is first imported; the model still dispatches to the kernels only on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent  # on sys.path through pyproject.toml's [tool.pytest] pythonpath
SHARED = ROOT.parent / "shared"


def shared_path(relative: str) -> Path:
    """A file of ../shared, or a skip: that folder exists only beside the developers' checkout, not in a clone."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared exists only beside the developers' checkout)")
    return path


@pytest.fixture
def shakespeare():
    return shared_path("data/tinyshakespeare.txt")


@pytest.fixture
def llama_tokenizer_dir():
    return shared_path("data/llama2_tokenizer")



@pytest.fixture
def connections(monkeypatch):
    """The (host, port) of every TCP connection the code under test opens (or tries to) in this process, through
    socket.create_connection, which the Hub libraries' HTTP clients and the Hub check use."""
    opened, create = [], socket.create_connection

    def counting(address, *args, **kwargs):
        opened.append(tuple(address[:2]))
        return create(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counting)
    return opened


def fingerprint(folder: Path) -> list:
    """Every file under `folder` with its size and modification time."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """trained_run(model_type="ttt"): the folder of a tiny run of 4 steps on the built-in corpus (helpers.FAST;
    checkpoint-2, checkpoint-4, final_model, metrics), trained once per session and shared by every test that
    reads one. A test that changes a run works on a copy: a shared run found changed fails the session."""
    import train_ttt
    from helpers import FAST

    runs = {}

    def get(model_type: str = "ttt") -> Path:
        if model_type not in runs:
            folder = tmp_path_factory.mktemp("trained") / model_type
            train_ttt.main([*FAST, "--model_type", model_type, "--output_dir", str(folder), "--max_train_steps", "4",
                            "--save_checkpoint_freq", "2"])
            runs[model_type] = (folder, fingerprint(folder))
        return runs[model_type][0]

    yield get
    changed = [model_type for model_type, (folder, files) in runs.items() if fingerprint(folder) != files]
    assert not changed, f"a test changed the shared trained run(s) {changed}; change a copy"
