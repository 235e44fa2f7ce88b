"""Fused float32 kernels for the NumPy path, compiled from ``_kernels.c`` when the package
is installed, loaded with ctypes; ``None`` of them where the build was skipped.

NumPy runs an element-wise expression as one pass over memory per operation: exact GELU
is 21 passes, the softmax of a block of scores 4, a residual add and LayerNorm 8. Those
passes were a quarter of an encoder layer's time on one core (MiniLM, 32 x 256 tokens:
about 90 of 340 ms, against 225 ms of products). Each kernel here does its operation in
one or two passes (``docs/text-corpora.md`` has the measurements), as oneDNN and ONNX
Runtime fuse them. Their results differ from the NumPy passes' in the last bits (another
exp, FMA), as BLAS's do from one CPU to another.

The library is optional: a missing compiler at install time, or ``MPIATTN_KERNELS=numpy``
in the environment, leaves ``LIB`` as None and the callers take their NumPy passes. The
calls release the GIL (ctypes does), so attention's worker threads run them side by side.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import numpy as np

_P, _N, _F = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_float

_SIGNATURES = {
    "mpiattn_gelu": (_P, _P, _P, _N, _N),
    "mpiattn_softmax_columns": (_P, _P, _N, _N, _N),
    "mpiattn_store_heads": (_P, _P, _P, _N, _N, _N, _N),
    "mpiattn_add_layer_norm": (_P, _P, _P, _P, _P, _F, _P, _P, _N, _N),
}


TURNED_OFF = os.environ.get("MPIATTN_KERNELS", "").lower() == "numpy"


def _load() -> ctypes.CDLL | None:
    """The compiled library next to this file, or None (not built, or turned off)."""
    if TURNED_OFF:
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels{suffix}"
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            for name, args in _SIGNATURES.items():
                getattr(lib, name).argtypes = args
                getattr(lib, name).restype = None
            lib.mpiattn_kernels_isa.argtypes = ()
            lib.mpiattn_kernels_isa.restype = ctypes.c_char_p
            return lib
    return None


LIB = _load()


def description() -> str:
    """What runs the element-wise operations, for ``mpiattn info`` and the files' root
    attribute ``kernels``: "compiled, AVX-512 clone (_kernels....so)" or "NumPy passes
    (why)"."""
    if LIB is not None:
        return f"compiled, {LIB.mpiattn_kernels_isa().decode()} ({Path(LIB._name).name})"
    if TURNED_OFF:
        return "NumPy passes (MPIATTN_KERNELS=numpy)"
    return "NumPy passes (the compiled kernels were not built)"


def fits(*arrays: np.ndarray | None) -> bool:
    """Whether the kernels can take these arrays: the library is loaded and every array
    given is a C-contiguous float32 NumPy array (None entries are skipped)."""
    return LIB is not None and all(
        a is None or (type(a) is np.ndarray and a.dtype == np.float32
                      and a.flags.c_contiguous)
        for a in arrays)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def gelu(x: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """``out = GELU(x + bias)``, exact GELU by Abramowitz & Stegun 7.1.26 (as
    ``ops._gelu_blocks``); x, out (..., F), bias (F,) or None; out must not overlap x."""
    cols = x.shape[-1]
    LIB.mpiattn_gelu(_ptr(x), _ptr(bias), _ptr(out), x.size // max(cols, 1), cols)
    return out


def softmax_columns(s: np.ndarray, total: np.ndarray) -> None:
    """Softmax down the columns of each (keys, queries) block of s (groups, keys,
    queries), in place and unnormalised: ``s = exp(s - column max)``, and ``total``
    (groups, queries) receives the column sums."""
    groups, rows, cols = s.shape
    LIB.mpiattn_softmax_columns(_ptr(s), _ptr(total), groups, rows, cols)


def store_heads(o: np.ndarray, total: np.ndarray, dest: np.ndarray) -> None:
    """``dest[q, h, :] = o[h, q, :] / total[h, q]``: o (groups, queries, head_dim) and
    total (groups, queries) C-contiguous; dest a (queries, groups, head_dim) view whose
    last two axes are contiguous (heads side by side in a row of a larger array)."""
    groups, queries, head_dim = o.shape
    row = dest.strides[0] // dest.itemsize
    if dest.shape != (queries, groups, head_dim) or dest.strides[1:] != (
            head_dim * 4, 4) or dest.dtype != np.float32:
        raise ValueError(f"store_heads: dest {dest.shape} {dest.strides} does not fit")
    LIB.mpiattn_store_heads(_ptr(o), _ptr(total), _ptr(dest), groups, queries, head_dim,
                            row)


def add_layer_norm(x: np.ndarray, residual: np.ndarray, g: np.ndarray, b: np.ndarray,
                   eps: float, bias: np.ndarray | None, total: np.ndarray | None,
                   out: np.ndarray) -> np.ndarray:
    """``out = LayerNorm(x + bias + residual)`` over rows of (N, H) arrays with gain g and
    shift b (H,); ``total`` (N, H) or None receives ``x + bias``; out must not overlap x or
    residual."""
    rows, cols = x.shape
    LIB.mpiattn_add_layer_norm(_ptr(x), _ptr(residual), _ptr(bias), _ptr(g), _ptr(b), eps,
                               _ptr(total), _ptr(out), rows, cols)
    return out
