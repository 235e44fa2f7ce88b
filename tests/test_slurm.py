"""Job scripts under jobs/ against a real one-node Slurm cluster and a real mpiexec.

The Slurm tests start slurmctld/slurmd/munged through tests/slurm/cluster.sh
(which apt-installs slurm-wlm and munge when missing, so it needs root) and
run only with MPIATTN_SLURM_TESTS=1. The rest always run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SLURM_JOBS = ROOT / "jobs" / "slurm"
LOCAL_JOBS = ROOT / "jobs" / "local"

SMALL = [
    "--set", "model.layers=2", "--set", "model.hidden=128", "--set", "model.ffn=256",
    "--set", "model.heads=4", "--set", "input.batch=2", "--set", "input.seq_len=32",
    "--set", "model.vocab=1000",
]  # fmt: skip
# Rank counts for the scaling sweep; the default fits a 2-core machine.
SWEEP = os.environ.get("MPIATTN_SLURM_RANKS", "1 2").split()
JOB_TIMEOUT = 180

slurm = pytest.mark.skipif(
    os.environ.get("MPIATTN_SLURM_TESTS") != "1",
    reason="real Slurm cluster tests: set MPIATTN_SLURM_TESTS=1 (needs root)",
)
needs_cli = pytest.mark.skipif(
    importlib.util.find_spec("mpiattn.cli") is None, reason="mpiattn CLI not installed"
)


def job_env(**extra: str) -> dict[str, str]:
    """The environment a job should see: this venv's bin on PATH, no outer job's SLURM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
    venv_bin = str(Path(sys.executable).parent)
    path = env.get("PATH", "").split(os.pathsep)
    if venv_bin not in path:
        env["PATH"] = os.pathsep.join([venv_bin, *path])
    env.update(extra)
    return env


def check_h5(path: Path, world_size: int) -> None:
    import h5py

    assert path.is_file(), f"{path} was not written"
    with h5py.File(path, "r") as f:
        status = f.attrs["status"]
        if isinstance(status, bytes):
            status = status.decode()
        assert status == "complete"
        assert int(f.attrs["world_size"]) == world_size
        assert "timings/seconds" in f


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = job_env(MPIATTN_SLURM_DIR=str(state))
    t0 = time.monotonic()
    subprocess.run(["bash", str(CLUSTER), "start"], env=env, check=True, timeout=600)
    print(f"\ncluster up in {time.monotonic() - t0:.1f} s (includes any apt install)")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, check=False, timeout=60)


def sbatch(env, workdir: Path, script: Path, ntasks: int, *args: str, **extra: str) -> str:
    """Submit with --wait; on failure show the job's output. Returns the job's output."""
    log = workdir / f"{script.stem}.out"
    cmd = [
        "sbatch", "--wait", "--parsable", "--export=ALL", f"--chdir={workdir}",
        f"--output={log}", "--nodes=1", f"--ntasks={ntasks}",
        f"--ntasks-per-node={ntasks}", "--cpus-per-task=1", "--time=5",
        str(script), *args,
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            cmd, env={**env, **extra}, capture_output=True, text=True, timeout=JOB_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", script.name], env=env, check=False)
        raise
    out = log.read_text() if log.exists() else "(no job output)"
    print(f"{script.name} {args[:2]} {extra}: {time.monotonic() - t0:.1f} s\n{out}")
    assert r.returncode == 0, f"sbatch rc={r.returncode}\n{r.stdout}{r.stderr}\n--- job ---\n{out}"
    return out


@slurm
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpiexec", "srun --mpi=pmi2"])
def test_run_sbatch(cluster, tmp_path, launcher):
    sbatch(cluster, tmp_path, SLURM_JOBS / "run.sbatch", 2, "-", "run.h5", *SMALL,
           LAUNCHER=launcher)  # fmt: skip
    check_h5(tmp_path / "run.h5", 2)


@slurm
@pytest.mark.slow
def test_run_sbatch_default_output(cluster, tmp_path):
    out = sbatch(cluster, tmp_path, SLURM_JOBS / "run.sbatch", 1, "", "", *SMALL)
    files = list(tmp_path.glob("mpiattn-run-*.h5"))
    assert len(files) == 1, out
    check_h5(files[0], 1)


@slurm
@pytest.mark.slow
def test_scaling_sbatch(cluster, tmp_path):
    ranks = [int(k) for k in SWEEP]
    sbatch(cluster, tmp_path, SLURM_JOBS / "scaling.sbatch", max(ranks), "-", "scaling", *SMALL,
           RANKS=" ".join(SWEEP))  # fmt: skip
    for k in ranks:
        check_h5(tmp_path / f"scaling-n{k}.h5", k)


@pytest.mark.parametrize("script", ["run.sbatch", "train.sbatch", "scaling.sbatch"])
def test_sbatch_refuses_outside_a_job(script, tmp_path):
    r = subprocess.run(
        ["bash", str(SLURM_JOBS / script)], env=job_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    assert "not inside a Slurm job" in r.stderr and "sbatch" in r.stderr
    assert not list(tmp_path.iterdir())


@needs_cli
@pytest.mark.slow
def test_local_scripts(tmp_path):
    if shutil.which("mpiexec", path=job_env()["PATH"]) is None:
        pytest.skip("no mpiexec")
    env = job_env(NP="2")
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run(
        ["bash", str(LOCAL_JOBS / "run.sh"), "-", "run.h5", *SMALL],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    check_h5(tmp_path / "run.h5", 2)
    r = subprocess.run(
        ["bash", str(LOCAL_JOBS / "scaling.sh"), "", "sweep", *SMALL],
        env=job_env(RANKS="1 2"), cwd=tmp_path, capture_output=True, text=True,
        timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for k in (1, 2):
        check_h5(tmp_path / f"sweep-n{k}.h5", k)
