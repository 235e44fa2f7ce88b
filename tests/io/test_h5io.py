"""Atomic writes, refusal to clobber, and offline verification of finished files."""

import h5py
import numpy as np
import pytest

from mpiattn.errors import UserError
from mpiattn.io import h5io, outfile
from mpiattn.io.verify import verify


def finished_file(path, shape=(4, 16, 32)):
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with h5io.atomic_file(path) as f:
        h5io.write_array(f, "layers/00/hidden", data, ("batch", "seq", "hidden_unit"),
                         digest=True)
        h5io.write_array(f, "small", np.arange(5.0), ("x",), digest=True)
        f.attrs["status"] = "complete"
    return data


def test_atomic_file_appears_only_on_success(tmp_path):
    path = tmp_path / "out.h5"
    with pytest.raises(RuntimeError), h5io.atomic_file(path) as f:
        f["x"] = np.zeros(3)
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    data = finished_file(path)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["layers/00/hidden"][()], data)
        assert f["layers/00/hidden"].fletcher32 and f["layers/00/hidden"].chunks
    assert list(tmp_path.iterdir()) == [path]


def test_output_reservation_refuses_to_clobber(tmp_path):
    path = tmp_path / "out.h5"
    path.write_bytes(b"precious")
    with pytest.raises(UserError, match="--force"):
        _ = outfile.Reservation.make(path, False).path
    assert outfile.Reservation.make(path, True).path == path
    with pytest.raises(UserError, match="does not exist"):
        _ = outfile.Reservation.make(tmp_path / "no" / "x.h5", False).path


def test_unwritable_folder_is_reported_and_nothing_is_touched(tmp_path):
    import os

    if os.geteuid() == 0:  # root writes anywhere: use a path under a file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(UserError, match="does not exist"):
            _ = outfile.Reservation.make(blocker / "out.h5", False).path
        return
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(UserError, match="not writable"):
        _ = outfile.Reservation.make(folder / "out.h5", False).path


def test_verify_accepts_a_sound_file(tmp_path):
    finished_file(tmp_path / "ok.h5")
    assert verify(tmp_path / "ok.h5") == []


@pytest.mark.parametrize("name", ["layers/00/hidden", "small"])
def test_verify_catches_a_flipped_byte(tmp_path, name):
    path = tmp_path / "x.h5"
    finished_file(path)
    with h5py.File(path) as f:
        dset = f[name]
        offset = dset.id.get_chunk_info(0).byte_offset if dset.chunks else dset.id.get_offset()
    raw = bytearray(path.read_bytes())
    raw[offset + 10] ^= 0x04
    path.write_bytes(bytes(raw))
    problems = verify(path)
    assert len(problems) == 1 and f"/{name}" in problems[0]


def test_verify_catches_incomplete_and_failed_records(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.attrs["status"] = "writing"
    assert "not 'complete'" in verify(path)[0]
    from mpiattn.io.collectives import RECORD_DTYPE, site_codes

    with h5py.File(path, "w") as f:
        f.attrs["status"] = "complete"
        table = np.zeros(2, RECORD_DTYPE)
        table["passed"] = [1, 0]
        table["site"] = site_codes(["attention", "mlp"])
        f["checksum/collectives"] = table
    assert "site 'mlp' failed" in verify(path)[0]


def test_verify_rejects_non_hdf5(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        verify(path)
