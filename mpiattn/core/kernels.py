"""Fused float32 kernels for the NumPy path, compiled from ``_kernels.c`` when the package
is installed, loaded with ctypes; ``None`` of them where the build was skipped.

NumPy runs an element-wise expression as one pass over memory per operation: exact GELU
is 21 passes, attention's softmax 4 over scores that go to memory and back, a residual
add and LayerNorm 8. Those passes were a quarter of an encoder layer's time on one core
(MiniLM, 32 x 256 tokens: about 90 of 340 ms, against 225 ms of products). Each kernel
here does its operation in one or two passes (``docs/text-corpora.md`` has the
measurements), as oneDNN and ONNX Runtime fuse them; attention's scores never leave
the L1 cache. Their results differ from the NumPy passes' in the last bits (another
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

_SIGNATURES = {  # name: (argument types, result type)
    "mpiattn_gelu": ((_P, _P, _P, _N, _N), None),
    "mpiattn_attention": ((_P, _P, _P, _N, _N, _N, _N, _N, _F, _P, _P, _P, _P, _P, _N, _P, _N,
                           _P), None),
    "mpiattn_attention_work": ((_N, _N), _N),
    "mpiattn_add_layer_norm": ((_P, _P, _P, _P, _P, _F, _P, _P, _N, _N), None),
    "mpiattn_kernels_isa": ((), ctypes.c_char_p),
}


TURNED_OFF = os.environ.get("MPIATTN_KERNELS", "").lower() == "numpy"


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give the library's functions their C signatures (the tests bind other builds)."""
    for name, (args, result) in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = result
    return lib


def _load(here: Path = Path(__file__).parent) -> tuple[ctypes.CDLL | None, str]:
    """The compiled library in ``here`` (this package) and "", or None and why not."""
    if TURNED_OFF:
        return None, "MPIATTN_KERNELS=numpy"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels{suffix}"
        if path.is_file():
            try:
                return bind(ctypes.CDLL(str(path))), ""
            except AttributeError:  # a function missing: built from older sources
                return None, f"{path.name} is built from older sources: reinstall mpiattn"
            except OSError as err:  # not a library for this machine, or damaged
                return None, f"{path.name} does not load ({err}): reinstall mpiattn"
    return None, "the compiled kernels were not built"


LIB, _WHY_NOT = _load()


def description() -> str:
    """What runs the element-wise operations, for ``mpiattn info`` and the files' root
    attribute ``kernels``: "compiled, AVX-512 clone (_kernels....so)" or "NumPy passes
    (why)"."""
    if LIB is not None:
        return f"compiled, {LIB.mpiattn_kernels_isa().decode()} ({Path(LIB._name).name})"
    return f"NumPy passes ({_WHY_NOT or 'turned off'})"


def used_for(dtype: str, on_device: bool) -> str:
    """What runs the element-wise operations of arrays of ``dtype`` ("float32", ...): "n/a"
    on a device (CuPy), the NumPy passes for any dtype but float32, else ``description()``
    (the files' ``/ranks/kernels``; ``CheckedAllreduce`` names it when copies differ)."""
    if on_device:
        return "n/a (CuPy on the device)"
    if np.dtype(dtype) != np.float32:
        return f"NumPy passes ({np.dtype(dtype).name}: the compiled kernels are float32)"
    return description()


def fits(*arrays: np.ndarray | None, written: tuple[np.ndarray | None, ...] = ()) -> bool:
    """Whether the kernels can take these arrays: the library is loaded and every array
    given is a C-contiguous float32 NumPy array (None entries are skipped), and those in
    ``written`` may be written."""
    return LIB is not None and all(
        a is None or (type(a) is np.ndarray and a.dtype == np.float32
                      and a.flags.c_contiguous)
        for a in arrays + written) and all(a is None or a.flags.writeable for a in written)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def gelu(x: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """``out = GELU(x + bias)``, exact GELU by Abramowitz & Stegun 7.1.26 (as
    ``ops._gelu_blocks``); x, out (..., F), bias (F,) or None; out must not overlap x."""
    cols = x.shape[-1]
    LIB.mpiattn_gelu(_ptr(x), _ptr(bias), _ptr(out), x.size // max(cols, 1), cols)
    return out


def _rows_fit(a: np.ndarray, shape: tuple[int, int]) -> bool:
    """a is float32 of this shape with contiguous, non-overlapping rows a whole number of
    floats apart."""
    return (type(a) is np.ndarray and a.shape == shape and a.dtype == np.float32
            and a.strides[-1] == 4 and a.strides[0] >= 4 * shape[1] and a.strides[0] % 4 == 0)


def _fits_or_none(a: np.ndarray | None, shape: tuple[int, ...]) -> bool:
    return a is None or (fits(a) and a.shape == shape)


def attention_work(head_dim: int, keys: int) -> int:
    """Floats of work space that ``attention`` needs for these sizes."""
    return LIB.mpiattn_attention_work(head_dim, keys)


def attention(rows: np.ndarray, heads: int, first: int, stop: int, head_dim: int, keys: int,
              scale: float, qkv_bias: np.ndarray | None, key_bias: np.ndarray | None,
              position: np.ndarray | None, dest: np.ndarray, work: np.ndarray) -> None:
    """Softmax attention of heads ``first:stop`` of one sequence, fused (scores, softmax
    and the product with V per block of 8 queries, in the L1 cache), into ``dest``.

    rows (S, 3*heads*head_dim): the sequence's fused QKV product, [Q | K | V] heads, rows
    contiguous; keys: the first ``keys`` rows are the keys; qkv_bias (3*heads*head_dim,)
    or None: the QKV bias, not yet added to rows (it is added here); key_bias (keys,) or
    None: added to every query's scores; position (heads, S, S) [query, key] or None;
    dest (S, heads*head_dim), rows contiguous: head h's output goes to its columns
    h*head_dim:(h+1)*head_dim; work: float32 with ``attention_work(head_dim, keys)``
    elements; dest and work are written, and may not overlap each other or the inputs.
    Raises ValueError when an array does not fit those shapes, layouts and rules.
    """
    heads, first, stop, head_dim, keys = (int(n) for n in (heads, first, stop, head_dim, keys))
    scale = float(scale)
    seq = rows.shape[0]
    width = heads * head_dim
    read = (rows, qkv_bias, key_bias, position)
    if not (_rows_fit(rows, (seq, 3 * width)) and _rows_fit(dest, (seq, width))
            and 0 <= first <= stop <= heads and 0 <= keys <= seq
            and _fits_or_none(qkv_bias, (3 * width,)) and _fits_or_none(key_bias, (keys,))
            and _fits_or_none(position, (heads, seq, seq))
            and fits(written=(work,)) and work.size >= attention_work(head_dim, keys)
            and dest.flags.writeable and not np.may_share_memory(dest, work)
            and not any(a is not None and np.may_share_memory(a, b)
                        for a in read for b in (dest, work))):
        raise ValueError("kernels.attention: the arrays do not fit")
    if first == stop:
        return
    at = first * head_dim
    base, item = rows.ctypes.data, rows.itemsize

    def bias_at(offset: int) -> int | None:
        return None if qkv_bias is None else qkv_bias.ctypes.data + (offset + at) * item

    LIB.mpiattn_attention(
        base + at * item, base + (width + at) * item, base + (2 * width + at) * item,
        rows.strides[0] // item, stop - first, head_dim, seq, keys, scale,
        bias_at(0), bias_at(width), bias_at(2 * width), _ptr(key_bias),
        None if position is None else position.ctypes.data + first * seq * seq * item, seq,
        dest.ctypes.data + at * item, dest.strides[0] // item, work.ctypes.data)


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
