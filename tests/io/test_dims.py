"""Named dimensions (format 2): every axis of every file kind is an HDF5 dimension scale
that netCDF-4 readers find, so xarray (h5netcdf) and ``ncdump`` show named, aligned axes
and no ``phony_dim``; units parse with UDUNITS-2; format-1 files still read.

The files are ``conftest.written_files`` (about 5 s, shared with test_hdf5_compat.py).
Units are parsed with cf-units (UDUNITS-2, a test extra) when it imports, else checked
against the units the README lists.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import dim_names

from mpiattn.analysis import report
from mpiattn.io import h5io
from mpiattn.io.collectives import site_names
from mpiattn.io.formats.common import PHASES
from mpiattn.io.formats.train import TRAIN_PHASES
from mpiattn.io.verify import verify

xr = pytest.importorskip("xarray")
pytest.importorskip("h5netcdf")

# the units of format 2 (README, "HDF5 file"), for machines without cf-units
UDUNITS_ALLOWLIST = {"s", "bytes", "bytes/s", "1/s", "1"}


def groups(path: Path) -> list[str]:
    """Every group of the file that holds a dataset, '/' included."""
    found = {"/"}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.add("/" + name.rsplit("/", 1)[0] if "/" in name
                                                 else "/")
                     if isinstance(obj, h5py.Dataset) else None)
    return sorted(found)


def open_group(path: Path, group: str):
    return xr.open_dataset(path, engine="h5netcdf", group=group)


@pytest.mark.parametrize("kind", ["run", "text", "bench", "train", "checkpoint"])
def test_every_group_has_named_dimensions(written_files, kind):
    path = written_files[kind]
    for group in groups(path):
        with open_group(path, group) as ds:
            for name, var in ds.variables.items():
                assert not any(d.startswith("phony_dim") for d in var.dims), (group, name,
                                                                              var.dims)
    with h5py.File(path, "r") as f:  # every axis of every array has its scale
        assert f.attrs["format_version"] == h5io.FORMAT_VERSION == 2
        f.visititems(lambda name, obj: _check_scaled(name, obj))
    # the scales' object references (DIMENSION_LIST, REFERENCE_LIST) are attributes, not
    # links: h5safe opens the file and verify finds no object under two names
    assert verify(path) == []


def _check_scaled(name: str, obj) -> None:
    if not isinstance(obj, h5py.Dataset) or obj.attrs.get("CLASS") == b"DIMENSION_SCALE":
        return
    assert all(len(d) == 1 for d in obj.dims), f"/{name} has an axis without its dimension"


def test_run_file_dimensions_and_coordinates(written_files):
    path = written_files["run"]
    with open_group(path, "timings") as ds:
        assert ds["seconds"].dims == ("rank", "layer", "phase")
        assert list(ds["phase"].values) == list(PHASES)
        assert ds["seconds"].attrs["units"] == "s"
        assert ds["seconds"].sel(phase="mlp").shape == (1, 2)
    with open_group(path, "layers/01") as ds:
        assert ds["hidden"].dims == ("batch", "seq", "hidden_unit")
    with open_group(path, "input") as ds:
        assert ds["tokens"].dims == ("batch", "seq")
    with open_group(path, "ranks") as ds:
        assert ds["host"].dims == ds["peak_memory"].dims == ("rank",)
        assert ds["peak_memory"].attrs["units"] == "bytes"
    with open_group(path, "heads") as ds:
        assert ds["entropy"].dims == ("layer", "head")
        assert ds["maps"].dims == ("sequence", "layer", "head", "query", "key")
        assert list(ds["sequence"].values) == [0, 2]  # rows of /input/tokens
    with open_group(path, "/") as ds:  # shared by /ranks, /timings, /layers, /heads, /input
        assert set(ds.coords) == {"rank", "layer", "batch", "seq", "hidden_unit"}
    with h5py.File(path, "r") as f:  # one rank dimension for /ranks and /timings
        assert dim_names(f["ranks/host"]) == ["rank"]
        assert f["ranks/host"].dims[0][0] == f["timings/total"].dims[0][0] == f["rank"]


def test_text_run_file_dimensions(written_files):
    path = written_files["text"]
    with open_group(path, "input") as ds:
        assert ds["text"].dims == ("line",) and ds["tokens"].dims == ("token",)
        assert ds["offsets"].dims == ("line_edge",)
        assert ds.sizes["line"] == 3 and ds.sizes["line_edge"] == 4
    with open_group(path, "output") as ds:
        assert ds["pooled"].dims == ("line", "hidden_unit")
    with open_group(path, "layers/05") as ds:
        assert ds["hidden"].dims == ("token", "hidden_unit")
        assert "token" not in ds.coords  # an index-only dimension: nothing read on opening
    with open_group(path, "work") as ds:
        assert ds["tokens"].dims == ("rank",)


def test_bench_file_dimensions(written_files):
    path = written_files["bench"]
    with open_group(path, "bench/allreduce") as ds:
        assert ds["busbw"].dims == ("bytes",) and "bytes" in ds.coords
        assert ds["busbw"].attrs["units"] == "bytes/s"
        assert ds["bytes"].attrs["units"] == "bytes"
    with open_group(path, "bench/phases") as ds:
        assert ds["seconds"].dims == ("rank", "phase")
        assert list(ds["phase"].values) == list(PHASES)
    with open_group(path, "bench") as ds:
        assert ds["sweep"].dims == ("point", "field")
        assert list(ds["field"].values) == ["seq_len", "seconds", "flops_per_second"]
    with open_group(path, "bench/gemm") as ds:
        assert ds["flops_per_second"].attrs["units"] == "1/s"
        assert "floating-point" in ds["flops_per_second"].attrs["long_name"]


@pytest.mark.parametrize("kind", ["train", "checkpoint"])
def test_train_history_has_a_step_and_an_eval_step_dimension(written_files, kind):
    with open_group(written_files[kind], "train") as ds:
        assert ds["loss"].dims == ("step",) and list(ds["step"].values) == [0, 1, 2]
        assert ds["eval_loss"].dims == ("eval_step",)
        assert list(ds["eval_step"].values) == [-1, 2]  # the starting and the final model
    if kind == "train":
        with open_group(written_files[kind], "timings") as ds:
            assert ds["seconds"].dims == ("rank", "session_step", "phase")
            assert list(ds["phase"].values) == list(TRAIN_PHASES)
            assert list(ds["session_step"].values) == [0, 1, 2]


def test_checkpoint_dimensions(written_files):
    path = written_files["checkpoint"]
    with open_group(path, "params") as ds:
        word = ds["bert.embeddings.word_embeddings.weight"]
        assert word.dims == ("model_id", "hidden_unit")
        assert ds["bert.encoder.layer.0.intermediate.dense.weight"].dims == ("ffn_unit",
                                                                             "hidden_unit")
        assert ds["bert.encoder.layer.0.output.dense.weight"].dims == ("hidden_unit",
                                                                       "ffn_unit")
        assert ds["bert.encoder.layer.0.attention.self.query.weight"].dims == (
            "hidden_out", "hidden_unit")
    with open_group(path, "vocab") as ds:
        assert ds["token_ids"].dims == ("model_id",)
    with open_group(path, "tokenizer") as ds:
        assert ds["tokenizer.json"].dims == ("tokenizer_json_byte",)


@pytest.mark.parametrize("kind", ["run", "text", "bench", "train", "checkpoint"])
def test_units_parse_with_udunits(written_files, kind):
    found: dict[str, str] = {}
    with h5py.File(written_files[kind], "r") as f:
        f.visititems(lambda name, obj: found.update({name: obj.attrs["units"]})
                     if "units" in obj.attrs else None)
    assert found
    try:
        import cf_units
    except ImportError:
        cf_units = None
    for name, units in found.items():
        if cf_units is not None:
            cf_units.Unit(units)  # raises ValueError on what UDUNITS-2 cannot parse
        assert units in UDUNITS_ALLOWLIST, (name, units)


@pytest.mark.skipif(shutil.which("ncdump") is None, reason="ncdump (netcdf-bin) not installed")
@pytest.mark.parametrize("kind", ["run", "text", "bench", "train", "checkpoint"])
def test_ncdump_reads_every_kind_of_file(written_files, kind):
    done = subprocess.run(["ncdump", "-h", str(written_files[kind])], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "phony_dim" not in done.stdout and "dimensions:" in done.stdout


def test_dimension_of_another_length_is_refused(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        h5io.write_array(f, "a", np.zeros(3), ("rank",))
        with pytest.raises(ValueError, match="name the axis differently"):
            h5io.write_array(f, "b", np.zeros(4), ("rank",))
        h5io.write_array(f, "hidden", np.zeros((3, 2)), ("rank", "x"))
        with pytest.raises(ValueError, match="not the dimension 'hidden'"):
            h5io.write_array(f, "c", np.zeros(2), ("hidden",))


def test_collectives_table_has_a_record_dimension(tmp_path):
    from mpiattn.io.formats.common import write_records
    from mpiattn.parallel.transfers import Record

    path = tmp_path / "r.h5"
    with h5py.File(path, "w", libver=h5io.LIBVER) as f:
        write_records(f, [(0, Record(0, "attention", 1e-9, 1e-6, 1e-3, True, 0, 1)),
                          (1, Record(1, "mlp", 1e-9, 1e-6, 1e-3, True, 0, 2))])
    with open_group(path, "checksum") as ds:
        assert ds["collectives"].dims == ("record",)
        assert list(site_names(ds["collectives"].values)) == [b"attention", b"mlp"]


def test_a_long_index_only_dimension_passes_the_size_rule(tmp_path):
    """``token`` has no coordinate; its stored zeros keep h5safe's size rule (at most
    16 MiB + 2048 x stored) for corpora of more than 16 M tokens."""
    from mpiattn.io import h5safe

    path = tmp_path / "t.h5"
    n = h5safe.FLOOR_BYTES + 4096
    with h5py.File(path, "w", libver=h5io.LIBVER) as f:
        scale = h5io.dimension(f, "token", size=n)
        assert scale.id.get_storage_size() < n // 500
    with h5safe.open_for_reading(path) as f:
        assert f["token"].shape == (n,)


def to_format_1(src: Path, dst: Path) -> None:
    """The file as format 1 wrote it: the same arrays and attributes with dimension labels
    instead of scales, units B, format_version 1."""
    skip = {"CLASS", "NAME", "REFERENCE_LIST", "DIMENSION_LIST"}
    with h5py.File(src, "r") as f, h5py.File(dst, "w", libver=h5io.LIBVER) as out:
        def copy(name: str, obj) -> None:
            if isinstance(obj, h5py.Group):
                out.require_group(name)
            elif obj.attrs.get("CLASS") != b"DIMENSION_SCALE":
                new = out.create_dataset(name, data=obj[()], dtype=obj.dtype)
                for key in obj.attrs:
                    if key not in skip:
                        new.attrs[key] = obj.attrs[key]
                if new.attrs.get("units") == "bytes":
                    new.attrs["units"] = "B"
                for axis, d in enumerate(obj.dims):
                    new.dims[axis].label = d[0].name.rsplit("/", 1)[-1].replace(
                        "hidden_unit", "hidden")

        f.visititems(copy)
        for key in f.attrs:
            out.attrs[key] = f.attrs[key]
        out.attrs["format_version"] = 1


def test_format_1_files_still_verify_and_report(written_files, tmp_path, capsys):
    old = tmp_path / "v1.h5"
    to_format_1(written_files["run"], old)
    with h5py.File(old, "r") as f:
        assert not [n for n, o in f.items() if isinstance(o, h5py.Dataset)]  # no scales
        assert f["timings/seconds"].dims[2].label == "phase"
    assert verify(old) == []
    assert verify(written_files["run"]) == []
    v1, v2 = report.load(old), report.load(written_files["run"])
    assert v1.format_version == 1 and v2.format_version == 2
    assert v1.phases == v2.phases == list(PHASES)
    np.testing.assert_array_equal(v1.seconds, v2.seconds)
    assert report.summarize(v1)["phases"] == report.summarize(v2)["phases"]
    assert "note" not in capsys.readouterr().err  # both versions are known


def test_verify_fails_a_format_2_axis_without_its_scale(written_files, tmp_path):
    import shutil

    from mpiattn.io.verify import verify

    path = tmp_path / "run.h5"
    shutil.copy(written_files["run"], path)
    assert verify(path) == []
    with h5py.File(path, "a") as f:
        dset = f["timings/seconds"]
        dset.dims[1].detach_scale(dset.dims[1][0])
    assert verify(path) == ["dataset /timings/seconds: axis 1 has no dimension scale (format 2"
                            " names every axis)"]
