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
