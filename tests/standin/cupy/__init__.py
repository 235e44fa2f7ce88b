"""A strict CuPy stand-in for tests: NumPy underneath, CuPy's rules on top.

Test-only (``PYTHONPATH=tests/standin``), never installed. It runs mpiattn's CuPy code
paths on a CPU and refuses what CuPy refuses where mistakes hide:

- ``cupy.ndarray`` is its own type, not a NumPy array: ``np.asarray(x)``, ``__array__``,
  h5py and NumPy functions CuPy does not provide raise ``TypeError``; a NumPy array given
  to a CuPy function or mixed into an operation raises ``TypeError``; ``.get()``,
  ``cupy.asnumpy`` and 0-d reads (``float(x)``, ``bool(x)``, ``int(x)``, which CuPy allows
  with an implicit synchronisation) work and are recorded (``cupy.standin.record``);
- devices (``CUPY_STANDIN_DEVICES``, default 1), streams and events; every operation that
  writes device memory is a launch on the current stream, and a device buffer handed to
  MPI (through ``__cuda_array_interface__``, as mpi4py reads it) must have been written
  by a stream synchronised since, and is refused unless the simulated MPI library is
  CUDA-aware (``CUPY_STANDIN_CUDA_AWARE=1``); MPI then reads the host memory underneath;
- device memory accounting (allocations, live and peak bytes per device), pinned host
  memory (``cupyx.empty_pinned``), ``cuda.runtime`` device count and properties;
- only the CuPy API mpiattn uses: any other name raises ``AttributeError``, so a new use
  is noticed and added here on purpose.

What it cannot tell: kernel bugs, device numerics (it computes with NumPy: bit for bit
the NumPy backend's numbers where the operations are the same), speed, real asynchrony.
"""

from __future__ import annotations

import builtins as _b
import weakref as _weakref
from typing import Any

import numpy as _np

from . import _log
from . import cuda as cuda

__version__ = "13.0.0+standin"
__standin__ = "mpiattn"  # the marker mpiattn checks before honouring MPIATTN_CUPY_STANDIN
standin = _log  # cupy.standin.record: what the stand-in saw

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to"
             " construct a NumPy array explicitly.")


_cuda_aware = _log.mpi_cuda_aware


class _Memory:
    """One device allocation (shared by an array and its views)."""

    __slots__ = ("__weakref__", "device", "nbytes", "written")

    def __init__(self, device: int, nbytes: int) -> None:
        self.device, self.nbytes = device, nbytes
        rec = _log.record
        rec.allocations[device] = rec.allocations.get(device, 0) + 1
        live = rec.live_bytes[device] = rec.live_bytes.get(device, 0) + nbytes
        rec.peak_bytes[device] = _b.max(rec.peak_bytes.get(device, 0), live)
        self.written: tuple[Any, int] | None = None
        _weakref.finalize(self, _free, device, nbytes)

    def write(self) -> None:
        """A kernel on the current stream wrote this memory."""
        stream = cuda.get_current_stream()
        self.written = (stream, stream._launch())


def _free(device: int, nbytes: int) -> None:
    live = _log.record.live_bytes
    live[device] = live.get(device, 0) - nbytes


class _Flags:
    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, a: _np.ndarray, own: bool) -> None:
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = own


class _MemoryPointer:
    """``x.data``: the address (of the NumPy memory underneath) and the device."""

    __slots__ = ("device", "ptr")

    def __init__(self, ptr: int, device: Any) -> None:
        self.ptr, self.device = ptr, device


def _host(x: Any, what: str = "argument") -> Any:
    """The NumPy array under a stand-in array; other values pass; NumPy arrays refused."""
    if isinstance(x, ndarray):
        if x._mem.device != cuda._current_id():
            raise ValueError(f"The device where the array resides ({x._mem.device}) is"
                             f" different from the current device ({cuda._current_id()}).")
        return x._a
    if isinstance(x, _np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (list, tuple)):
        return type(x)(_host(v, what) for v in x)
    return x


def _wrap(r: Any, parents: tuple = ()) -> Any:
    """A stand-in array for NumPy result ``r``: a view shares its parent's memory."""
    if isinstance(r, tuple):
        return tuple(_wrap(v, parents) for v in r)
    if isinstance(r, _np.generic):
        r = _np.asarray(r)
    if not isinstance(r, _np.ndarray):
        return r
    for p in parents:
        if isinstance(p, ndarray) and _np.may_share_memory(r, p._a):
            return ndarray._of(r, p._mem)
    out = ndarray._of(r, None)
    out._mem.write()
    return out


def _arrays(args: Any) -> tuple:
    found = []
    for a in args:
        if isinstance(a, ndarray):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(_arrays(a))
    return tuple(found)


def _call(fn: Any, args: tuple, kwargs: dict) -> Any:
    """Run NumPy ``fn`` on the arrays under stand-in ones; wrap and account the result."""
    out = kwargs.get("out")
    if out is not None and not isinstance(out, ndarray):
        raise TypeError(f"out must be a cupy.ndarray, not {type(out)}")
    hargs = tuple(_host(a) for a in args)
    hkw = {k: _host(v) for k, v in kwargs.items()}
    r = fn(*hargs, **hkw)
    if out is not None:
        out._mem.write()
        return out
    return _wrap(r, _arrays(args))


class ndarray:
    """A device array: a NumPy array underneath, reachable only explicitly."""

    __slots__ = ("__weakref__", "_a", "_mem")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None,
                 strides: Any = None, order: str = "C") -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("stand-in: memptr/strides are not supported")
        self._a = _np.empty(shape, dtype, order=order)
        self._mem = _Memory(cuda._current_id(), self._a.nbytes)

    @classmethod
    def _of(cls, a: _np.ndarray, mem: _Memory | None) -> ndarray:
        obj = cls.__new__(cls)
        obj._a = a
        obj._mem = mem if mem is not None else _Memory(cuda._current_id(), a.nbytes)
        return obj

    # -- what CuPy refuses ------------------------------------------------------------
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__" or ufunc.__name__ not in _UFUNCS:
            return NotImplemented
        _log.record.used(ufunc.__name__)
        return _call(ufunc, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        mine = _FUNCTIONS.get(func.__name__)
        if mine is None:
            return NotImplemented  # NumPy then raises TypeError
        return mine(*args, **kwargs)

    # -- explicit transfers --------------------------------------------------------------
    def get(self, stream: Any = None, order: str = "C", out: Any = None,
            blocking: bool = True) -> _np.ndarray:
        """A NumPy copy (into ``out``, a NumPy array of the same shape, when given)."""
        if out is None:
            host = _np.array(self._a, order=order)
        else:
            if not isinstance(out, _np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            if out.shape != self.shape or out.dtype != self.dtype:
                raise ValueError("Shape or dtype mismatch: out must match the array")
            _np.copyto(out, self._a)
            host = out
        _log.record.transfers.append(_log.Transfer("d2h", "get", self.nbytes,
                                                   _pinned(host), _log.caller()))
        return host

    def set(self, arr: Any, stream: Any = None) -> None:
        """Copy NumPy ``arr`` (same shape and dtype) into this array."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        _np.copyto(self._a, arr)
        self._mem.write()
        _log.record.transfers.append(_log.Transfer("h2d", "set", arr.nbytes,
                                                   _pinned(arr), _log.caller()))

    def _scalar(self) -> Any:
        if self.size != 1:
            raise TypeError("only size-1 arrays can be converted to Python scalars")
        _log.record.transfers.append(_log.Transfer("d2h", "scalar", self.itemsize, False,
                                                   _log.caller()))
        return self._a.reshape(-1)[0]

    def __float__(self) -> float:
        return float(self._scalar())

    def __int__(self) -> int:
        return int(self._scalar())

    def __bool__(self) -> bool:
        return bool(self._scalar())

    def tolist(self) -> Any:
        """A Python list (a device-to-host copy, recorded as ``tolist``)."""
        _log.record.transfers.append(_log.Transfer("d2h", "tolist", self.nbytes, False,
                                                   _log.caller()))
        return self._a.tolist()

    def item(self) -> Any:
        return self._scalar().item()

    # -- what MPI sees ---------------------------------------------------------------------
    @property
    def __cuda_array_interface__(self) -> dict:
        if not _cuda_aware():  # mpi4py reports it as "expecting buffer or list/tuple"
            _log.record.mpi_refused += 1
            raise TypeError("stand-in: a device array was handed to MPI, but the simulated MPI"
                            " library is not CUDA-aware (CUPY_STANDIN_CUDA_AWARE=1 makes it"
                            " so); stage it through host memory")
        written = self._mem.written
        if written is not None and written[0]._done < written[1]:
            _log.record.mpi_refused += 1
            raise RuntimeError(f"stand-in: MPI got a device buffer last written by launch"
                               f" {written[1]} on {written[0]!r}, which was not synchronised"
                               f" since (synchronised up to {written[0]._done})")
        if not self._a.flags.c_contiguous:
            raise BufferError("stand-in: MPI got a non-contiguous device array")
        _log.record.mpi_device_buffers += 1
        return {"version": 3, "shape": self.shape, "typestr": self.dtype.str,
                "data": (self._a.ctypes.data, False), "strides": None,
                "descr": [("", self.dtype.str)], "stream": None}

    # -- the array API mpiattn uses --------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: _wrap(self._a.T, (self,)))
    real = property(lambda self: _wrap(self._a.real, (self,)))
    flags = property(lambda self: _Flags(self._a, self._a.base is None))
    device = property(lambda self: cuda.Device(self._mem.device))

    @property
    def data(self) -> _MemoryPointer:
        return _MemoryPointer(self._a.ctypes.data, cuda.Device(self._mem.device))

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"standin.ndarray(shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._a[_index(key)], (self,))

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, _np.ndarray):  # CuPy copies a NumPy value to the device
            _log.record.transfers.append(_log.Transfer("h2d", "setitem", value.nbytes,
                                                       _pinned(value), _log.caller()))
        else:
            value = _host(value)
        self._a[_index(key)] = value
        self._mem.write()

    def astype(self, dtype: Any, order: str = "K", casting: Any = None, subok: Any = None,
               copy: bool = True) -> ndarray:
        r = self._a.astype(dtype, order=order, copy=copy)
        return self if r is self._a else _wrap(r, (self,) if not copy else ())

    def copy(self, order: str = "C") -> ndarray:
        return _wrap(self._a.copy(order=order))

    def view(self, dtype: Any = None) -> ndarray:
        return _wrap(self._a.view(dtype) if dtype is not None else self._a.view(), (self,))

    def fill(self, value: Any) -> None:
        self._a.fill(_host(value))
        self._mem.write()


def _index(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return _host(key)
    if isinstance(key, _np.ndarray):  # CuPy copies a NumPy index array to the device
        _log.record.transfers.append(_log.Transfer("h2d", "index", key.nbytes, False,
                                                   _log.caller()))
    return key


def _method(name: str) -> Any:
    fn = getattr(_np.ndarray, name)

    def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        _log.record.used(f"ndarray.{name}")
        return _call(fn, (self, *args), kwargs)

    method.__name__ = name
    return method


# methods: NumPy's, on the array underneath (reductions give 0-d device arrays, as CuPy's);
# only those mpiattn calls on device arrays (the matrix's ``api`` lists what ran)
_METHODS = ("reshape", "sum", "max", "mean", "all", "transpose", "swapaxes",
            "argmax",  # pooling: the first real token
            "any")  # pooling: lasttoken's rows with a real token
for _name in _METHODS:
    setattr(ndarray, _name, _method(_name))


def _operator(ufunc: Any, reflected: bool = False, inplace: bool = False) -> Any:
    def op(self: ndarray, other: Any) -> Any:
        if isinstance(other, _np.ndarray):
            raise TypeError(f"Unsupported type {type(other)}")
        if inplace:
            return _call(ufunc, (self, other), {"out": self})
        return _call(ufunc, (other, self) if reflected else (self, other), {})

    return op


for _op, _uf in (("add", _np.add), ("sub", _np.subtract), ("mul", _np.multiply),
                 ("truediv", _np.true_divide), ("floordiv", _np.floor_divide),
                 ("pow", _np.power), ("matmul", _np.matmul), ("mod", _np.remainder),
                 ("and", _np.bitwise_and), ("or", _np.bitwise_or), ("xor", _np.bitwise_xor),
                 ("lshift", _np.left_shift), ("rshift", _np.right_shift)):
    setattr(ndarray, f"__{_op}__", _operator(_uf))
    setattr(ndarray, f"__r{_op}__", _operator(_uf, reflected=True))
    setattr(ndarray, f"__i{_op}__", _operator(_uf, inplace=True))
for _op, _uf in (("eq", _np.equal), ("ne", _np.not_equal), ("lt", _np.less),
                 ("le", _np.less_equal), ("gt", _np.greater), ("ge", _np.greater_equal)):
    setattr(ndarray, f"__{_op}__", _operator(_uf))
ndarray.__neg__ = lambda self: _call(_np.negative, (self,), {})  # type: ignore[attr-defined]
ndarray.__abs__ = lambda self: _call(_np.absolute, (self,), {})  # type: ignore[attr-defined]
ndarray.__invert__ = lambda self: _call(_np.invert, (self,), {})  # type: ignore[attr-defined]


class _Ufunc:
    """A CuPy ufunc: device arrays and scalars in, a device array out."""

    def __init__(self, np_ufunc: Any) -> None:
        self._uf = np_ufunc
        self.__name__ = np_ufunc.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _log.record.used(self.__name__)
        return _call(self._uf, args, kwargs)

    def __repr__(self) -> str:
        return f"<standin ufunc '{self.__name__}'>"


# the ufuncs mpiattn calls by name (``xp.exp``, ``np.exp(device_array)``); operators
# (+, *, @, ==, ...) reach every ufunc behind them, as in CuPy. Add more only on purpose.
_UFUNCS = {"add", "subtract", "multiply", "matmul", "exp", "log", "sqrt", "absolute",
           "maximum", "isfinite", "logaddexp",
           "minimum", "tanh", "frexp"}  # the model families: MPNet buckets, Dense layers
for _name in _UFUNCS:
    globals()[_name] = _Ufunc(getattr(_np, _name))
abs = globals()["absolute"]


def _function(name: str) -> Any:
    fn = getattr(_np, name)

    def function(*args: Any, **kwargs: Any) -> Any:
        _log.record.used(name)
        return _call(fn, args, kwargs)

    function.__name__ = name
    return function


_FUNCTION_NAMES = ("where", "concatenate", "stack", "vdot", "mean", "argmax", "zeros_like",
                   "cumsum", "flatnonzero")
for _name in _FUNCTION_NAMES:
    globals()[_name] = _function(_name)


def _creation(name: str) -> Any:
    fn = getattr(_np, name)

    def function(*args: Any, **kwargs: Any) -> Any:
        _log.record.used(name)
        for a in args:
            if isinstance(a, _np.ndarray):
                raise TypeError(f"Unsupported type {type(a)}")
        return _wrap(fn(*args, **kwargs))

    function.__name__ = name
    return function


_CREATION = ("empty", "zeros", "ones", "full", "arange")
for _name in _CREATION:
    globals()[_name] = _creation(_name)


def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> Any:
    """A device array: ``a`` itself (or cast) when already one, else a host-to-device copy."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = _np.asarray(a, dtype=dtype, order=order)
    _log.record.transfers.append(_log.Transfer("h2d", "asarray", host.nbytes, _pinned(a),
                                               _log.caller()))
    return _wrap(_np.array(host, copy=True))


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K") -> Any:
    if isinstance(obj, ndarray):
        return obj.astype(dtype or obj.dtype, copy=copy)
    return asarray(obj, dtype=dtype)


def ascontiguousarray(a: Any, dtype: Any = None) -> Any:
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    return _call(_np.ascontiguousarray, (a,), {"dtype": dtype})


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> _np.ndarray:
    """A NumPy copy of a device array (NumPy arrays and scalars pass through, as in CuPy)."""
    if isinstance(a, ndarray):
        host = a.get(order=order, out=out)
        _log.record.transfers[-1].kind = "asnumpy"
        return host
    return _np.asarray(a, order=order)


def get_array_module(*args: Any) -> Any:
    import sys

    return sys.modules[__name__] if _b.any(isinstance(a, ndarray) for a in args) else _np


class _Pool:
    """``get_default_memory_pool()``: live and held bytes of the current device (a pool
    keeps what was freed, so ``total_bytes`` is the peak since ``free_all_blocks``)."""

    def used_bytes(self) -> int:
        return _log.record.live_bytes.get(cuda._current_id(), 0)

    def total_bytes(self) -> int:
        return _log.record.peak_bytes.get(cuda._current_id(), 0)

    def free_all_blocks(self) -> None:
        rec, dev = _log.record, cuda._current_id()
        rec.peak_bytes[dev] = rec.live_bytes.get(dev, 0)


_POOL = _Pool()


def get_default_memory_pool() -> _Pool:
    return _POOL


def _pinned(a: Any) -> bool:
    from cupyx import _is_pinned

    return _is_pinned(a)


# dtypes and constants: the NumPy objects, as in CuPy
float16, float32, float64 = _np.float16, _np.float32, _np.float64
int32, int64 = _np.int32, _np.int64
uint8, uint16, uint32, uint64 = _np.uint8, _np.uint16, _np.uint32, _np.uint64
bool_, dtype, finfo, inf = _np.bool_, _np.dtype, _np.finfo, _np.inf

_FUNCTIONS = {name: globals()[name] for name in (*_UFUNCS, *_FUNCTION_NAMES, "asarray",
                                                 "ascontiguousarray", "abs")}
