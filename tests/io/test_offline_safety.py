"""Offline tools and input readers read only what is inside an HDF5 file (issue #11).

Hostile files are built with h5py; ``verify``, ``report`` and ``report --json`` are driven
through the real command line (a subprocess with a timeout): each must fail with one line,
no traceback, and never show bytes from outside the file. No MPI needed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpiattn import config
from mpiattn.errors import InputError
from mpiattn.io import h5io, h5safe

TINY_RUN = ["--set", "model.layers=1", "--set", "model.heads=2", "--set", "model.hidden=32",
            "--set", "model.ffn=64", "--set", "model.vocab=100", "--set", "input.batch=2",
            "--set", "input.seq_len=8"]
SECRET = 4242.4242  # the value stored in the file outside: it must never be printed


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpiattn", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, single-process) run file."""
    folder = tmp_path_factory.mktemp("run")
    done = cli("run", *TINY_RUN, "-o", "x.h5", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "x.h5"


def base_file(path: Path, **attrs: object) -> h5py.File:
    """A file open for writing with the root attributes report reads."""
    f = h5py.File(path, "w", libver=("earliest", "v110"))
    f.attrs.update({"format_version": 1, "command": "run", "world_size": 1,
                    "config": "[model]\nlayers = 1\n", "status": "complete", **attrs})
    return f


def secret_file(folder: Path) -> Path:
    outside = folder / "outside.bin"
    outside.write_bytes(np.full(6, SECRET).tobytes())
    return outside


def other_h5(folder: Path) -> Path:
    other = folder / "other.h5"
    with h5py.File(other, "w") as g:
        g["timings/seconds"] = np.full((1, 1, 6), SECRET)
    return other


# --- hostile files: each builder returns (path, the object its error line must name) -----

def external_storage(folder: Path) -> tuple[Path, str]:
    outside = secret_file(folder)
    path = folder / "external-storage.h5"
    with base_file(path) as f:
        d = f.create_dataset("timings/seconds", shape=(1, 1, 6), dtype="f8",
                             external=[(str(outside), 0, 48)])
        d.attrs["phases"] = ["qkv", "attention", "out_proj", "allreduce", "norm", "mlp"]
    return path, "/timings/seconds"


def external_link(folder: Path) -> tuple[Path, str]:
    other = other_h5(folder)
    path = folder / "external-link.h5"
    with base_file(path) as f:
        f["timings"] = h5py.ExternalLink(str(other), "/timings")
    return path, "/timings"


def soft_link(folder: Path) -> tuple[Path, str]:
    path = folder / "soft-link.h5"
    with base_file(path) as f:
        f["timings/setup"] = np.ones(1)
        f["timings/forward"] = h5py.SoftLink("/timings/setup")
    return path, "/timings/forward"


def virtual_dataset(folder: Path) -> tuple[Path, str]:
    other = other_h5(folder)
    path = folder / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(1, 1, 6), dtype="f8")
    layout[:] = h5py.VirtualSource(str(other), "timings/seconds", shape=(1, 1, 6))
    with base_file(path) as f:
        f.create_virtual_dataset("timings/seconds", layout)
    return path, "/timings/seconds"


def huge_unallocated(folder: Path) -> tuple[Path, str]:
    path = folder / "huge-unallocated.h5"
    with base_file(path) as f:  # 10**12 float64 declared, nothing stored
        f.create_dataset("timings/forward", shape=(10**12,), dtype="f8", chunks=(1024,),
                         maxshape=(None,))
    return path, "/timings/forward"


def huge_compressed(folder: Path) -> tuple[Path, str]:
    path = folder / "huge-compressed.h5"
    with base_file(path) as f:  # 80 GB declared, one gzip chunk of zeros stored
        d = f.create_dataset("layers/00/hidden", shape=(10**7, 1000), dtype="f8",
                             chunks=(1000, 1000), compression="gzip")
        d[:1000] = 0.0
    return path, "/layers/00/hidden"


def non_utf8_attribute(folder: Path) -> tuple[Path, str]:
    path = folder / "non-utf8.h5"
    with base_file(path, status=np.bytes_(b"\xff\xfecomplete")) as f:
        f["timings/forward"] = np.ones(1)
    return path, "attribute 'status'"


def big_config(folder: Path) -> tuple[Path, str]:
    path = folder / "big-config.h5"
    with base_file(path, config="# " + "x" * 50_000_000 + "\n[model]\nlayers = 1\n") as f:
        f["timings/forward"] = np.ones(1)
    return path, "attribute 'config'"


def damaged_heap(folder: Path) -> tuple[Path, str]:
    """The free-space record of the strings' heap with size 0: HDF5 2.0 loops forever."""
    path = folder / "damaged-heap.h5"
    with base_file(path) as f:
        f["timings/forward"] = np.ones(1)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"GCOL")
    pos, end = at + 16, at + int.from_bytes(raw[at + 8 : at + 16], "little")
    while int.from_bytes(raw[pos : pos + 2], "little") != 0:  # to the index-0 record
        pos += 16 + (int.from_bytes(raw[pos + 8 : pos + 16], "little") + 7) // 8 * 8
        assert pos + 16 <= end
    raw[pos + 8 : pos + 16] = bytes(8)
    path.write_bytes(bytes(raw))
    return path, "global heap"


HOSTILE: dict[str, Callable[[Path], tuple[Path, str]]] = {
    f.__name__: f for f in (external_storage, external_link, soft_link, virtual_dataset,
                            huge_unallocated, huge_compressed, non_utf8_attribute, big_config,
                            damaged_heap)
}
REFUSED_AT_OPEN = ["external_storage", "external_link", "soft_link", "virtual_dataset",
                   "huge_unallocated", "huge_compressed", "damaged_heap"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("hostile")
    return {name: build(folder) for name, build in HOSTILE.items()}


def assert_no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_verify_fails_hostile_files_with_one_line(hostile, case):
    path, names = hostile[case]
    done = cli("verify", str(path))
    assert_no_traceback(done)
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(f"{path}: FAILED: ") and names in lines[0]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_report_fails_hostile_files_with_one_line(hostile, case, as_json):
    path, names = hostile[case]
    done = cli("report", str(path), *(["--json"] if as_json else []))
    assert_no_traceback(done)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"mpiattn report: error: '{path}'") and names in lines[0]


@pytest.mark.parametrize("command", [["verify"], ["report"], ["report", "--json"]])
def test_bytes_outside_the_file_are_never_shown(hostile, command):
    path, _ = hostile["external_storage"]
    with h5py.File(path) as f:  # the attack works on a plain h5py read
        assert f["timings/seconds"][0, 0, 0] == SECRET
    done = cli(*command, str(path))
    assert "4242" not in done.stdout + done.stderr
    assert "external storage" in done.stdout + done.stderr


@pytest.mark.parametrize("case", REFUSED_AT_OPEN)
def test_input_and_checkpoint_readers_refuse_hostile_files(hostile, case):
    """``input.tokens`` and ``train --resume`` open files with ``h5io.open_for_reading``."""
    from mpiattn.io.formats.checkpoint import read_checkpoint

    path, names = hostile[case]
    with pytest.raises(InputError, match=names):
        h5io.open_for_reading(path)
    with pytest.raises(InputError, match=names):
        read_checkpoint(path, config.Config())


def test_a_real_run_file_still_verifies_and_reports(run_file):
    done = cli("verify", str(run_file))
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout
    done = cli("report", "--json", str(run_file))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["files"][0]
    assert summary["model"]["hidden"] == 32 and summary["forward_s"] > 0


# --- non-finite results ---------------------------------------------------------------------

def train_like(path: Path, loss: np.ndarray) -> Path:
    with base_file(path, command="train") as f:
        f["train/loss"] = loss
        f["train/step"] = np.arange(1, loss.size + 1)
        f["train/grad_norm"] = np.ones(loss.size)
    return path


def test_verify_fails_a_nan_loss_and_report_shows_it(tmp_path):
    loss = np.linspace(7.0, 5.0, 30)
    assert cli("verify", str(train_like(tmp_path / "ok.h5", loss))).returncode == 0
    loss[17:] = np.nan
    path = train_like(tmp_path / "nan.h5", loss)
    done = cli("verify", str(path))
    assert done.returncode == 1
    assert done.stdout.strip() == (f"{path}: FAILED: non-finite values in /train/loss"
                                   " (first at index 17)")
    done = cli("report", "--json", str(path))  # report shows it; JSON has null, not NaN
    assert done.returncode == 0, done.stderr
    train = json.loads(done.stdout, parse_constant=lambda c: pytest.fail(c))["files"][0]["train"]
    assert train["last_loss"] is None and train["min_loss"] == pytest.approx(loss[16])
    assert done.stderr == ""


def test_verify_fails_nan_in_a_layer_output(run_file, tmp_path):
    path = tmp_path / "nan-layer.h5"
    path.write_bytes(run_file.read_bytes())
    with h5py.File(path, "a") as f:
        d = f["layers/00/hidden"]
        data = d[()]
        data[1, 3, 5] = np.inf
        d[...] = data
        d.attrs["sha256"] = h5io.sha256(data)  # a consistent digest: only the value is bad
    done = cli("verify", str(path))
    assert_no_traceback(done)
    assert done.returncode == 1
    assert done.stdout.strip() == (f"{path}: FAILED: non-finite values in /layers/00/hidden"
                                   " (first at index (1, 3, 5))")


# --- h5safe directly ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (0, 4), (7,), (5, 3), (3, 4, 5), (2, 50, 3)])
def test_streamed_digest_is_the_whole_array_digest(tmp_path, shape):
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["d"] = data
        pieces = list(h5safe.blocks(f["d"], block_bytes=24))  # 6 floats: rows are split
        streamed = hashlib.sha256(b"".join(p.tobytes() for p in pieces)).hexdigest()
        assert h5safe.scan(f["d"]).sha256 == streamed == h5io.sha256(data)
    assert all(p.size <= 6 for p in pieces) and sum(p.size for p in pieces) == data.size


def test_read_refuses_a_declared_size_beyond_the_rule(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        small = f.create_dataset("small", shape=(1000,), dtype="f8")  # unallocated, 8 kB
        big = f.create_dataset("big", shape=(h5safe.FLOOR_BYTES // 8 + 1,), dtype="f8")
        assert h5safe.read(small).shape == (1000,)
        with pytest.raises(InputError, match="/big declares shape"):
            h5safe.read(big)
        with pytest.raises(InputError, match="more than the 100 bytes"):
            h5safe.read(small, max_bytes=100)


def test_text_decodes_utf8_and_refuses_the_rest():
    assert h5safe.text(np.bytes_("grüß".encode()), "x") == "grüß"
    assert h5safe.text(np.array(["ok"], dtype=object), "x") == "ok"
    for bad in (b"\xff", "\udcff", 3):
        with pytest.raises(InputError, match="^attribute 'a' of / is"):
            h5safe.text(bad, "attribute 'a' of /")
