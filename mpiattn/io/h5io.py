"""The HDF5 file: written atomically, self-describing, re-checkable offline.

A file is written under a temporary name in its final directory and renamed when
``status = "complete"`` has been set, so a crash never leaves a complete-looking file.
Every representation carries a SHA-256 digest attribute; ``verify`` re-checks them.

Every axis of every dataset is a named dimension (format 2): an HDF5 dimension scale, as
netCDF-4 writes them, so ``xarray.open_dataset(path, engine="h5netcdf", group=...)`` and
``ncdump`` show named, aligned axes (``dimension``, ``attach_dimensions``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import outfile

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI

FORMAT_VERSION = 2  # 2: dimension scales and UDUNITS units (1: labels only)
DIGEST_ATTR = "sha256"
# object formats of HDF5 1.10, both bounds: "latest" with the h5py 3.16 wheel writes HDF5
# 2.0 formats that h5dump 1.10, netCDF and h5py on HDF5 <= 1.14 cannot read
LIBVER = ("v110", "v110")


def layer_group(index: int) -> str:
    return f"layers/{index:02d}"


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def text_sha256(strings: Any, hasher: Any = None) -> Any:
    """SHA-256 of strings as a text dataset's digest: each one's UTF-8 bytes and a NUL
    (``h5safe.scan`` reads it back so). With ``hasher``, updates it and returns it."""
    h = hasher if hasher is not None else hashlib.sha256()
    for text in strings:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h if hasher is not None else h.hexdigest()


def _dataset_options(array: np.ndarray, compression: str) -> dict[str, Any]:
    """Chunked, checksummed (fletcher32) and optionally compressed for arrays worth it."""
    if array.ndim == 0 or array.nbytes < 4096 or array.dtype.kind not in "fiub":
        return {}
    opts: dict[str, Any] = {"chunks": True, "fletcher32": True}
    if compression != "none":
        opts["compression"] = compression
        opts["shuffle"] = True
    return opts


# A dimension scale netCDF-4 shows as a dimension without a coordinate variable (its NAME
# attribute, as netCDF-C and h5netcdf write it, followed by the length in 10 characters).
NOT_A_VARIABLE = "This is a netCDF dimension but not a netCDF variable."
# Dimensions shared by several groups: created at the file's root, where every group sees
# them (netCDF-4 looks a variable's dimensions up in its group and the groups above). Any
# other dimension is created in the group of the first array that has it.
ROOT_DIMENSIONS = frozenset({
    "rank", "layer", "batch", "seq", "hidden_unit",  # run and bench files
    "line", "line_edge", "token",  # text-corpus runs
    "model_id", "position", "token_type", "ffn_unit", "hidden_out",  # checkpoints
})
# Dimensions without a coordinate variable: the ragged token axis of a text-corpus run can
# hold billions of positions, and xarray would read a coordinate of them whole on opening.
INDEX_ONLY = frozenset({"token"})
_ZEROS_BLOCK = 1 << 20  # elements of an index-only dimension written at a time


def _string_data(array: np.ndarray) -> tuple[np.ndarray, Any]:
    """(data, dtype) for h5py: NumPy unicode or object text as variable-length UTF-8."""
    import h5py

    if array.dtype.kind in "UO":
        return array.astype(object), h5py.string_dtype()
    return array, None


def write_array(group: Any, name: str, array: Any, dims: tuple[str, ...] = (),
                compression: str = "none", digest: bool = False,
                coords: dict[str, Any] | None = None, **attrs: Any) -> Any:
    """A dataset with named dimensions (``attach_dimensions``: ``dims`` gives one name per
    axis, ``coords`` the values of a dimension created here), attributes and (optionally)
    its SHA-256 digest. Text (a list of ``str``) is stored as variable-length UTF-8."""
    array, dtype = _string_data(np.asarray(array))
    dset = group.create_dataset(name, data=array, dtype=dtype,
                                **_dataset_options(array, compression))
    attach_dimensions(dset, dims, coords)
    for key, value in attrs.items():
        dset.attrs[key] = value
    if digest:
        dset.attrs[DIGEST_ATTR] = sha256(array)
    return dset


def dimension(group: Any, name: str, values: Any = None, size: int | None = None,
              **attrs: Any) -> Any:
    """The dimension ``name`` of ``group`` (an HDF5 dimension scale), created on the first
    call: a coordinate variable holding ``values`` (indices, phase names, step numbers,
    message sizes...), or, with ``values`` None, a dimension of ``size`` without one
    (``NOT_A_VARIABLE``; its zeros compress to almost nothing). A later call returns the
    same dataset; one that disagrees on the length or the values raises ``ValueError``
    (a layout error: arrays of different lengths need differently named axes)."""
    length = len(values) if values is not None else size
    if length is None:
        raise ValueError(f"dimension '{name}': give its values or its size")
    found = group.get(name)
    if found is not None:
        if not _is_scale(found) or found.shape != (length,):
            raise ValueError(f"{found.name} is not a dimension of length {length}: name the"
                             " axis differently")
        if values is not None and (_is_index_only(found) or
                                   _coordinate(found) != np.asarray(values).tolist()):
            raise ValueError(f"dimension {found.name} holds other values")
        return found
    if values is not None:
        data, dtype = _string_data(np.asarray(values))
        dset = group.create_dataset(name, data=data, dtype=dtype,
                                    **_dataset_options(data, "none"))
        dset.make_scale(name)
    else:
        chunk = min(length, _ZEROS_BLOCK)
        dset = group.create_dataset(name, shape=(length,), dtype=np.uint8,
                                    **({"chunks": (chunk,), "compression": "gzip"}
                                       if length else {}))
        for start in range(0, length, chunk or 1):  # stored, so h5safe's size rule holds
            dset[start : start + chunk] = np.zeros(min(chunk, length - start), np.uint8)
        dset.make_scale(f"{NOT_A_VARIABLE}{length:10d}")
    for key, value in attrs.items():
        dset.attrs[key] = value
    return dset


def find_dimension(group: Any, name: str) -> Any:
    """The dimension scale ``name`` in ``group`` or the nearest group above it, as netCDF-4
    finds a variable's dimensions; None when there is none. A dataset of that name that is
    not a dimension scale raises ``ValueError`` (netCDF readers would take the array for
    the axis' coordinate)."""
    import h5py

    while True:
        found = group.get(name)
        if isinstance(found, h5py.Dataset):
            if not _is_scale(found):
                raise ValueError(f"{found.name} is an array, not the dimension '{name}': name"
                                 " the axis differently")
            return found
        if group.name == "/":
            return None
        group = group.parent


def attach_dimensions(dset: Any, dims: tuple[str, ...],
                      coords: dict[str, Any] | None = None) -> None:
    """Name every axis of ``dset``: ``dims[i]`` is axis i's dimension, found with
    ``find_dimension`` or else created (``dimension``) at the root for ``ROOT_DIMENSIONS``,
    in ``dset``'s group otherwise, holding ``coords[name]``, or indices 0..n-1, or nothing
    for ``INDEX_ONLY``. A 1-D dataset named as its dimension becomes that dimension's
    coordinate variable itself (``/train/step``, ``/bench/allreduce/bytes``)."""
    if len(dims) != dset.ndim:
        raise ValueError(f"{dset.name} has {dset.ndim} axes but {len(dims)} dimension names")
    for axis, name in enumerate(dims):
        n = dset.shape[axis]
        if dset.ndim == 1 and dset.name.rsplit("/", 1)[-1] == name:
            dset.make_scale(name)
            continue
        scale = find_dimension(dset.parent, name)
        if scale is None:
            home = dset.file if name in ROOT_DIMENSIONS else dset.parent
            values = (coords or {}).get(name)
            if values is None and name not in INDEX_ONLY:
                values = np.arange(n, dtype=np.int64)
            scale = dimension(home, name, values, size=n)
        if scale.shape != (n,):
            raise ValueError(f"axis {axis} of {dset.name} ('{name}') has length {n}, the"
                             f" dimension {scale.name} {scale.shape[0]}: name the axis"
                             " differently")
        dset.dims[axis].attach_scale(scale)
        dset.dims[axis].label = name  # h5py's and format 1's name of the axis


def _is_scale(dset: Any) -> bool:
    import h5py

    return isinstance(dset, h5py.Dataset) and dset.attrs.get("CLASS") == b"DIMENSION_SCALE"


def _coordinate(dset: Any) -> list:
    """A coordinate variable's values as a list (text as ``str``)."""
    import h5py

    if h5py.check_string_dtype(dset.dtype) is not None:
        return list(dset.asstr()[()])
    return dset[()].tolist()


def _is_index_only(dset: Any) -> bool:
    name = dset.attrs.get("NAME", b"")
    return (name if isinstance(name, bytes) else str(name).encode()).startswith(
        NOT_A_VARIABLE.encode())


def label_and_digest(node: Any) -> None:
    """Dimensions and SHA-256 digests for representations written by other ranks:
    (batch, seq, hidden_unit) layer outputs and (batch, hidden_unit) pooled embeddings."""
    import h5py

    dsets = [node] if isinstance(node, h5py.Dataset) else []
    if not dsets:
        node.visititems(lambda _, obj: dsets.append(obj) if isinstance(obj, h5py.Dataset)
                        else None)
    for dset in dsets:
        attach_dimensions(dset, ("batch", "seq", "hidden_unit") if dset.ndim == 3
                          else ("batch", "hidden_unit"))
        dset.attrs[DIGEST_ATTR] = sha256(dset[()])


def reserve(out: outfile.Reservation | str | Path) -> outfile.Reservation:
    """``out`` itself, or a fresh reservation of a path (refusing an existing file)."""
    return out if isinstance(out, outfile.Reservation) else outfile.Reservation.make(out, False)


@contextlib.contextmanager
def atomic_file(out: outfile.Reservation | str | Path) -> Iterator[Any]:
    """An h5py File built in memory, published under ``out``'s name only if the block
    succeeds.

    The caller sets ``status = "complete"`` as the block's last act. The finished image is
    written to the reservation's exclusive temporary with plain file I/O, fsynced and
    renamed onto the final name without replacing another file (unless --force): on any
    failure (a full disk included) the temporary is removed, an existing file is
    untouched, and the error is one line.
    """
    import h5py

    out = reserve(out)
    memory = io.BytesIO()  # closed before its bytes are taken: a whole, consistent file
    try:
        f = h5py.File(memory, "w", libver=LIBVER)
        try:
            f.attrs["status"] = "writing"
            yield f
        finally:
            f.close()
        try:
            out.write(memory.getbuffer())
        except OSError as err:
            from .diskfull import reason

            raise UserError(f"cannot write '{out.path}': {reason(err)}; earlier files are"
                            " untouched") from None
        out.publish()
    finally:
        out.discard()


def has_parallel_hdf5() -> bool:
    """True when h5py is built with MPI (e.g. Debian's python3-h5py-mpi under mpirun)."""
    import h5py

    return bool(h5py.get_config().mpi)


def write_rows_parallel(tmp: str | Path, comm: MPI.Comm, start: int, total: int,
                        arrays: dict[str, np.ndarray]) -> None:
    """Collective: every rank of ``comm`` writes its rows ``start:start+len`` of each array
    into one new file with the ``mpio`` driver (datasets created by all, in one order)."""
    import h5py

    with h5py.File(tmp, "w", driver="mpio", comm=comm, libver=LIBVER) as f:
        f.attrs["status"] = "writing"
        for name in sorted(arrays):
            local = arrays[name]
            dset = f.create_dataset(name, shape=(total, *local.shape[1:]), dtype=local.dtype)
            dset[start : start + local.shape[0]] = local


@contextlib.contextmanager
def atomic_update(out: outfile.Reservation) -> Iterator[Any]:
    """Finish a file that others wrote into ``out``'s temporary (serially, on one rank),
    then publish it as ``atomic_file`` does; on failure the temporary is removed."""
    import h5py

    from .diskfull import give_back, quiet_h5, reason

    seen: list[str] = []
    try:
        try:
            with quiet_h5() as seen, h5py.File(out.create(), "a") as f:
                try:
                    yield f
                except BaseException:
                    give_back(out.tmp)  # room to close it: else HDF5 crashes at exit
                    raise
        except (OSError, RuntimeError) as err:  # a full disk: one line, not a flood
            raise UserError(f"cannot write '{out.path}': {reason(err, seen)}; earlier files"
                            " are untouched") from None
        out.publish()
    finally:
        out.discard()


def open_for_reading(path: str | Path) -> Any:
    """An h5py File holding only its own bytes: ``h5safe.open_for_reading`` (one-line
    ``InputError`` for a missing or non-HDF5 file, external/soft links, external storage,
    virtual datasets, plugin filters and implausible declared sizes)."""
    from . import h5safe

    return h5safe.open_for_reading(path)
