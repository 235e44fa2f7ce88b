"""The command line as a user meets it: one clear line and exit code 2 on bad input."""

import json
import math
import subprocess
import sys

import h5py
import pytest

TINY_SET = ["--set", "model.layers=2", "--set", "model.hidden=64", "--set", "model.heads=4",
            "--set", "model.ffn=128", "--set", "model.vocab=300", "--set", "input.batch=2",
            "--set", "input.seq_len=16"]


def mpiattn(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mpiattn", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_run_writes_the_default_name_and_verify_passes(tmp_path):
    done = mpiattn("run", *TINY_SET, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "heads per rank [4]" in done.stdout and "wrote mpiattn-run.h5" in done.stdout
    with h5py.File(tmp_path / "mpiattn-run.h5") as f:
        assert f.attrs["status"] == "complete"
    check = mpiattn("verify", str(tmp_path / "mpiattn-run.h5"))
    assert check.returncode == 0 and "OK" in check.stdout
    again = mpiattn("run", *TINY_SET, cwd=tmp_path)  # no clobbering without --force
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "model.layer=2"], "did you mean 'model.layers'"),
    (["--set", "model.heads=0"], "must be positive"),
    (["--set", "input.text=absent.txt", "--set", "input.tokenizer=t.json"], "does not exist"),
    (["--set", "model.weights=absent.safetensors"], "no safetensors file"),
    (["nothing.toml"], "config file 'nothing.toml' does not exist"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    done = mpiattn("run", *args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpiattn: error:") and message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_verify_reports_a_missing_file(tmp_path):
    done = mpiattn("verify", str(tmp_path / "x.h5"))
    assert done.returncode == 1 and "FAILED" in done.stdout and "does not exist" in done.stdout


def test_info_names_the_mpi_library():
    import contextlib
    from importlib import metadata

    done = mpiattn("info")
    assert done.returncode == 0 and "MPI library" in done.stdout and "CUDA-aware" in done.stdout
    versions = []  # the gpu extra's CuPy wheel (cupy-cuda13x), gpu-cuda12's, a source build
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(metadata.version(dist))
    line = next(x for x in done.stdout.splitlines() if x.startswith("cupy "))
    assert line.split(None, 1)[1] == (versions[0] if versions else "not installed")


def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path):
    """jobs/gpu/check.sh with QUICK=1 on the CuPy stand-in (tests/standin): every step,
    the CuPy path included, but the device itself (docs/gpu-standin.md)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, BACKEND="cupy", QUICK="1", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{root}{os.pathsep}{root / 'tests/standin'}")
    done = subprocess.run(["bash", str(root / "jobs/gpu/check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "5 of 5 steps passed" in done.stdout, done.stdout[-2000:]
    with h5py.File(tmp_path / "gpu-check.h5") as f:
        assert f.attrs["status"] == "complete"
        steps = {r["step"]: r for r in json.loads(f.attrs["steps"])}
        assert list(steps) == ["tests", "run", "verify", "bench", "scaling"]
        assert all(r["verdict"] == "passed" for r in steps.values())
        for name, words in (("tests", " passed, 0 failed"), ("run", "times from cuda events"),
                            ("bench", "GFLOP/s"), ("scaling", "4 ranks")):
            assert words in steps[name]["figures"], steps[name]
            assert f"{name:<8} passed" in done.stdout
        assert f["bench-gpu"].attrs["command"] == "bench"
        assert f["run-gpu"].attrs["backend"] == "cupy"  # the stand-in's device
        device = f["run-gpu/ranks/device"][0]
        device = device.decode() if isinstance(device, bytes) else device
        assert device.startswith("cuda:0 CuPy stand-in")
        assert "fraction_of_peak" in f["bench-gpu/bench/layer"].attrs
        assert "testsuite" in f.attrs["tests_junit"]
        scaling = f["scaling"]  # 4 ranks predicted from 1 and 2 (QUICK), then measured
        assert scaling["ranks"][...].tolist() == [1, 2, 4]
        assert scaling["in_fit"][...].tolist() == [True, True, False]
        assert scaling["tensor"][...].tolist() == [1, 2, 2]  # 2 heads: 4 = 2 head x 2 data
        assert scaling["data"][...].tolist() == [1, 1, 2]
        assert (scaling["measured_forward"][...] > 0).all()
        assert (scaling["predicted_forward"][...] > 0).all()
        assert all(math.isfinite(e) for e in scaling["error"][...])
