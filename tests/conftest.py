import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shakespeare():
    path = SHARED / "data" / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder exists only beside the developers' checkout)")
    return path


@pytest.fixture
def llama_tokenizer_dir():
    path = SHARED / "data" / "llama2_tokenizer"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder exists only beside the developers' checkout)")
    return path
