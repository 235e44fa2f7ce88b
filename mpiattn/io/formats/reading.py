"""Reading the files mpiattn writes: what every kind shares. ``File`` (root attributes,
datasets as ``Lazy``, per-rank tables, checksum records), ``Lazy`` (one dataset read on
demand) and ``Labelled`` (a labelled array without xarray). The kinds' own readers are in
``formats.run``, ``formats.bench``, ``formats.train`` and ``formats.checkpoint``, beside
their writers; ``formats.open`` picks one (``mpiattn.open``).

Everything is read through ``h5safe`` (only the file's own bytes, declared sizes checked
before allocating, text strictly UTF-8): a damaged or hostile file raises one-line
``InputError`` naming the file and the object, never a traceback from h5py.
"""

from __future__ import annotations

import functools
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from ...errors import InputError
from .. import h5safe

if TYPE_CHECKING:
    import pandas
    import xarray

MAX_CONFIG_BYTES = 2**20  # the `config` attribute (a few KiB of TOML when mpiattn wrote it)
MAX_READ_BYTES = 2**30  # one table or labelled array read whole (timings, records, ...)
SCALE_CLASS = b"DIMENSION_SCALE"

Columns = dict[str, np.ndarray]  # a table without pandas: column name -> (row,) array


# --- plain values ----------------------------------------------------------------------

def scalar(value: Any, where: str) -> Any:
    """An HDF5 attribute as a plain Python value (JSON-ready); text must be UTF-8."""
    if isinstance(value, (bytes, str)):
        return h5safe.text(value, where)
    if isinstance(value, np.ndarray):
        return [scalar(v, where) for v in value.ravel()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def integer(value: Any, where: str, default: int) -> int:
    """An integer attribute (``default`` when absent, 0 or empty); InputError otherwise."""
    if value is None or value == 0 or value == "":
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and float(value).is_integer():
        return int(value)
    raise InputError(f"{where} is {h5safe.short(value)}, not an integer: {h5safe.NOT_OURS}")


def malformed(path: str | Path, err: BaseException) -> InputError:
    """The one line for a file that h5py or NumPy could not read the way mpiattn needs."""
    return InputError(f"'{path}': not a readable mpiattn file ({type(err).__name__}:"
                      f" {h5safe.one_line(err)}); `mpiattn verify {path}` checks it")


def _parse_config(raw: str) -> dict:
    """The `config` TOML as a dict; {} when it is not TOML (an older or foreign file)."""
    try:
        return tomllib.loads(raw)
    except (tomllib.TOMLDecodeError, RecursionError):
        return {}


def _texts(values: Any, where: str) -> list[str]:
    """Strings of an array (bytes or str elements) as ``str``, strictly UTF-8."""
    return [h5safe.text(v, where) for v in np.atleast_1d(np.asarray(values, dtype=object)).ravel()]


# --- the NumPy forms and their conversions ---------------------------------------------------

class Labelled(NamedTuple):
    """A labelled array without xarray: ``values`` with one name per axis in ``dims``,
    ``coords[dim]`` the (len,) coordinate of each axis, the dataset's ``attrs`` (``units``)."""

    values: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, np.ndarray]
    attrs: dict[str, Any]
    name: str

    def to_xarray(self) -> xarray.DataArray:
        """The same as an ``xarray.DataArray`` (needs xarray)."""
        xr = _optional("xarray")
        return xr.DataArray(self.values, dims=self.dims, coords=self.coords,
                            attrs=self.attrs, name=self.name)


def _optional(module: str) -> Any:
    """``module`` imported; InputError naming the extra when it is not installed."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"this needs {module}: pip install 'mpiattn[analysis]'") from None


def _installed(module: str) -> bool:
    import importlib.util
    import sys

    if module in sys.modules:  # imported, or blocked (None) by a test
        return sys.modules[module] is not None
    if importlib.util.find_spec(module) is None:
        return False
    try:  # installed but broken (a missing dependency of its own): as if absent
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _array(lab: Labelled, raw: bool) -> Labelled | xarray.DataArray:
    return lab if raw or not _installed("xarray") else lab.to_xarray()


def _frame(cols: Columns, index: str | None, units: dict[str, str], raw: bool,
           name: str) -> Columns | pandas.DataFrame:
    """``cols`` as a ``pandas.DataFrame`` (``index`` as its index, ``attrs['units']``)
    unless ``raw`` or pandas is missing."""
    if raw or not _installed("pandas"):
        return cols
    pd = _optional("pandas")
    frame = pd.DataFrame({k: v for k, v in cols.items() if k != index},
                         index=pd.Index(cols[index], name=index) if index else None)
    frame.attrs.update(units=units, source=name)
    return frame


# --- one dataset, read on demand ---------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


class Missing(KeyError):
    """A dataset or layer the file does not hold (the message says which it has)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing"


def _guarded(method: F) -> F:
    """Errors of a read from ``self``'s file as one ``InputError`` line naming the file."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        try:
            return method(self, *args, **kwargs)
        except InputError as err:
            text = str(err)
            raise InputError(text if text.startswith(f"'{self.path}'") else
                             f"'{self.path}': {text}") from None
        except (Missing, BadIndex):
            raise
        except h5safe.MALFORMED as err:
            raise malformed(self.path, err) from None
    return wrapper  # type: ignore[return-value]


class BadIndex(IndexError):
    """A selection a dataset cannot take (out of range, reversed, unsorted): the caller's
    index, not the file, is at fault."""


class Lazy:
    """One dataset of an open file, read only when indexed.

    ``lazy[i]``, ``lazy[:, :5]``: that selection, as h5py reads it (a NumPy array);
    ``read()`` or ``np.asarray(lazy)``: the whole dataset; ``to_xarray()``: the whole as a
    labelled ``xarray.DataArray``. ``dims`` are its dimension labels, ``attrs`` its
    attributes (``units``, ``sha256``, ``description``) as plain values. The size checks of
    ``h5safe`` run before the first read; the file must still be open.
    """

    def __init__(self, owner: File, dset: Any) -> None:
        self._owner = owner
        self._dset = dset
        self._checked = False
        self.path = owner.path
        self.name: str = dset.name
        self.shape: tuple[int, ...] = tuple(dset.shape or ())
        self.dtype: np.dtype = dset.dtype
        self.dims: tuple[str, ...] = owner._dims(dset)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array in memory (what ``read()`` allocates)."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d dataset")
        return self.shape[0]

    def __repr__(self) -> str:
        axes = ", ".join(f"{d}: {n}" for d, n in zip(self.dims, self.shape, strict=True))
        return f"<mpiattn.Lazy {self.name} ({axes}) {self.dtype}>"

    def _check_open(self) -> None:
        self._owner._check_open()

    def _ready(self) -> Any:
        if not self._checked:
            h5safe.check_dataset(self._dset)
            if self._dset.id.shape is None:
                raise InputError(f"dataset {self.name} has no dataspace (HDF5 null): it holds"
                                 f" no values; {h5safe.NOT_OURS}")
            self._checked = True
        return self._dset

    @property
    @_guarded
    def attrs(self) -> dict[str, Any]:
        return self._owner._attrs(self._dset)

    @property
    def is_text(self) -> bool:
        """True for strings (/input/text, /ranks/host): read as ``str`` objects."""
        import h5py

        return h5py.check_string_dtype(self.dtype) is not None

    @_guarded
    def __getitem__(self, key: Any) -> np.ndarray:
        dset = self._ready()
        try:
            if self.is_text:  # strictly UTF-8: a bad byte is a one-line InputError
                return np.asarray(dset.asstr()[key], dtype=object)
            return np.asarray(dset[key])
        except (IndexError, TypeError, ValueError) as err:  # raised by the selection
            if isinstance(err, UnicodeDecodeError):
                raise
            raise BadIndex(f"{self.name} {tuple(self.shape)} cannot be indexed with"
                           f" {key!r}: {err}") from None

    @_guarded
    def read(self) -> np.ndarray:
        """The whole dataset (``h5safe.read``: declared size checked first)."""
        value = h5safe.read(self._ready())
        if self.is_text:
            return np.array(_texts(value, f"an element of {self.name}"),
                            dtype=object).reshape(value.shape)
        return value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        value = self.read()
        return value if dtype is None else value.astype(dtype)

    @_guarded
    def labelled(self) -> Labelled:
        """The whole dataset with its dims and coordinates (``Labelled``)."""
        return Labelled(self.read(), self.dims, self._owner._coords(self._dset, self.dims),
                        self.attrs, self.name)

    def to_xarray(self) -> xarray.DataArray:
        """The whole dataset as a labelled ``xarray.DataArray`` (needs xarray)."""
        return self.labelled().to_xarray()


# --- files -------------------------------------------------------------------------------

PER_RANK = {  # (rank,) datasets -> column names of ``ranks()`` (others: path + units)
    "ranks/host": "host", "ranks/device": "device", "ranks/kernels": "kernels",
    "ranks/peak_memory": "peak_memory_bytes",
    "timings/forward": "forward_s", "timings/setup": "setup_s", "timings/total": "total_s",
    "timings/busy": "busy_s", "timings/wait": "wait_s", "work/lines": "lines",
    "work/tokens": "tokens", "work/padded_tokens": "padded_tokens",
    "bench/gemm/flops_per_second": "gemm_flops_per_second",
    "bench/layer_per_rank": "layer_s", "bench/memory/peak_bytes": "peak_memory_bytes",
}
FALLBACK_DIMS = {  # for files without dimension labels (written by hand, or older tools)
    "timings/seconds": ("rank", "layer", "phase"), "bench/phases/seconds": ("rank", "phase"),
    "heads/entropy": ("layer", "head"), "heads/distance": ("layer", "head"),
    **{name: ("rank",) for name in PER_RANK},
}


class File:
    """An mpiattn HDF5 file opened for reading (``open``). A context manager.

    ``config``: the resolved config (the root ``config`` TOML, {} when absent or not TOML);
    ``attrs``: the other root attributes as plain Python values; ``kind``: run, bench,
    train, checkpoint or unknown. ``f[name]`` is any dataset as ``Lazy``; ``datasets()``
    lists them. Per-rank tables: ``ranks()``; checksum records: ``collectives()``.
    """

    kind: ClassVar[str] = "unknown"

    def __init__(self, h5: Any, path: str) -> None:
        self.h5 = h5  # the h5py.File, checked by h5safe.open_for_reading: for experts
        self.path = path
        self._closed = False
        raw = h5safe.attr(h5, "config", "", max_bytes=MAX_CONFIG_BYTES)
        self.config: dict = _parse_config(h5safe.text(raw, "attribute 'config' of /"))
        self.attrs: dict[str, Any] = {k: scalar(h5safe.attr(h5, k), f"attribute '{k}' of /")
                                      for k in h5.attrs if k != "config"}
        for name in ("status", "command"):  # as verify reads them: text, or not ours
            if name in self.attrs:
                self.attrs[name] = h5safe.text(self.attrs[name], f"attribute '{name}' of /")
        self.format_version = integer(self.attrs.get("format_version"),
                                      "attribute 'format_version' of /", 0)
        self.world_size = integer(self.attrs.get("world_size"), "attribute 'world_size' of /",
                                  0)
        self.tensor_parallel = integer(self.attrs.get("tensor_parallel"),
                                       "attribute 'tensor_parallel' of /", self.world_size)
        self.data_parallel = integer(self.attrs.get("data_parallel"),
                                     "attribute 'data_parallel' of /", 1)
        self.pipeline_parallel, self.sequence_parallel = (
            integer(self.attrs.get(f"{axis}_parallel"), f"attribute '{axis}_parallel' of /", 1)
            for axis in ("pipeline", "sequence"))
        parts = self.attrs.get("head_partition")
        parts = parts if isinstance(parts, list) else [] if parts is None else [parts]
        self.head_partition = [integer(x, "attribute 'head_partition' of /", 0) for x in parts]

    # -- life cycle
    @property
    def command(self) -> str:
        return str(self.attrs.get("command", ""))

    @property
    def status(self) -> str | None:
        return self.attrs.get("status")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the file; ``Lazy`` datasets of it can no longer be read."""
        if not self._closed:
            self._closed = True
            self.h5.close()

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.world_size} ranks"
        return f"<mpiattn.{type(self).__name__} '{self.path}' ({self.command or '?'}, {state})>"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"'{self.path}' is closed: read it inside `with mpiattn.open(...)`")

    # -- datasets
    @_guarded
    def datasets(self) -> list[str]:
        """Every dataset's path (without the leading '/'), in HDF5's order. Reads no data."""
        return [name for name, _ in h5safe.datasets(self.h5)]

    def __contains__(self, name: str) -> bool:
        self._check_open()
        return name in self.h5

    @_guarded
    def __getitem__(self, name: str) -> Lazy:
        """Dataset ``name`` ("layers/00/hidden") as ``Lazy``; KeyError when absent."""
        obj = self.h5.get(name)
        import h5py

        if not isinstance(obj, h5py.Dataset):
            raise Missing(f"'{name}' is not a dataset of {self.path}")
        return Lazy(self, obj)

    def _lazy(self, name: str) -> Lazy | None:
        return self[name] if name in self.h5 else None

    def _attrs(self, obj: Any) -> dict[str, Any]:
        """``obj``'s attributes as plain values (HDF5's dimension bookkeeping left out)."""
        where = obj.name
        return {k: scalar(h5safe.attr(obj, k), f"attribute '{k}' of {where}") for k in obj.attrs
                if k not in ("DIMENSION_LABELS", "DIMENSION_LIST", "REFERENCE_LIST", "CLASS",
                             "NAME")}

    def _dims(self, dset: Any) -> tuple[str, ...]:
        """Axis names from the dataset's dimension labels; ``FALLBACK_DIMS`` or dim_0, ...
        where a file has none."""
        ndim = len(dset.shape or ())
        labels = h5safe.attr(dset, "DIMENSION_LABELS")
        found = _texts(labels, f"dimension labels of {dset.name}") if labels is not None else []
        if len(found) != ndim:
            found = [""] * ndim
        found = [label or self._scale_name(dset, axis) for axis, label in enumerate(found)]
        fallback = FALLBACK_DIMS.get(dset.name.lstrip("/"), ())
        if dset.name == "/timings/seconds" and self.command == "train":
            fallback = ("rank", "step", "phase")
        if len(fallback) != ndim:
            fallback = tuple(f"dim_{i}" for i in range(ndim))
        dims = tuple(label or fallback[i] for i, label in enumerate(found))
        if len(set(dims)) != len(dims):
            raise InputError(f"dataset {dset.name} has dimension labels {list(dims)}: an axis"
                             f" name twice; {h5safe.NOT_OURS}")
        return dims

    def _coords(self, dset: Any, dims: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Per axis: an attached dimension scale of the right length, else the ``phases``
        attribute (phase axes), ``first_step`` + positions (step axes), positions."""
        coords: dict[str, np.ndarray] = {}
        for axis, dim in enumerate(dims):
            n = dset.shape[axis]
            value = self._scale(dset, axis, n)
            if value is None and dim == "phase" and "phases" in dset.attrs:
                value = np.array(_texts(h5safe.attr(dset, "phases"),
                                        f"attribute 'phases' of {dset.name}"))
                if value.size != n:
                    raise InputError(f"{dset.name} has {n} phases but its 'phases' attribute"
                                     f" names {value.size}")
            if value is None and dim == "step" and "first_step" in dset.attrs:
                first = integer(scalar(h5safe.attr(dset, "first_step"), "first_step"),
                                f"attribute 'first_step' of {dset.name}", 0)
                value = np.arange(first, first + n)
            coords[dim] = np.arange(n) if value is None else value
        return coords

    def _scale_name(self, dset: Any, axis: int) -> str:
        """The name of the dimension scale attached to ``axis`` ("" when none)."""
        if "DIMENSION_LIST" not in dset.attrs:
            return ""
        try:
            scales = dset.dims[axis]
            return scales[0].name.rsplit("/", 1)[-1] if len(scales) else ""
        except (InputError, *h5safe.MALFORMED):
            return ""

    def _scale(self, dset: Any, axis: int, n: int) -> np.ndarray | None:
        """The first dimension scale attached to ``axis`` when it is a 1-D dataset of
        ``n`` numbers or strings (format 2 files); None otherwise."""
        if "DIMENSION_LIST" not in dset.attrs:
            return None
        try:
            scales = dset.dims[axis]
            if len(scales) == 0:
                return None
            scale = scales[0]
            if scale.shape != (n,):
                return None
            value = h5safe.read(scale, MAX_READ_BYTES)
        except (InputError, *h5safe.MALFORMED):
            return None  # coordinates are a convenience: positions serve
        if value.dtype.kind in "OSU":
            return np.array(_texts(value, f"dimension scale {scale.name}"))
        return value if value.dtype.kind in "biuf" else None

    def _numbers(self, name: str, ndim: tuple[int, ...] = (0, 1)) -> np.ndarray | None:
        """A numeric dataset read whole (bounded) as float64, at least 1-D (None when
        absent); InputError when it holds no numbers or has another number of axes."""
        if name not in self.h5:
            return None
        value = h5safe.read(self.h5[name], MAX_READ_BYTES)
        if value.dtype.kind not in "biuf":
            raise InputError(f"/{name} has dtype {value.dtype}: expected numbers")
        if value.ndim not in ndim:
            raise InputError(f"/{name} has shape {value.shape}: expected {max(ndim)}"
                             f" dimension(s)")
        return np.atleast_1d(value.astype(float))

    def _labelled(self, name: str, ndim: tuple[int, ...]) -> Labelled | None:
        """Numeric dataset ``name`` read whole with its dims and coordinates."""
        values = self._numbers(name, ndim)
        if values is None:
            return None
        dset = self.h5[name]
        dims = self._dims(dset)
        values = values.reshape(dset.shape) if dset.shape else values
        return Labelled(values, dims, self._coords(dset, dims), self._attrs(dset), name)

    # -- tables every kind may have
    @_guarded
    def timings(self, raw: bool = False) -> Labelled | xarray.DataArray | None:
        """Seconds per rank and phase: /timings/seconds, (rank, layer, phase) of a run,
        (rank, step, phase) of training; (rank, phase) of one layer in a bench file. None
        when the file has none."""
        lab = self._labelled(self._timings_name, (2, 3))
        if lab is None:
            return None
        if 0 in lab.values.shape:
            raise InputError(f"/{lab.name} has shape {lab.values.shape}: it holds no times")
        return _array(lab, raw)

    _timings_name = "timings/seconds"

    @_guarded
    def hosts(self) -> list[str]:
        """The host of each rank (/ranks/host; [] when absent)."""
        if "ranks/host" not in self.h5:
            return []
        return _texts(h5safe.read(self.h5["ranks/host"], MAX_READ_BYTES),
                      "an element of /ranks/host")

    @_guarded
    def ranks(self, raw: bool = False) -> Columns | pandas.DataFrame:
        """One row per rank: every (rank,) dataset of /ranks, /timings, /work and /bench
        (host, device, forward_s, setup_s, total_s, peak_memory_bytes; busy_s, wait_s,
        lines, tokens of a text run; gemm_flops_per_second, layer_s of a bench file). Column
        names carry their units (``PER_RANK``); ``attrs['units']`` of the frame too."""
        import h5py

        cols: Columns = {}
        units: dict[str, str] = {}
        found: list[tuple[str, Any]] = []
        for top in ("ranks", "timings", "work", "bench"):
            group = self.h5.get(top)
            if isinstance(group, h5py.Group):
                group.visititems(lambda name, obj, top=top: found.append((f"{top}/{name}", obj))
                                 if isinstance(obj, h5py.Dataset) else None)
        for name, dset in found:
            if len(dset.shape or ()) != 1 or h5safe.attr(dset, "CLASS") is not None:
                continue  # not per rank, or a dimension scale (format 2)
            if not name.startswith("ranks/") and self._dims(dset) != ("rank",):
                continue
            value = h5safe.read(dset, MAX_READ_BYTES)
            unit = h5safe.attr(dset, "units")
            unit = h5safe.text(unit, f"attribute 'units' of /{name}") if unit is not None else ""
            column = PER_RANK.get(name) or "_".join([*name.split("/")[1:],
                                                     *([unit] if unit else [])])
            if column in cols:
                column = name.replace("/", "_")
            if value.dtype.kind in "OSU":
                value = np.array(_texts(value, f"an element of /{name}"), dtype=object)
            elif value.dtype.kind not in "biuf":
                raise InputError(f"/{name} has dtype {value.dtype}: expected numbers or text")
            cols[column] = value
            units[column] = unit
        first = [k for k in ("host", "device") if k in cols]
        cols = {k: cols[k] for k in [*first, *(k for k in cols if k not in first)]}
        lengths = {c: len(v) for c, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"per-rank datasets of different lengths: {lengths}")
        n = next(iter(lengths.values()), 0)
        return _frame({"rank": np.arange(n), **cols}, "rank", units, raw, "ranks")

    @_guarded
    def collectives(self, raw: bool = False) -> Columns | pandas.DataFrame | None:
        """/checksum/collectives, one row per checked transfer: replica, layer, site,
        residual, bound, ratio (= residual/bound), passed, retries, digest, chunk (the
        columns the file has). None when the file has no records."""
        if "checksum/collectives" not in self.h5:
            return None
        table = h5safe.read(self.h5["checksum/collectives"], MAX_READ_BYTES)
        if table.dtype.names is None:
            raise InputError(f"/checksum/collectives has dtype {table.dtype}: expected a"
                             " table (compound type)")
        table = np.atleast_1d(table)
        cols: Columns = {}
        for field in table.dtype.names:
            column = table[field]
            if field == "site":
                from ..collectives import site_names

                column = site_names(table)
            if column.dtype.kind == "S":
                names = {v: h5safe.text(v, f"a {field} in /checksum/collectives")
                         for v in np.unique(column)}
                column = np.array([names[v] for v in column], dtype=object)
            elif field == "passed":
                column = column.astype(bool)
            cols[field] = column
        return _frame(cols, None, {}, raw, "checksum/collectives")
