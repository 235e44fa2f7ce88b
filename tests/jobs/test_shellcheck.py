"""shellcheck on every job script and test shell script."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    [*ROOT.glob("jobs/**/*.sh"), *ROOT.glob("jobs/**/*.sbatch"), *ROOT.glob("tests/slurm/*.sh")]
)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    assert SCRIPTS, "no scripts found"
    r = subprocess.run(
        ["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
