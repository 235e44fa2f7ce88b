"""A short fuzzing run in the suite: ~200 mutated files per reader, only UserErrors allowed.

The harness runs in a subprocess so that a native crash (HDF5, safetensors) fails this test
with the harness's output instead of taking pytest down. Longer runs: see fuzz_readers.py.
"""

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).with_name("fuzz_readers.py")


def test_readers_raise_only_user_errors_on_mutated_files(tmp_path):
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--iterations", "200", "--seed", "0",
         "--reader", "config", "--reader", "tokens", "--reader", "safetensors",
         "--crash-dir", str(tmp_path / "crashes")],
        capture_output=True, text=True, timeout=300,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no crashes" in done.stdout
