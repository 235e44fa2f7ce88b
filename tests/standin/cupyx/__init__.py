"""``cupyx`` of the stand-in: pinned host memory and ``scatter_add`` (see ``cupy``)."""

from __future__ import annotations

import weakref
from typing import Any

import cupy as _cupy
import numpy as _np
from cupy import _log

_pinned: dict[int, tuple[int, int]] = {}  # id -> (start, end) address of live pinned buffers


def empty_pinned(shape: Any, dtype: Any = float, order: str = "C") -> _np.ndarray:
    """A NumPy array in (simulated) page-locked host memory, recorded as such."""
    a = _np.empty(shape, dtype=dtype, order=order)
    start = a.ctypes.data
    key = id(a)
    _pinned[key] = (start, start + max(a.nbytes, 1))
    _log.record.pinned_bytes += a.nbytes
    _log.record.pinned_allocations += 1
    weakref.finalize(a, _pinned.pop, key, None)
    return a


def _is_pinned(a: Any) -> bool:
    if not isinstance(a, _np.ndarray) or a.size == 0:
        return False
    p = a.ctypes.data
    return any(lo <= p < hi for lo, hi in _pinned.values())


def scatter_add(a: Any, slices: Any, value: Any) -> None:
    """``a[slices] += value`` with repeated indices summed (``numpy.add.at``)."""
    if not isinstance(a, _cupy.ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    _np.add.at(a._a, _cupy._index(slices), _cupy._host(value))
    a._mem.write()
