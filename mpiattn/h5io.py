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
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import outfile
from .errors import InputError, UserError

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
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise UserError(f"cannot write '{out.path}': {reason}; earlier files are"
                            " untouched") from None
        out.publish()
    finally:
        out.discard()


def has_parallel_hdf5() -> bool:
    """True when h5py is built with MPI (e.g. Debian's python3-h5py-mpi under mpirun)."""
    import h5py

    return bool(h5py.get_config().mpi)


def write_rows_parallel(tmp: str | Path, comm: Any, start: int, total: int,
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

    try:
        with h5py.File(out.create(), "a") as f:
            yield f
        out.publish()
    finally:
        out.discard()


def open_for_reading(path: str | Path) -> Any:
    """An h5py File holding only its own bytes: ``h5safe.open_for_reading`` (one-line
    ``InputError`` for a missing or non-HDF5 file, external/soft links, external storage,
    virtual datasets, plugin filters and implausible declared sizes)."""
    from . import h5safe

    return h5safe.open_for_reading(path)


def verify(path: str | Path) -> list[str]:
    """Problems found in a finished file (empty when it is sound); no MPI needed.

    Checks: ``status == "complete"``; the ``config`` attribute, when present, is TOML of at
    most ``h5safe.MAX_ATTR_BYTES``; every dataset with a digest still matches it (streamed
    in blocks, so memory stays bounded; HDF5's fletcher32 also fails a read of a corrupted
    chunk); no NaN/inf in ``/layers/*``, ``/heads/*``, a checkpoint's ``/params/*`` and
    ``/optimizer/*`` (whose tensors must all be there, with the model's shapes),
    ``/output/pooled``, ``/train/loss``,
    ``/train/eval_loss``, ``/train/grad_norm``; every recorded collective passed; no
    object is reached under two names (hard links); everything the root attributes and the
    ``config`` promise is there (``_promised``: inputs, kept layers and pooled output with
    digests, per-head statistics and maps, Allreduce records, one timing row and host per
    ``world_size``).
    Raises ``InputError`` (one line) when the file cannot be opened safely
    (``h5safe.open_for_reading``); anything else wrong is a one-line problem in the list.
    """
    import tomllib

    from . import h5safe

    finite_checked = ("output/pooled", "train/loss", "train/eval_loss", "train/grad_norm")
    problems: list[str] = []
    with open_for_reading(path) as f:
        status = _root_text(f, "status", problems, "")
        if status is not None and status != "complete":
            problems.append(f"status is '{status or 'missing'}', not 'complete'")
        config = _root_text(f, "config", problems)
        if config is not None:
            try:
                config = tomllib.loads(config)
            except tomllib.TOMLDecodeError as err:
                problems.append(f"attribute 'config' of / is not TOML ({h5safe.one_line(err)})")
                config = None
        try:
            found_datasets = h5safe.datasets(f)
        except h5safe.MALFORMED as err:
            found_datasets = []
            problems.append(f"the file's objects cannot be listed ({h5safe.one_line(err)}):"
                            " corrupted")
        for name, dset in found_datasets:
            finite = name.startswith(("layers/", "heads/", "params/", "optimizer/")) \
                or name in finite_checked
            try:
                want = h5safe.attr(dset, DIGEST_ATTR)
                if want is None and not finite:
                    continue
                want = None if want is None else h5safe.text(want, f"/{name} attribute"
                                                             f" '{DIGEST_ATTR}'")
                found = h5safe.scan(dset, digest=want is not None, finite=finite)
            except InputError as err:
                problems.append(h5safe.one_line(err))
                continue
            except h5safe.MALFORMED as err:
                problems.append(f"dataset /{name} cannot be read ({h5safe.one_line(err)}):"
                                " corrupted")
                continue
            if want is not None and found.sha256 != want:
                problems.append(f"dataset /{name} does not match its sha256 digest")
            elif found.first_nonfinite is not None:
                at = found.first_nonfinite
                problems.append(f"non-finite values in /{name} (first at index"
                                f" {at[0] if len(at) == 1 else at})")
        if "checksum/collectives" in f:
            try:
                table = h5safe.read(f["checksum/collectives"])
                for row in table[~table["passed"].astype(bool)]:
                    site = h5safe.text(row["site"], "a site in /checksum/collectives")
                    problems.append(f"collective replica {row['replica']} layer"
                                    f" {row['layer']} site '{site}' failed its checksum")
            except (*h5safe.MALFORMED, InputError) as err:
                problems.append(f"/checksum/collectives cannot be read"
                                f" ({h5safe.one_line(err)}): corrupted")
        try:  # a file sound so far is checked for what it lacks (no cascade of lines)
            problems += _shared_objects(f)
            if not problems:
                problems += _promised(f, config if isinstance(config, dict) else None)
        except InputError as err:
            problems.append(h5safe.one_line(err))
        except h5safe.MALFORMED as err:
            problems.append(f"the file's structure cannot be read ({h5safe.one_line(err)}):"
                            " corrupted")
        try:
            checkpoint = h5safe.attr(f, "command") == "train checkpoint"
        except (InputError, *h5safe.MALFORMED):
            checkpoint = False  # an unreadable root attribute: a problem found above
    if checkpoint and not problems:  # every tensor the model needs, with its shape
        from .checkpoints import read_model

        try:
            read_model(path, with_params=False)
        except InputError as err:
            problems.append(h5safe.one_line(err))
    return problems


def _shared_objects(f: Any) -> list[str]:
    """Objects reached under more than one name (hard links): a dataset is written once,
    under one name; a second name makes one array pass for two. Dimension scales are not
    a second name: HDF5 attaches them by object references in attributes
    (``DIMENSION_LIST``, ``REFERENCE_LIST``), which are not links."""
    import h5py

    names: dict[tuple[int, int], list[str]] = {}
    root = h5py.h5o.get_info(f.id)
    names[(int(root.fileno), int(root.addr))] = ["/"]
    todo: list[tuple[str, Any]] = [("", f.id)]
    while todo:
        prefix, gid = todo.pop()
        for raw in gid:
            where = f"{prefix}/{raw.decode('utf-8', 'replace')}"
            oid = h5py.h5o.open(gid, raw)
            info = h5py.h5o.get_info(oid)
            seen = names.setdefault((int(info.fileno), int(info.addr)), [])
            seen.append(where)
            if len(seen) == 1 and isinstance(oid, h5py.h5g.GroupID):
                todo.append((where, oid))
    return [f"{' and '.join(sorted(where))} are one object under {len(where)} names (hard"
            " links): each dataset of an mpiattn file has one name; the file was altered"
            for where in names.values() if len(where) > 1]


def _root_text(f: Any, name: str, problems: list[str], default: Any = None) -> str | None:
    """Root attribute ``name`` as text (``default`` when absent); an unreadable or
    non-UTF-8 one is a problem line and None."""
    from . import h5safe

    try:
        value = h5safe.attr(f, name, default)
        return None if value is None else h5safe.text(value, f"attribute '{name}' of /")
    except InputError as err:
        problems.append(h5safe.one_line(err))
    except h5safe.MALFORMED as err:
        problems.append(f"attribute '{name}' of / cannot be read ({h5safe.one_line(err)}):"
                        " corrupted")
    return None


def _promised(f: Any, config: dict | None) -> list[str]:
    """What the root attributes and the ``config`` TOML promise is there (README, "HDF5
    file"): run files their inputs, the layers ``output.layers`` keeps, the pooled output
    of text input, the Allreduce records of a checked head group; every file one timing
    row and one host per rank. Files without a ``command`` and ``format_version`` (not
    written by a command) are not checked."""
    from . import h5safe

    command = h5safe.attr(f, "command")
    if command is None:
        return (["root attribute 'command' is missing: cannot tell what the file should hold"]
                if "format_version" in f.attrs else [])
    command = h5safe.text(command, "attribute 'command' of /")
    if command == "train checkpoint":  # parameters, optimizer state, history, vocabulary
        return [f"group /{name} is missing" for name in ("params", "train", "vocab")
                if name not in f]
    if command not in ("run", "train", "bench"):
        return [f"root attribute 'command' is {command!r}, not run, train, bench or a"
                " train checkpoint"]
    problems: list[str] = []
    world = _count_attr(f, "world_size", problems)
    if world is not None:  # run files always hold both; train and bench files, when timed
        for name in ("ranks/host", "timings/seconds"):
            if command == "run" or name in f:
                _rows(f, name, world, problems)
        axes = [_count_attr(f, name, problems, required=False)
                for name in ("data_parallel", "pipeline_parallel", "tensor_parallel",
                             "sequence_parallel")]
        if None not in axes[::2] and int(np.prod([a or 1 for a in axes])) != world:
            problems.append(f"root attributes data_parallel x pipeline_parallel x"
                            f" tensor_parallel x sequence_parallel = {axes[0]} x"
                            f" {axes[1] or 1} x {axes[2]} x {axes[3] or 1} is not"
                            f" world_size = {world}")
    version = h5safe.attr(f, "format_version")
    if isinstance(version, (int, np.integer)) and version >= 2:
        problems += _unnamed_axes(f)
    if "heads" in f:
        problems += _implausible_heads(f)
    if command == "train":
        _need(f, "train/loss", problems)
    elif command == "bench":
        if "bench" not in f:
            problems.append("group /bench is missing (a bench file's measurements)")
    else:
        problems += _promised_run(f, config)
    return problems


def _unnamed_axes(f: Any) -> list[str]:
    """Format 2 names every axis of every dataset with an attached dimension scale (README,
    "Dimensions and units"); the scales themselves excepted. One line per dataset."""
    from . import h5safe

    problems = []
    for name, dset in h5safe.datasets(f):
        if h5safe.attr(dset, "CLASS") in (b"DIMENSION_SCALE", "DIMENSION_SCALE"):
            continue
        missing = [axis for axis in range(len(dset.shape or ())) if len(dset.dims[axis]) == 0]
        if missing:
            problems.append(f"dataset /{name}: axis {missing[0]} has no dimension scale"
                            " (format 2 names every axis)")
    return problems


def _implausible_heads(f: Any) -> list[str]:
    """Per-head statistics that cannot be: a negative entropy or distance, or a mean over
    fewer than one query token."""
    from . import h5safe

    problems = []
    tokens = h5safe.attr(f["heads"], "query_tokens")
    if tokens is not None and (not isinstance(tokens, (int, np.integer)) or tokens < 1):
        problems.append(f"attribute 'query_tokens' of /heads is {h5safe.short(tokens)}, not a"
                        " count >= 1")
    for name in ("entropy", "distance"):
        if f"heads/{name}" in f:
            values = h5safe.read(f[f"heads/{name}"])
            if values.dtype.kind == "f" and values.size and np.nanmin(values) < 0:
                problems.append(f"/heads/{name} holds negative values ({np.nanmin(values):.3g}):"
                                " not a mean attention " + name)
    return problems


def _count_attr(f: Any, name: str, problems: list[str], required: bool = True) -> int | None:
    """Root attribute ``name`` as a count >= 1 (None, with a problem line, otherwise)."""
    from . import h5safe

    value = h5safe.attr(f, name)
    if value is None:
        if required:
            problems.append(f"root attribute '{name}' is missing")
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"root attribute '{name}' is {h5safe.short(value)}, not a count >= 1")
        return None
    return value


def _rows(f: Any, name: str, world: int, problems: list[str]) -> None:
    """Dataset ``name`` has one row per rank."""
    if _need(f, name, problems, digest=False) and (not f[name].shape or
                                                   f[name].shape[0] != world):
        problems.append(f"/{name} has shape {f[name].shape}, not one row per rank of"
                        f" world_size = {world}")


def _need(f: Any, name: str, problems: list[str], digest: bool = False,
          why: str = "") -> bool:
    """Dataset ``name`` is there (with its sha256 attribute when ``digest``); a problem
    line naming what is missing otherwise."""
    import h5py

    if not isinstance(f.get(name), h5py.Dataset):
        problems.append(f"dataset /{name} is missing{why}")
        return False
    if digest and DIGEST_ATTR not in f[name].attrs:
        problems.append(f"dataset /{name} has no '{DIGEST_ATTR}' attribute: its contents"
                        " cannot be checked")
    return True


def _promised_run(f: Any, config: dict | None) -> list[str]:
    """A run file against its ``config``: inputs, kept layers, pooled output, records."""
    if config is None:
        return ["root attribute 'config' is missing or not TOML: cannot tell which layers"
                " the file should hold"]
    problems: list[str] = []

    def section(key: str) -> dict:
        value = config.get(key, {})
        return value if isinstance(value, dict) else {}

    text = section("input").get("text", "")
    streamed = isinstance(text, str) and bool(text)  # ragged rows (``corpusfile``)
    for name in ("input/tokens", "input/offsets" if streamed else "input/attention_mask"):
        _need(f, name, problems, digest=True)

    layers, keep = section("model").get("layers"), section("output").get("layers", "all")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= 10**6:
        problems.append(f"config model.layers is {layers!r}, not a layer count")
    elif keep not in ("all", "last", "none"):
        problems.append(f"config output.layers is {keep!r}, not 'all', 'last' or 'none'")
    else:
        kept = {"all": range(layers), "last": [layers - 1], "none": []}[keep]
        why = f" (output.layers = '{keep}', model.layers = {layers})"
        if kept and "layers" not in f:
            problems.append(f"group /layers is missing{why}")
        else:
            for index in kept:
                group = layer_group(index)
                if group not in f:
                    problems.append(f"group /{group} is missing{why}")
                    continue
                for name in ("attention", "hidden"):
                    _need(f, f"{group}/{name}", problems, digest=True, why=why)
    if streamed:
        _need(f, "output/pooled", problems, digest=True,
              why=f" (input.text = '{text}' promises pooled embeddings)")
    output = section("output")
    if output.get("head_stats") is True:
        for name in ("heads/entropy", "heads/distance"):
            _need(f, name, problems, digest=True, why=" (output.head_stats = true)")
    maps = output.get("attention_maps")
    if isinstance(maps, list) and maps:
        why = f" (output.attention_maps = {maps})"
        _need(f, "heads/sequences", problems, digest=True, why=why)
        if (_need(f, "heads/maps", problems, digest=True, why=why)
                and f["heads/maps"].shape[:1] != (len(maps),)):
            problems.append(f"/heads/maps has shape {f['heads/maps'].shape}, not one map per"
                            f" sequence of output.attention_maps = {maps}")
    check = section("checksum")
    tensor = _count_attr(f, "tensor_parallel", [], required=False) or 1
    stages = _count_attr(f, "pipeline_parallel", [], required=False) or 1
    if check.get("mode", "abft") == "abft" and (tensor > 1 or stages > 1):
        _need(f, "checksum/collectives", problems,
              why=f" (checksum.mode = 'abft' with tensor_parallel = {tensor},"
              f" pipeline_parallel = {stages} records every checked transfer)")
    return problems
