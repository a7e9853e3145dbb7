import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


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
