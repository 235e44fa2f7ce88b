"""``mpiattn report`` on synthetic files written to the HDF5 schema (no MPI needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpiattn.analysis import report
from mpiattn.commands.cli import main

PHASES = ["qkv", "attention", "out_proj", "allreduce", "norm", "mlp"]
RECORD = np.dtype([("replica", "i4"), ("layer", "i4"), ("site", "S16"), ("residual", "f8"),
                   ("bound", "f8"), ("ratio", "f8"), ("passed", "u1"), ("retries", "i4"),
                   ("digest", "u8")])


def config_toml(layers: int = 2, hidden: int = 96, batch: int = 4) -> str:
    return (f'seed = 0\ndtype = "float32"\n\n[model]\nlayers = {layers}\nheads = 12\n'
            f'hidden = {hidden}\nffn = 200\n\n[input]\nbatch = {batch}\nseq_len = 24\n\n'
            '[checksum]\nmode = "abft"\n')


def write_run(path: Path, ranks: int, forward: float, layers: int = 2, hidden: int = 96,
              version: int = 1, checksums: bool = True, train: bool = False) -> Path:
    """A run file: per-rank phase times that sum to ``forward`` on every rank."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"format_version": version, "command": "train" if train else "run",
                        "config": config_toml(layers, hidden), "world_size": ranks,
                        "tensor_parallel": ranks, "data_parallel": 1, "backend": "numpy",
                        "head_partition": np.array([12 // ranks] * ranks), "status": "complete"})
        share = np.array([1, 1, 1, 2, 1, 4], float) / 10
        sec = np.broadcast_to(share * forward / layers, (ranks, layers, 6)).copy()
        sec[-1, :, 5] *= 1.5  # the last rank's MLP is slower: imbalance > 1
        d = f.create_dataset("timings/seconds", data=sec)
        d.attrs["phases"] = PHASES
        f["timings/forward"] = np.full(ranks, forward)
        f["timings/setup"] = np.full(ranks, 0.1)
        f["ranks/host"] = ["node0"] * ranks
        if checksums:
            rows = [(0, i, b"attention", 0.0, 1e-10, 0.25 * i, 1, i % 2, 7) for i in range(layers)]
            f["checksum/collectives"] = np.array(rows, dtype=RECORD)
        if train:
            f["train/loss"] = np.linspace(7.0, 5.0, 20)
            f["train/eval_loss"] = np.array([6.5, 5.5])
            f["train/eval_step"] = np.array([10, 20])
            f["train/tokens_per_second"] = np.full(20, 1000.0)
    return path


def test_one_file_phases_partition_checksums(tmp_path, capsys):
    path = write_run(tmp_path / "a.h5", 2, 1.0)
    s = report.summarize(report.load(path))
    mlp = s["phases"]["mlp"]
    assert mlp["mean_s"] == pytest.approx((0.4 + 0.6) / 2)  # per-rank sums over 2 layers
    assert mlp["max_s"] == pytest.approx(0.6)
    assert mlp["imbalance"] == pytest.approx(1.2)
    assert s["phases"]["qkv"]["imbalance"] == pytest.approx(1.0)
    assert s["head_partition"] == [6, 6]
    assert s["checksum"] == {"count": 2, "passed": 2, "max_ratio": 0.25, "retries": 1}
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "heads per rank [6, 6]" in out and "mlp" in out and "2 passed" in out


def test_scaling_table_speedup_and_efficiency(tmp_path, capsys):
    paths = [write_run(tmp_path / f"s{n}.h5", n, t) for n, t in ((1, 4.0), (2, 2.5), (4, 2.0))]
    assert main(["report", "--json", *map(str, paths)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["scaling"]["rows"]
    assert [r["ranks"] for r in rows] == [1, 2, 4]
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 1.6, 2.0])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.8, 0.5])
    assert data["scaling"]["same_model"] is True


def test_different_models_are_flagged(tmp_path, capsys):
    a = write_run(tmp_path / "a.h5", 1, 1.0, hidden=96)
    b = write_run(tmp_path / "b.h5", 2, 1.0, hidden=192)
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the files do not describe the same model" in out
    assert "model.hidden = 192" in out


def test_training_summary_and_missing_groups(tmp_path):
    path = write_run(tmp_path / "t.h5", 1, 1.0, checksums=False, train=True)
    s = report.summarize(report.load(path))
    assert "checksum" not in s
    assert s["train"]["first_loss"] == pytest.approx(7.0)
    assert s["train"]["last_loss"] == pytest.approx(5.0)
    assert s["train"]["min_loss"] == pytest.approx(5.0)
    assert s["train"]["last_eval_loss"] == pytest.approx(5.5)
    assert s["train"]["last_eval_step"] == 20


def test_other_format_version_and_bare_file(tmp_path, capsys):
    path = write_run(tmp_path / "v3.h5", 1, 1.0, version=3)
    assert main(["report", str(path)]) == 0
    assert "format_version 3" in capsys.readouterr().err
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.attrs["world_size"] = 3
    s = report.summarize(report.load(bare))
    assert s["world_size"] == 3 and "phases" not in s and "train" not in s
    assert main(["report", str(tmp_path / "missing.h5")]) == 2


def test_no_mpi_or_scipy_imported(tmp_path):
    path = write_run(tmp_path / "a.h5", 2, 1.0)
    code = ("import sys; from mpiattn.commands.cli import main;"
            "assert main(['report', sys.argv[1]]) == 0;"
            "bad = [m for m in ('mpi4py', 'scipy', 'matplotlib', 'pandas', 'xarray')"
            " if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    paths = [write_run(tmp_path / f"s{n}.h5", n, 4.0 / n ** 0.5) for n in (1, 2, 4)]
    paths.append(write_run(tmp_path / "t.h5", 1, 1.0, train=True))
    out = tmp_path / "r.png"
    assert main(["report", *map(str, paths), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    path = write_run(tmp_path / "a.h5", 1, 1.0)
    assert main(["report", str(path), "--plot", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'mpiattn[plot]'" in err[0]
