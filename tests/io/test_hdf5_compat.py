"""Every kind of file mpiattn writes opens with the HDF5 1.10 found on clusters: Debian's
h5py 3.7 on HDF5 1.10 reads every object and attribute, and ``h5dump`` (``hdf5-tools``,
installed by CI) dumps it. The files are written with ``h5io.LIBVER``; with the h5py
wheel's HDF5 2.0 and ``libver="latest"`` both failed ("bad version number").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEBIAN_PYTHON = Path("/usr/bin/python3")

READ_ALL = """
import sys, h5py
def visit(name, obj):
    dict(obj.attrs)
    if isinstance(obj, h5py.Dataset):
        obj[()]
for path in sys.argv[1:]:
    with h5py.File(path, "r") as f:
        dict(f.attrs)
        f.visititems(visit)
    print("read", path, h5py.version.hdf5_version)
"""


def debian_h5py() -> bool:
    if not DEBIAN_PYTHON.exists():
        return False
    found = subprocess.run([str(DEBIAN_PYTHON), "-c", "import h5py"], capture_output=True,
                           env={"PATH": os.environ.get("PATH", "")})
    return found.returncode == 0


@pytest.fixture(scope="module")
def files(written_files) -> list[Path]:
    """One file of each kind (``conftest.written_files``)."""
    return list(written_files.values())


@pytest.mark.skipif(not debian_h5py(), reason="Debian's python3-h5py (HDF5 1.10) not installed")
def test_every_kind_of_file_reads_with_hdf5_1_10_h5py(files):
    done = subprocess.run([str(DEBIAN_PYTHON), "-c", READ_ALL, *map(str, files)],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("read ") == len(files)
    assert " 1.10." in done.stdout  # it really was an HDF5 1.10 library


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (hdf5-tools) not installed")
def test_every_kind_of_file_dumps_with_h5dump(files):
    for path in files:
        done = subprocess.run(["h5dump", "-H", "-A", str(path)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "error" not in done.stderr.lower(), (path,
                                                                            done.stderr)
