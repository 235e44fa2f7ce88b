"""Module boundaries that keep the project easy to change: the math never imports MPI.

Each math module is imported, and a layer computed, in a fresh interpreter where
``import mpi4py`` fails: the sharded model, its backward and the reference run in one
process with the reduction passed in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ["attention", "ops", "model", "mlm", "reference", "checksum", "shard", "optim", "balance",
        "hf", "grid", "corpus", "headstats", "seqattn"]

NO_MPI = """
import sys

class NoMPI:
    def find_spec(self, name, path=None, target=None):
        if name == "mpi4py" or name.startswith("mpi4py."):
            raise ImportError("mpi4py is blocked: math modules must not import MPI")

sys.meta_path.insert(0, NoMPI())
"""

USE = """
import numpy as np
from mpiattn import config, model, reference
from mpiattn.shard import head_shard
from mpiattn.weights import open_source

cfg = config.from_dict({"model.layers": 1, "model.heads": 2, "model.hidden": 8,
                        "model.ffn": 16, "model.vocab": 20, "input.batch": 1,
                        "input.seq_len": 4, "dtype": "float64"})
m = cfg.model
source = open_source(0, m, np.float64)
shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
ids, mask = np.array([[1, 2, 3, 0]]), np.array([[True, True, True, False]])
hidden = model.encoder_forward(ids, mask, source.embeddings(), [source.layer(0, shard)],
                               model.LocalReduce(np), m.layer_norm_eps)
_, want = reference.forward(ids, mask, source, m)
assert np.abs(hidden - want[-1]).max() < 1e-12
assert "mpi4py" not in sys.modules
print("ok")
"""


@pytest.mark.parametrize("module", MATH)
def test_math_module_imports_without_mpi(module):
    code = NO_MPI + f"import mpiattn.{module}\nassert 'mpi4py' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_model_runs_in_one_process_with_mpi_unimportable():
    done = subprocess.run([sys.executable, "-c", NO_MPI + USE], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
