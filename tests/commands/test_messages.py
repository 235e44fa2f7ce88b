"""Messages a user acts on (issue #11): world-size advice that works, one line when MPI
cannot load, quiet exits into a closed pipe, BLAS threads from the environment."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_cli import TINY_SET

from mpiattn import config
from mpiattn.core.backend import oversubscription, usable_cores
from mpiattn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# --- check_world names values that pass check_world ------------------------------------

FIX = re.compile(r"(run on (\d+) ranks|set input\.batch = (\d+)|set model\.heads = (\d+))"
                 r" \(parallel\.tensor = (\d+)\)")


def world_cfg(tensor: int, heads: int, batch: int, **more: object) -> config.Config:
    return config.from_dict({"parallel.tensor": tensor, "model.heads": heads,
                             "model.hidden": heads * 4, "model.ffn": heads * 4,
                             "input.batch": batch, **more})


def fits(world: int, tensor: int, heads: int, batch: int, seeded: bool = True) -> bool:
    """The rule, independently: tensor divides the world, <= heads, replicas <= batch."""
    return world % tensor == 0 and tensor <= heads and (not seeded or world // tensor <= batch)


def passes(cfg: config.Config, world: int) -> bool:
    try:
        config.check_world(cfg, world)
    except ConfigError:
        return False
    return True


def named_tensors(message: str) -> list[int]:
    """The values after 'use parallel.tensor = ' ('1, 2 or 4' -> [1, 2, 4])."""
    found = re.search(r"use parallel\.tensor = ([\d, or]+)", message)
    return [int(x) for x in re.findall(r"\d+", found.group(1))] if found else []


GRID = list(itertools.product(range(1, 17), (1, 2, 3, 4, 6, 12), (1, 2, 8), (0, 1, 2, 3, 5)))


@pytest.mark.parametrize("heads", (1, 2, 3, 4, 6, 12))
def test_every_value_a_world_message_names_passes(heads):
    for world, _, batch, tensor in (g for g in GRID if g[1] == heads):
        cfg = world_cfg(tensor, heads, batch)
        valid = [t for t in range(1, world + 1) if fits(world, t, heads, batch)]
        if fits(world, tensor or world, heads, batch):
            assert config.check_world(cfg, world) == (tensor or world, world // (tensor or world))
            continue
        with pytest.raises(ConfigError) as err:
            config.check_world(cfg, world)
        message = str(err.value)
        assert "\n" not in message
        where = f"world {world}, heads {heads}, batch {batch}, tensor {tensor}: {message}"
        assert named_tensors(message) == valid, where  # all of them, and only them
        for t in valid:
            assert passes(world_cfg(t, heads, batch), world), where
        if valid:
            continue
        fixes = FIX.findall(message)
        assert {f[0].split()[0] for f in fixes} >= {"run", "set"}, where  # ranks and batch
        for _, ranks, new_batch, new_heads, t in fixes:
            t = int(t)
            if ranks:
                assert int(ranks) < world and passes(world_cfg(t, heads, batch), int(ranks))
            elif new_batch:
                assert passes(world_cfg(t, heads, int(new_batch)), world), where
            else:
                h = int(new_heads)
                assert passes(world_cfg(t, h, batch), world), where


def test_file_input_only_needs_a_divisor_within_the_heads():
    for world, heads in itertools.product(range(1, 17), (1, 2, 3, 4, 6, 12)):
        cfg = world_cfg(0, heads, 1, **{"input.text": "sentences.txt"})
        if world <= heads:
            assert passes(cfg, world)
            continue
        with pytest.raises(ConfigError) as err:
            config.check_world(cfg, world)
        valid = [t for t in range(1, world + 1) if fits(world, t, heads, 1, seeded=False)]
        assert named_tensors(str(err.value)) == valid and valid[0] == 1


def test_thirteen_ranks_twelve_heads_names_what_else_to_change():
    with pytest.raises(ConfigError) as err:
        config.check_world(config.load(), 13)
    message = str(err.value)
    assert "use parallel.tensor" not in message  # no divisor of 13 fits: say so
    assert "run on 12 ranks (parallel.tensor = 12)" in message
    assert "set input.batch = 13 (parallel.tensor = 1)" in message


# --- no MPI library: one line, exit 2 ---------------------------------------------------

FAKE_MPI4PY = {
    "missing": {"__init__.py": "raise ImportError(\"No module named 'mpi4py'\")\n"},
    "no libmpi": {"__init__.py": "",
                  "MPI.py": "raise RuntimeError('cannot load MPI library\\n"
                            "libmpi.so.12: cannot open shared object file')\n"},
}


@pytest.mark.parametrize("kind", sorted(FAKE_MPI4PY))
@pytest.mark.parametrize("command", ["run", "bench", "train", "info"])
def test_no_mpi_is_one_line_naming_both_fixes(tmp_path, kind, command):
    pkg = tmp_path / "mpi4py"
    pkg.mkdir()
    for name, text in FAKE_MPI4PY[kind].items():
        (pkg / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-m", "mpiattn", command], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("mpiattn: error: cannot load MPI (")
    assert 'pip install "mpiattn[mpi]"' in done.stderr
    assert "pip install --no-binary mpi4py --force-reinstall mpi4py" in done.stderr
    if command == "info":  # a launcher's rank 1 leaves the line to rank 0
        done = subprocess.run([sys.executable, "-m", "mpiattn", command],
                              env={**env, "PMI_RANK": "1"}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 2 and done.stderr == ""


# --- a closed pipe ends every command quietly --------------------------------------------

@pytest.fixture(scope="module")
def h5_inputs(tmp_path_factory):
    """A run file for report, and synthetic run files at 1, 2, 4 ranks for plan."""
    from test_plan import synthetic_run
    from test_report import write_run

    where = tmp_path_factory.mktemp("pipe")
    runs = [str(synthetic_run(where / f"s{n}.h5", n)) for n in (1, 2, 4)]
    return {"run": str(write_run(where / "r.h5", 2, 1.0)), "plan": runs}


def read_one_line_and_close(args: list[str]) -> tuple[int, bytes]:
    """Start mpiattn with stdout a pipe, read one line, close the pipe: (status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "mpiattn", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        return proc.wait(timeout=240), err
    finally:
        proc.kill()
        proc.wait()


def pipe_cases(inputs: dict) -> dict[str, tuple[list[str], set[int], int]]:
    """name -> (arguments, the statuses a whole read would give, tries)."""
    many_ranks = ",".join(str(n) for n in range(1, 301))
    return {
        "help": (["--help"], {0}, 20),
        "verify": (["verify", *[f"missing-{i}.h5" for i in range(300)]], {1}, 20),
        "report": (["report", *[inputs["run"]] * 20], {0}, 20),
        "plan": (["plan", *inputs["plan"], "--ranks", many_ranks], {0}, 20),
        "info": (["info"], {0}, 10),  # starts MPI (singleton): dearer, fewer tries
    }


@pytest.mark.parametrize("name", ["help", "verify", "report", "plan", "info"])
def test_a_closed_pipe_exits_quietly(h5_inputs, name):
    args, statuses, tries = pipe_cases(h5_inputs)[name]
    for _ in range(tries):
        status, err = read_one_line_and_close(args)
        assert err == b"", err.decode(errors="replace")
        assert status in statuses | {141}


# --- BLAS threads: the environment's variable, read back ---------------------------------

PROBE = """
import json, sys
from threadpoolctl import threadpool_info
from mpiattn.core.backend import blas_info, limit_blas_threads
threads, limiter = limit_blas_threads(int(sys.argv[1]))
libs = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
print(json.dumps({"threads": threads, "reported": libs, "info": blas_info()}))
"""
BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def probe(ranks: int, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in BLAS_VARS}
    done = subprocess.run([sys.executable, "-c", PROBE, str(ranks)], env={**clean, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


CORES = usable_cores()
HALF = max(1, CORES // 2)  # ranks on the node that leave each 2 cores (3 on odd counts)


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to tell a share from 1 thread")
@pytest.mark.parametrize("env, ranks, want, source", [
    ({"OPENBLAS_NUM_THREADS": "1"}, 1, 1, "OPENBLAS_NUM_THREADS=1"),
    ({"OMP_NUM_THREADS": "1"}, 1, 1, "OMP_NUM_THREADS=1"),
    ({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"}, 1, 1, "OPENBLAS_NUM_THREADS=1"),
    ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}, CORES, 2, "OPENBLAS_NUM_THREADS=2"),
    ({"OMP_NUM_THREADS": "2"}, CORES, 2, "OMP_NUM_THREADS=2"),
    ({"MKL_NUM_THREADS": "1"}, HALF, CORES // HALF, "cores /"),  # MKL's: not OpenBLAS's
    ({}, CORES, 1, f"{CORES} cores / {CORES} ranks"),
    ({}, HALF, CORES // HALF, f"{CORES} cores / {HALF} ranks"),
])
def test_blas_threads_follow_the_environment_and_are_read_back(env, ranks, want, source):
    got = probe(ranks, **env)
    assert got["reported"], "no BLAS library loaded"
    assert got["threads"] == max(got["reported"])  # what threadpoolctl says is in effect
    openblas = [lib for lib in got["info"] if lib["internal_api"] == "openblas"]
    if not openblas:
        pytest.skip("NumPy/SciPy here do not use OpenBLAS")
    assert got["threads"] == want
    assert [lib["num_threads"] for lib in openblas] == [want] * len(openblas)
    assert all(source in lib["threads_from"] for lib in openblas)


def test_a_run_records_the_thread_count_in_effect(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k not in BLAS_VARS},
           "OPENBLAS_NUM_THREADS": "1"}
    small = ["model.layers=1", "model.heads=2", "model.hidden=16", "model.ffn=16",
             "model.vocab=50", "input.batch=2", "input.seq_len=8"]
    args = [x for s in small for x in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "mpiattn", "run", *args, "-o",
                           str(tmp_path / "t.h5")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "BLAS threads/rank 1" in done.stdout
    with h5py.File(tmp_path / "t.h5") as f:
        assert int(f.attrs["blas_threads_per_rank"]) == 1


def test_a_run_records_its_kernels_and_numpy_passes_agree(tmp_path):
    """The root attribute ``kernels`` says what ran the element-wise operations; with
    MPIATTN_KERNELS=numpy the NumPy passes run instead, and every layer agrees in float32."""
    from mpiattn.core import kernels

    args = TINY_SET
    found = {}
    for name, extra in (("default", {}), ("numpy", {"MPIATTN_KERNELS": "numpy"})):
        env = {**{k: v for k, v in os.environ.items() if k != "MPIATTN_KERNELS"}, **extra}
        done = subprocess.run([sys.executable, "-m", "mpiattn", "run", *args, "-o",
                               str(tmp_path / f"{name}.h5")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        with h5py.File(tmp_path / f"{name}.h5") as f:
            assert [k.decode() for k in f["ranks/kernels"][()]] == [f.attrs["kernels"]]
            found[name] = (f.attrs["kernels"], [f[f"layers/{i:02d}/{part}"][()]
                                                for i in range(2)
                                                for part in ("attention", "hidden")])
    assert found["default"][0] == kernels.description()
    assert found["numpy"][0] == "NumPy passes (MPIATTN_KERNELS=numpy)"
    for compiled, passes in zip(found["default"][1], found["numpy"][1], strict=True):
        assert compiled.dtype == np.float32
        np.testing.assert_allclose(compiled, passes, rtol=1e-5, atol=1e-5)
    done = subprocess.run([sys.executable, "-m", "mpiattn", "run", *args, "--set",
                           "dtype=float64", "-o", str(tmp_path / "f64.h5")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "f64.h5") as f:  # the kernels are float32 only
        assert f.attrs["kernels"] == "NumPy passes (float64: the compiled kernels are float32)"


def test_ranks_with_different_kernels_are_recorded_rank_by_rank(tmp_path):
    """An MPMD launch, rank 0 on NumPy's passes and rank 1 on whatever this install has,
    tensor parallel: the run agrees with one process within float32 rounding, and the
    file says what each rank ran."""
    from mpiattn.core import kernels

    run = [sys.executable, "-m", "mpiattn", "run", *TINY_SET]
    env = {k: v for k, v in os.environ.items() if k != "MPIATTN_KERNELS"}
    done = subprocess.run(["mpiexec", "-n", "1", "env", "MPIATTN_KERNELS=numpy", *run,
                           "--set", "parallel.tensor=2", "-o", "mixed.h5", ":", "-n", "1",
                           *run, "--set", "parallel.tensor=2", "-o", "mixed.h5"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    done = subprocess.run([*run, "-o", "one.h5"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "mixed.h5") as mixed, h5py.File(tmp_path / "one.h5") as one:
        per_rank = [k.decode() for k in mixed["ranks/kernels"][()]]
        assert per_rank == ["NumPy passes (MPIATTN_KERNELS=numpy)", kernels.description()]
        assert mixed.attrs["kernels"] == "mixed: see /ranks/kernels"
        np.testing.assert_allclose(mixed["layers/01/hidden"][()], one["layers/01/hidden"][()],
                                   rtol=1e-5, atol=1e-5)
    if kernels.LIB is None:
        return  # both ranks ran NumPy's passes: the copies agree
    # bit-for-bit checks of the replicated states fail, and say why
    strict = ["--set", "parallel.tensor=2", "--set", "checksum.hash_every=layer", "-o", "s.h5"]
    done = subprocess.run(["mpiexec", "-n", "1", "env", "MPIATTN_KERNELS=numpy", *run,
                           *strict, ":", "-n", "1", *run, *strict], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "site 'hidden'" in done.stderr
    assert "ran different element-wise kernels" in done.stderr
    assert "MPIATTN_KERNELS=numpy on every rank" in done.stderr
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("ranks, threads, cores, slower, fix", [
    (2, 2, 2, "2", "set OMP_NUM_THREADS=1"),
    (2, 3, 4, "1.5", "set OMP_NUM_THREADS=2"),
    (3, 1, 2, "1.5", "start at most 2 ranks per node"),
    (3, 2, 2, "3", "set OMP_NUM_THREADS=1 and start at most 2 ranks per node"),
    (1, 2, 2, None, None), (4, 1, 4, None, None), (2, 4, 8, None, None), (8, 0, 2, None, None),
])
def test_oversubscription_warning(monkeypatch, ranks, threads, cores, slower, fix):
    for var in BLAS_VARS:
        monkeypatch.delenv(var, raising=False)
    line = oversubscription(ranks, threads, cores)
    if slower is None:
        assert line is None
        return
    assert line == (f"mpiattn: warning: {ranks} ranks x {threads} BLAS thread"
                    f"{'s' * (threads > 1)} on {cores} cores: oversubscribed,"
                    f" expect ~{slower}x slower; {fix}")


def test_oversubscription_names_the_variable_that_wins(monkeypatch):
    from mpiattn.core.backend import blas_info

    if not any(lib["internal_api"] == "openblas" for lib in blas_info()):
        pytest.skip("NumPy here does not use OpenBLAS")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert oversubscription(2, 2, 2).endswith("; set OPENBLAS_NUM_THREADS=1")
