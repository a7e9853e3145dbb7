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
