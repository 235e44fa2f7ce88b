"""MPI tests run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi`` for N = 2..5."""

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/conftest helpers


@pytest.fixture
def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def shared_dir(world):
    """One temporary folder that every rank sees (rank 0 makes it)."""
    path = tempfile.mkdtemp(prefix="mpiattn-test-") if world.Get_rank() == 0 else None
    return Path(world.bcast(path))


@pytest.fixture
def corpus_dir(world, shared_dir):
    """The first paragraphs of each corpus split, in the folder every rank sees."""
    root = Path(__file__).resolve().parents[2]
    if world.Get_rank() == 0:
        for name, lines in (("train.txt", 120), ("heldout.txt", 30)):
            text = (root / "data/corpus" / name).read_text(encoding="utf-8").splitlines()
            (shared_dir / name).write_text("\n".join(text[:lines]) + "\n", encoding="utf-8")
    world.Barrier()
    return shared_dir
