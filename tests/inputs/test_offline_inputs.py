"""Offline commands given bad arguments or altered files: ``report --plot`` targets,
``plan``'s numeric options, ``verify`` on files missing what they promise, and a
non-text ``status``. Each through the real command line (subprocess with a timeout):
the exit code, one line, no traceback, files untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

TINY_RUN = ["--set", "model.layers=2", "--set", "model.heads=2", "--set", "model.hidden=32",
            "--set", "model.ffn=64", "--set", "model.vocab=100", "--set", "input.batch=2",
            "--set", "input.seq_len=8"]


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run([sys.executable, "-m", "mpiattn", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def one_error_line(done: subprocess.CompletedProcess, code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny run file (one rank, with timings for report and plan)."""
    folder = tmp_path_factory.mktemp("run")
    done = cli("run", *TINY_RUN, "-o", "r.h5", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "r.h5"


@pytest.fixture
def work(run_file: Path, tmp_path: Path) -> Path:
    (tmp_path / "r.h5").write_bytes(run_file.read_bytes())
    return tmp_path


# --- report --plot ----------------------------------------------------------------------------

def test_plot_refuses_an_existing_png(work):
    (work / "y.png").write_bytes(b"precious")
    before = digests(work)
    line = one_error_line(cli("report", "r.h5", "--plot", "y.png", cwd=work), 2)
    assert "'y.png' exists: choose another --plot name or remove it" in line
    line = one_error_line(cli("report", "r.h5", "--plot", "y", cwd=work), 2)
    assert "'y.png' exists" in line
    assert digests(work) == before


def test_plot_without_suffix_names_the_file_it_wrote(work):
    pytest.importorskip("matplotlib")
    done = cli("report", "r.h5", "--plot", "y", cwd=work)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "wrote y.png"
    assert (work / "y.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (work / "y").exists()
    assert sorted(p.name for p in work.iterdir()) == ["r.h5", "y.png"]  # no temporary


@pytest.mark.parametrize(("target", "names"), [
    ("x.h5", "PNG"), ("nodir/x.png", "'nodir' does not exist"), ("/dev/full", "regular file"),
    (".", "regular file"),
])
def test_plot_bad_targets_are_one_line(work, target, names):
    before = digests(work)
    line = one_error_line(cli("report", "r.h5", "--plot", target, cwd=work), 2)
    assert line.startswith("mpiattn report: error: ") and names in line
    assert digests(work) == before
    assert not Path("/dev/full.png").exists()


# --- plan's numeric options -------------------------------------------------------------------

@pytest.mark.parametrize(("option", "value"), [
    ("--ranks", "100000000000"), ("--ranks", "0,2"), ("--ranks", "1,two"),
    ("--cores", "nan"), ("--cores", "-2"), ("--cores", "0"), ("--cores", "inf"),
    ("--measured-cores", "inf"), ("--measured-cores", "0"),
    ("--nodes-alpha", "-1"), ("--nodes-alpha", "inf"), ("--nodes-beta", "nan"),
    ("--ranks-per-node", "0"), ("--ranks-per-node", "2000000"),
])
def test_plan_refuses_bad_numbers(work, option, value):
    before = digests(work)
    line = one_error_line(cli("plan", "r.h5", f"{option}={value}", cwd=work, timeout=30), 2)
    assert line.startswith("mpiattn plan: error: ") and option in line
    assert digests(work) == before


def test_plan_accepts_the_largest_rank_count(work):
    done = cli("plan", "r.h5", "--ranks", "1,2,1048576", cwd=work, timeout=30)
    assert done.returncode == 0, done.stderr


# --- verify: what the file promises -----------------------------------------------------------

def alter(path: Path, case: str) -> None:
    with h5py.File(path, "a") as f:
        if case == "layer_deleted":
            del f["layers/01"]
        elif case == "layers_deleted":
            del f["layers"]
        elif case == "digest_deleted":
            del f["layers/00/hidden"].attrs["sha256"]
        elif case == "tokens_deleted":
            del f["input/tokens"]
        elif case == "world_size":
            f.attrs["world_size"] = 10**12
        elif case == "hard_link":
            del f["layers/01/hidden"]
            f["layers/01/hidden"] = f["layers/00/hidden"]
        elif case == "group_hard_link":
            del f["layers/01"]
            f["layers/01"] = f["layers/00"]
        elif case == "hosts_deleted":
            del f["ranks/host"]


@pytest.mark.parametrize(("case", "names"), [
    ("layer_deleted", "/layers/01"), ("layers_deleted", "/layers"),
    ("digest_deleted", "/layers/00/hidden"), ("tokens_deleted", "/input/tokens"),
    ("world_size", "world_size"), ("hard_link", "/layers/00/hidden and /layers/01/hidden"),
    ("group_hard_link", "/layers/00 and /layers/01"), ("hosts_deleted", "/ranks/host"),
])
def test_verify_fails_a_file_missing_what_it_promises(work, case, names):
    path = work / "r.h5"
    alter(path, case)
    before = digests(work)
    done = cli("verify", "r.h5", cwd=work)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("r.h5: FAILED: ") and names in first, done.stdout
    assert digests(work) == before


def test_verify_fails_missing_records_of_a_two_rank_run(tmp_path):
    done = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "mpiattn", "run",
                           *TINY_RUN, "-o", "r2.h5"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0 and not (tmp_path / "r2.h5").exists():
        pytest.skip(f"no working mpiexec here: {done.stderr[-200:]}")
    assert cli("verify", "r2.h5", cwd=tmp_path).returncode == 0
    with h5py.File(tmp_path / "r2.h5", "a") as f:
        del f["checksum"]
    done = cli("verify", "r2.h5", cwd=tmp_path)
    assert done.returncode == 1 and "/checksum/collectives is missing" in done.stdout


def test_verify_accepts_sound_and_older_files(work):
    assert cli("verify", "r.h5", cwd=work).returncode == 0
    with h5py.File(work / "r.h5", "a") as f:  # format 1 before pipeline stages
        del f.attrs["pipeline_parallel"]
    done = cli("verify", "r.h5", cwd=work)
    assert done.returncode == 0 and "OK" in done.stdout


def test_verify_fails_a_train_file_without_its_losses(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"format_version": 1, "command": "train", "world_size": 1,
                        "config": "[model]\nlayers = 1\n", "status": "complete"})
        f["train/step"] = [1, 2]
    done = cli("verify", "t.h5", cwd=tmp_path)
    assert done.returncode == 1 and "/train/loss is missing" in done.stdout


# --- status: not text ---------------------------------------------------------------------------

def test_integer_status_is_refused_by_verify_and_report(work):
    with h5py.File(work / "r.h5", "a") as f:
        f.attrs["status"] = 1
    before = digests(work)
    verified = cli("verify", "r.h5", cwd=work)
    assert verified.returncode == 1 and "attribute 'status'" in verified.stdout
    line = one_error_line(cli("report", "r.h5", cwd=work), 2)
    assert "attribute 'status'" in line and "not text" in line
    assert digests(work) == before
