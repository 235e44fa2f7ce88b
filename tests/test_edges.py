"""Issue #24, checked at the edges: mislaunches, cluster file systems, special files,
inputs that differ per rank, deletion only of what is ours, private folders, readers.

Every subprocess has a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY

from mpiattn.commands import launch

ROOT = Path(__file__).resolve().parents[1]
SMALL = {**TINY, "model.layers": 1, "input.batch": 2, "input.seq_len": 8}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (*launch.MPI_VARS, *launch.SLURM_VARS, "SLURM_PROCID", "PMI_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _sets(flat: dict) -> list[str]:
    return [a for k, v in flat.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}")]


def mpiattn(*args: str, cwd: Path, ranks: int = 0, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess:
    """``mpiattn ARGS`` (under ``mpiexec -n ranks`` when ranks > 0); a hang fails."""
    cmd = [sys.executable, "-m", "mpiattn", *args]
    if ranks:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit 2 and exactly one ``mpiattn...error`` line naming ``words``."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mpiattn"), lines[0]
    assert "error" in lines[0] and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- 1. launchers ---------------------------------------------------------------------

@pytest.mark.parametrize(("env", "name", "n"), [
    ({"SLURM_NTASKS": "3"}, "SLURM_NTASKS", 3),
    ({"SLURM_NPROCS": "2"}, "SLURM_NPROCS", 2),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NUM_TASKS", 2),
    ({"PMI_SIZE": "2"}, "PMI_SIZE", 2),
    ({"PMIX_SIZE": "3"}, "PMIX_SIZE", 3),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE", 2),
])
def test_launcher_says_more_tasks_than_mpi(env, name, n):
    msg = launch.mismatch(1, env, "MPICH Version: 5.0")
    assert msg is not None and f"{name}={n}" in msg
    assert "srun --mpi=pmix" in msg and "srun --mpi=pmi2" in msg and "MPICH" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("world", "env"), [
    (1, {}),                                              # started alone
    (1, {"SLURM_NTASKS": "1"}),                           # srun -n 1
    (2, {"SLURM_NTASKS": "2", "PMI_SIZE": "2"}),          # srun --mpi=pmi2 that works
    (3, {"SLURM_NTASKS": "3"}),                           # srun --mpi=pmix that works
    (1, {"SLURM_NTASKS": "4", "PMI_SIZE": "1"}),          # mpiexec -n 1 in an allocation
    (1, {"SLURM_NTASKS": "4", "OMPI_COMM_WORLD_SIZE": "1"}),
    (1, {"SLURM_NTASKS": "x"}),                           # not a count
])
def test_launcher_agrees_with_mpi(world, env):
    assert launch.mismatch(world, env) is None


@pytest.mark.parametrize("command", ["run", "bench", "train", "info"])
def test_mislaunch_is_one_line_before_any_work(tmp_path, command):
    """Every MPI command: N singletons of a broken srun each exit 2 before any work; only
    task 0 speaks, and no output is written (with --force neither)."""
    args = [command] if command == "info" else [command, "-o", "out.h5", "--force",
                                                *_sets(SMALL)]
    done = mpiattn(*args, cwd=tmp_path, timeout=60, SLURM_NTASKS="2", SLURM_PROCID="0")
    one_error_line(done, "SLURM_NTASKS=2", "srun --mpi=pmix", "mpi4py")
    assert not any(tmp_path.iterdir())
    other = mpiattn(*args, cwd=tmp_path, timeout=60, SLURM_NTASKS="2", SLURM_PROCID="1")
    assert other.returncode == 2 and other.stderr.strip() == ""
