"""Parallel HDF5 (mpio) and mpi4py 3.1, against Debian's h5py-mpi + Open MPI.

CI (as root) installs python3-h5py-mpi, python3-mpi4py (3.1), openmpi-bin and makes a venv
with the system site packages; MPIATTN_PHDF5_VENV points to it. Elsewhere these tests skip.
"""

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest
from helpers import dim_names

from mpiattn import config
from mpiattn.core import reference
from mpiattn.inputs.data import load_batch
from mpiattn.io.verify import verify
from mpiattn.io.weights import open_source

VENV = os.environ.get("MPIATTN_PHDF5_VENV", "")
MPIRUN = shutil.which("mpirun", path="/usr/bin")  # Open MPI's, not the MPICH wheel's
pytestmark = pytest.mark.skipif(
    not VENV or MPIRUN is None,
    reason="set MPIATTN_PHDF5_VENV to a venv with MPI-enabled h5py (see .ci/run)")

SETS = {"model.layers": 2, "model.hidden": 64, "model.heads": 4, "model.ffn": 128,
        "model.vocab": 300, "input.batch": 5, "input.seq_len": 16, "dtype": "float64"}


def mpirun(ranks, tmp_path, **extra):
    args = []
    for key, value in {**SETS, **extra}.items():
        args += ["--set", f"{key}={value}" if not isinstance(value, str) else
                 f'{key}="{value}"']
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    env.pop("VIRTUAL_ENV", None)
    python = str(Path(VENV) / "bin" / "python")
    done = subprocess.run([MPIRUN, "--oversubscribe", "-n", str(ranks), python, "-m",
                           "mpiattn.commands.cli", "run", *args, "-o", "out.h5"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return tmp_path / "out.h5"


def reference_error(path):
    cfg = config.from_dict(SETS)
    batch = load_batch(cfg)
    _, hidden = reference.forward(batch.ids, batch.mask,
                                  open_source(cfg.seed, cfg.model, cfg.dtype), cfg.model)
    with h5py.File(path) as f:
        return max(reference.relative_error(f[f"layers/{i:02d}/hidden"][()], hidden[i])
                   for i in range(cfg.model.layers))


def test_replicas_write_one_file_collectively(tmp_path):
    path = mpirun(2, tmp_path, **{"parallel.tensor": 1})
    with h5py.File(path) as f:
        assert f.attrs["write_mode"] == "mpio, 2 writers"
        assert f.attrs["data_parallel"] == 2
        assert "Open MPI" in f.attrs["mpi_library"]
        assert dim_names(f["layers/01/hidden"]) == ["batch", "seq", "hidden_unit"]
    assert verify(path) == []
    assert reference_error(path) <= 1e-12


def test_head_parallel_under_mpi4py_31(tmp_path):
    path = mpirun(2, tmp_path)  # one head group: checked Allreduce, gathered write
    with h5py.File(path) as f:
        assert f.attrs["tensor_parallel"] == 2
        assert f.attrs["write_mode"] == "gathered to rank 0"
        assert f["checksum/collectives"][()]["passed"].all()
    assert verify(path) == []
    assert reference_error(path) <= 1e-12
