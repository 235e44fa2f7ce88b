"""Package boundaries that keep the project easy to change.

- The packages are layers (``pyproject.toml``, ``[tool.importlinter]``): commands >
  analysis > inputs > io > parallel > core, checked by import-linter on the real imports.
- No module is part of an import circle (grimp's graph, function-level imports included,
  ``TYPE_CHECKING`` imports not).
- Every Python module under ``core/`` (found by walking the folder, not from a list; the
  compiled kernels are a C library that imports nothing) imports in a
  fresh interpreter where ``import mpi4py`` and ``import h5py`` fail, and the sharded
  model, its reference and a layer run there with the reduction passed in.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(f"mpiattn.core.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "mpiattn/core")])
              if (ROOT / "mpiattn/core" / f"{m.name}.py").is_file())  # not the C library
PACKAGES = ("core", "parallel", "inputs", "io", "commands", "analysis")

BLOCKED = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mpi4py", "h5py"):
            raise ImportError(f"{name} is blocked: the math imports neither MPI nor HDF5")

sys.meta_path.insert(0, Blocked())
"""

USE = """
import numpy as np
from mpiattn import config
from mpiattn.core import model, reference
from mpiattn.core.shard import head_shard
from mpiattn.io.weights import open_source

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
assert "mpi4py" not in sys.modules and "h5py" not in sys.modules
print("ok")
"""


def test_the_walk_finds_the_core():
    assert len(CORE) >= 10 and "mpiattn.core.model" in CORE


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_without_mpi_or_hdf5(module):
    code = BLOCKED + f"import {module}\nassert 'mpi4py' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_model_runs_in_one_process_with_mpi_and_hdf5_unimportable():
    done = subprocess.run([sys.executable, "-c", BLOCKED + USE], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_every_module_lives_in_a_package():
    """Only the entry points and the shared vocabulary stay at the top."""
    top = {p.stem for p in (ROOT / "mpiattn").glob("*.py")}
    assert top == {"__init__", "__main__", "config", "errors", "version"}
    for package in PACKAGES:
        assert (ROOT / "mpiattn" / package / "__init__.py").is_file()


def test_the_layer_contracts_hold():
    pytest.importorskip("importlinter")
    done = subprocess.run([sys.executable, "-c",
                           "import sys; from importlinter.cli import lint_imports;"
                           "sys.exit(lint_imports(config_filename='pyproject.toml'))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in graph.modules or not w.startswith("mpiattn"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module.startswith("mpiattn") and module not in index:
            visit(module)
    return found


def test_no_import_circles():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("mpiattn", exclude_type_checking_imports=True)
    assert len([m for m in graph.modules if m.startswith("mpiattn.")]) > 40
    assert _cycles(graph) == []
