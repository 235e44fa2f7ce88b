"""A short fuzzing run in the suite: ~200 mutated files per input reader and ~100 per
offline tool (verify, report), only UserErrors (or a clean problem list) allowed.

The harness runs in a subprocess so that a native crash (HDF5, safetensors) fails this test
with the harness's output instead of taking pytest down. Longer runs: see fuzz_readers.py.
"""

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).with_name("fuzz_readers.py")


def run_harness(tmp_path: Path, iterations: int, readers: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--iterations", str(iterations), "--seed", "0",
         *(arg for reader in readers for arg in ("--reader", reader)),
         "--crash-dir", str(tmp_path / "crashes"), "--hang-seconds", "60"],
        capture_output=True, text=True, timeout=300,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no crashes" in done.stdout
    for reader in readers:
        assert f"{reader}: {iterations} inputs" in done.stdout


def test_readers_raise_only_user_errors_on_mutated_files(tmp_path):
    run_harness(tmp_path, 200, ["config", "tokens", "safetensors"])


def test_verify_and_report_survive_mutated_run_files(tmp_path):
    run_harness(tmp_path, 100, ["verify", "report"])
