"""The HDF5 file: written atomically, self-describing, re-checkable offline.

A file is written under a temporary name in its final directory and renamed when
``status = "complete"`` has been set, so a crash never leaves a complete-looking file.
Every representation carries a SHA-256 digest attribute; ``verify`` re-checks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, UserError

FORMAT_VERSION = 1
DIGEST_ATTR = "sha256"


def layer_group(index: int) -> str:
    return f"layers/{index:02d}"


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse to clobber a file without --force, and fail early on an unwritable folder."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"output '{path}' exists: pass --force to overwrite it, or -o NEW.h5")
    if path.is_dir():
        raise UserError(f"output '{path}' is a directory: give a file name with -o")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder '{folder}' does not exist: create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder '{folder}' is not writable: choose another -o")
    stale = stale_temporaries(path)
    if stale:
        print(f"mpiattn: note: {len(stale)} temporary file(s) of interrupted writes beside"
              f" '{path}' (safe to delete): {', '.join(p.name for p in stale)}",
              file=sys.stderr, flush=True)
    return path


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _dataset_options(array: np.ndarray, compression: str) -> dict[str, Any]:
    """Chunked, checksummed (fletcher32) and optionally compressed for arrays worth it."""
    if array.ndim == 0 or array.nbytes < 4096 or array.dtype.kind not in "fiub":
        return {}
    opts: dict[str, Any] = {"chunks": True, "fletcher32": True}
    if compression != "none":
        opts["compression"] = compression
        opts["shuffle"] = True
    return opts


def write_array(group: Any, name: str, array: np.ndarray, labels: tuple[str, ...] = (),
                compression: str = "none", digest: bool = False, **attrs: Any) -> Any:
    """A dataset with dimension labels, attributes and (optionally) its SHA-256 digest."""
    array = np.asarray(array)
    dset = group.create_dataset(name, data=array, **_dataset_options(array, compression))
    for axis, label in enumerate(labels):
        dset.dims[axis].label = label
    for key, value in attrs.items():
        dset.attrs[key] = value
    if digest:
        dset.attrs[DIGEST_ATTR] = sha256(array)
    return dset


def label_and_digest(node: Any) -> None:
    """Dimension labels and SHA-256 digests for representations written by other ranks:
    (batch, seq, hidden) layer outputs and (batch, hidden) pooled embeddings."""
    import h5py

    dsets = [node] if isinstance(node, h5py.Dataset) else []
    if not dsets:
        node.visititems(lambda _, obj: dsets.append(obj) if isinstance(obj, h5py.Dataset)
                        else None)
    for dset in dsets:
        labels = ("batch", "seq", "hidden") if dset.ndim == 3 else ("batch", "hidden")
        for axis, label in enumerate(labels[: dset.ndim]):
            dset.dims[axis].label = label
        dset.attrs[DIGEST_ATTR] = sha256(dset[()])


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Any]:
    """An h5py File built in memory, written to ``path`` only if the block succeeds.

    The caller sets ``status = "complete"`` as the block's last act. The finished image is
    written to ``.NAME.tmp-PID`` beside ``path`` with plain file I/O, fsynced and renamed
    over ``path``: on any failure (a full disk included) the temporary file is removed,
    an existing ``path`` is untouched, and the error is one line.
    """
    import h5py

    path = Path(path)
    tmp = temporary(path)
    memory = io.BytesIO()  # closed before its bytes are taken: a whole, consistent file
    f = h5py.File(memory, "w", libver="latest")
    try:
        f.attrs["status"] = "writing"
        yield f
    finally:
        f.close()
    _publish(tmp, path, memory.getbuffer())


def _publish(tmp: Path, path: Path, image: Any = None) -> None:
    """Write ``image`` to ``tmp`` (when given), fsync it and rename it over ``path``: the
    bytes are on disk before the name points at them. An OSError (a full disk) removes
    ``tmp``, leaves ``path`` as it was, and becomes one line."""
    try:
        with open(tmp, "wb" if image is not None else "rb+") as fh:
            if image is not None:
                fh.write(image)
                fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise UserError(f"cannot write '{path}': {reason}; earlier files are untouched"
                        ) from None


def temporary(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def has_parallel_hdf5() -> bool:
    """True when h5py is built with MPI (e.g. Debian's python3-h5py-mpi under mpirun)."""
    import h5py

    return bool(h5py.get_config().mpi)


def write_rows_parallel(tmp: str | Path, comm: Any, start: int, total: int,
                        arrays: dict[str, np.ndarray]) -> None:
    """Collective: every rank of ``comm`` writes its rows ``start:start+len`` of each array
    into one new file with the ``mpio`` driver (datasets created by all, in one order)."""
    import h5py

    with h5py.File(tmp, "w", driver="mpio", comm=comm) as f:
        f.attrs["status"] = "writing"
        for name in sorted(arrays):
            local = arrays[name]
            dset = f.create_dataset(name, shape=(total, *local.shape[1:]), dtype=local.dtype)
            dset[start : start + local.shape[0]] = local


@contextlib.contextmanager
def atomic_update(tmp: str | Path, path: str | Path) -> Iterator[Any]:
    """Finish a file that others wrote at ``tmp`` (serially, on one rank), then rename it
    to ``path`` as ``atomic_file`` does; on failure ``tmp`` is removed."""
    import h5py

    tmp, path = Path(tmp), Path(path)
    try:
        with h5py.File(tmp, "a") as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, path)


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporary files left by interrupted writes of ``path`` (safe to delete)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def open_for_reading(path: str | Path) -> Any:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}' does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"'{path}' is not a readable HDF5 file ({err})") from None


def verify(path: str | Path) -> list[str]:
    """Problems found in a finished file (empty when it is sound); no MPI needed.

    Checks: ``status == "complete"``, every dataset with a digest still matches it (HDF5's
    fletcher32 also fails a read of a corrupted chunk), and every recorded collective passed.
    """
    problems: list[str] = []
    with open_for_reading(path) as f:
        status = f.attrs.get("status", "")
        status = status.decode() if isinstance(status, bytes) else str(status)
        if status != "complete":
            problems.append(f"status is '{status or 'missing'}', not 'complete'")
        hashed: list[tuple[str, Any]] = []
        f.visititems(lambda name, obj: hashed.append((name, obj))
                     if DIGEST_ATTR in getattr(obj, "attrs", {}) else None)
        for name, dset in hashed:
            try:
                data = dset[()]
            except OSError as err:
                problems.append(f"dataset /{name} cannot be read ({err}): corrupted")
                continue
            if sha256(data) != dset.attrs[DIGEST_ATTR]:
                problems.append(f"dataset /{name} does not match its sha256 digest")
        if "checksum/collectives" in f:
            table = f["checksum/collectives"][()]
            for row in table[~table["passed"].astype(bool)]:
                site = row["site"].decode() if isinstance(row["site"], bytes) else row["site"]
                problems.append(f"collective replica {row['replica']} layer {row['layer']}"
                                f" site '{site}' failed its checksum")
    return problems
