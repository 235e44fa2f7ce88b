"""NumPy or CuPy: the one place that knows which array module runs, and on which device.

Math modules stay array-module generic (``xp = get_array_module(x)``); the few operations
NumPy lacks (``erf``) and the device chores (sync, timing, host copies, device choice) live
here. CuPy is imported only when asked for or probed, so CPU ranks never pay for it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ConfigError
from .costs import blas_threads
from .timing import Timer


def get_array_module(x: Any) -> ModuleType:
    """``cupy`` for CuPy arrays, else ``numpy`` (no CuPy import on CPU-only ranks)."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def erf(x: Any, out: Any = None) -> Any:
    """Elementwise erf on the array's own device (exact GELU needs it; NumPy has none).

    NumPy float32: ``erf_float32`` (within 5e-7 of the exact value, 5x faster than scipy's,
    whose erf dominated the MLP); other NumPy arrays: ``erf_float64`` (within 3 ulp), so
    the core needs no SciPy. CuPy arrays: cupyx's erf.
    """
    if get_array_module(x) is not np:
        from cupyx.scipy.special import erf as _erf

        return _erf(x) if out is None else _erf(x, out=out)
    if x.dtype == np.float32:
        return erf_float32(x, out)
    result = erf_float64(x)
    if out is None:
        return result.astype(x.dtype, copy=False) if x.dtype.kind == "f" else result
    out[...] = result
    return out


# W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23
# (1969) 631-637, as in netlib specfun CALERF: |x| <= 0.46875, 0.46875 < |x| <= 4, |x| > 4
_CODY_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
           3.20937758913846947e03, 1.85777706184603153e-1)
_CODY_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
           2.84423683343917062e03)
_CODY_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
           2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
           2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_CODY_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
           1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
           3.43936767414372164e03, 1.23033935480374942e03)
_CODY_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
           1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_CODY_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
           6.05183413124413191e-2, 2.33520497626869185e-3)
_INV_SQRT_PI = 5.6418958354775628695e-1


def _erfc_tail(y: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """exp(-y^2) * ratio, with y^2 split as Cody does so that exp keeps full precision."""
    head = np.trunc(y * 16.0) / 16.0
    return np.exp(-head * head) * np.exp(-(y - head) * (y + head)) * ratio


def erf_float64(x: np.ndarray) -> np.ndarray:
    """erf in float64 by Cody's rational approximations (max abs error 3.3e-16 against
    scipy.special.erf over [-8, 8]); NaN stays NaN, +-inf gives +-1."""
    x = np.asarray(x, dtype=np.float64)
    y = np.abs(x)
    out = np.empty_like(x)
    small, big = y <= 0.46875, y > 4.0
    mid = ~small & ~big & ~np.isnan(y)

    z = y[small] ** 2
    num, den = _CODY_A[4] * z, z
    for a, b in zip(_CODY_A[:3], _CODY_B[:3], strict=True):
        num, den = (num + a) * z, (den + b) * z
    out[small] = x[small] * (num + _CODY_A[3]) / (den + _CODY_B[3])

    ym = y[mid]
    num, den = _CODY_C[8] * ym, ym
    for c, d in zip(_CODY_C[:7], _CODY_D[:7], strict=True):
        num, den = (num + c) * ym, (den + d) * ym
    out[mid] = np.copysign(1.0 - _erfc_tail(ym, (num + _CODY_C[7]) / (den + _CODY_D[7])),
                           x[mid])

    yb = y[big]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = 1.0 / (yb * yb)
        num, den = _CODY_P[5] * z, z
        for p, q in zip(_CODY_P[:4], _CODY_Q[:4], strict=True):
            num, den = (num + p) * z, (den + q) * z
        ratio = (_INV_SQRT_PI - z * (num + _CODY_P[4]) / (den + _CODY_Q[4])) / yb
        tail = np.where(np.isfinite(yb), _erfc_tail(yb, ratio), 0.0)
    out[big] = np.copysign(1.0 - tail, x[big])
    out[np.isnan(x)] = np.nan
    return out


# erfc(z) = t exp(-z^2 + poly(t)), t = 1/(1 + z/2), z >= 0: Numerical Recipes (Press et al.,
# 3rd ed. 2007, sec. 6.2.2, "erfccheb"'s predecessor erfcc), fractional error < 1.2e-7
_ERFC = tuple(np.float32(c) for c in (
    0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
    0.37409196, 1.00002368, -1.26551223))
_ERF_BLOCK = 1 << 15  # elements per pass: every temporary of a block stays in L2


def erf_float32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """erf of a float32 array, 1 - erfc(|x|) with the sign of x, in cache-sized blocks.

    Max abs error 4.3e-7 against float64 erf (float32 rounding included; an ulp of 1 is
    1.2e-7); NaN stays NaN, +-inf gives +-1. ``out`` may be ``x``.
    """
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    elif not out.flags.c_contiguous:  # blocks are runs of a flat view
        out[...] = erf_float32(x)
        return out
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    for i in range(0, flat_x.size, _ERF_BLOCK):
        xb = flat_x[i : i + _ERF_BLOCK]
        z = np.abs(xb)
        t = np.multiply(z, np.float32(0.5))
        t += 1
        np.reciprocal(t, out=t)
        y = np.multiply(t, _ERFC[0])
        for c in _ERFC[1:9]:
            y += c
            y *= t
        y += _ERFC[9]
        np.multiply(z, z, out=z)
        y -= z
        np.exp(y, out=y)
        y *= t
        np.subtract(np.float32(1), y, out=y)
        np.copysign(y, xb, out=flat_out[i : i + _ERF_BLOCK])
    return out


def wrapping_dot(a: Any, b: Any) -> Any:
    """``a @ b`` for unsigned 64-bit integers, wrapping mod 2^64, on the arrays' device.

    NumPy has an integer matmul; on CuPy the product and sum are spelled out, which every
    CuPy version supports for uint64.
    """
    if get_array_module(a) is np:
        return a @ b
    return (a * b).sum(axis=-1)


def data_ptr(x: Any) -> int:
    """Address of the first element (tells whether two arrays start at the same memory)."""
    if get_array_module(x) is np:
        return int(x.__array_interface__["data"][0])
    return int(x.data.ptr)


def grown(cache: dict, key: Any, shape: tuple, make: Callable[[int], Any]) -> Any:
    """A C-contiguous ``shape`` view of the start of ``cache[key]``, a flat buffer made by
    ``make(size)`` and replaced by a bigger one when ``shape`` needs more."""
    size = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = cache[key] = make(max(size, 1))
    return buf[:size].reshape(shape)


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of any array."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


def cupy_device_count() -> int:
    """CUDA devices CuPy can use; 0 when CuPy is missing or no device/driver is present."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CUDARuntimeError without a driver or device
        return 0


@dataclass
class Backend:
    """The array module of this rank and how to wait for and time its work."""

    name: str  # "numpy" | "cupy"
    xp: ModuleType
    device: str  # human-readable device name

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def sync(self) -> None:
        """Wait for queued device work (before a host clock or an MPI call)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        return self.xp.asarray(x, dtype=dtype)

    def timer(self) -> Timer:
        """The clock for this backend's work: CUDA events on CuPy (read after one
        synchronise, never a host clock around queued kernels), ``perf_counter`` on NumPy."""
        return Timer(self.xp)

    def memory_high_water(self) -> int:
        """Bytes: the CuPy pool's total on GPU, the process's peak RSS on CPU."""
        if self.is_gpu:
            return int(self.xp.get_default_memory_pool().total_bytes())
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def nvidia_driver_present() -> bool:
    """Whether this node shows an NVIDIA driver (``/proc/driver/nvidia`` or a
    ``/dev/nvidiaN`` device), looked up without importing CuPy: on a CPU node that import
    alone costs ~150 MiB and ~0.3 s per rank."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


STANDIN_ENV = "MPIATTN_CUPY_STANDIN"  # tests: let ``auto`` see the CuPy stand-in's device


def standin_requested() -> bool:
    """Whether ``MPIATTN_CUPY_STANDIN`` (set, not "0") asks ``auto`` to look for a device
    and the ``cupy`` that imports is the test stand-in (``tests/standin``, marked by
    ``cupy.__standin__``). With the real CuPy the variable is ignored: only a driver counts.
    """
    if os.environ.get(STANDIN_ENV, "0") in ("", "0"):
        return False
    try:
        import cupy
    except Exception:
        return False
    return getattr(cupy, "__standin__", None) == "mpiattn"


def probe_device(index: int) -> str | None:
    """None when a tiny computation on CUDA device ``index`` gives the right numbers (a
    cuBLAS GEMM and a compiled elementwise kernel: what a layer needs), else why not, in
    one line (e.g. a CUDA library CuPy cannot load)."""
    try:
        import cupy
        from cupyx.scipy.special import erf as cupy_erf

        with cupy.cuda.Device(index):
            a = cupy.arange(16, dtype=cupy.float32).reshape(4, 4)
            got = float((a @ a).sum()) + float(cupy_erf(cupy.zeros(2, cupy.float32)).sum())
        want = float((np.arange(16, dtype=np.float32).reshape(4, 4) @
                      np.arange(16, dtype=np.float32).reshape(4, 4)).sum())
        return None if got == want else f"a 4x4 GEMM on it gave {got}, not {want}"
    except Exception as err:  # a library that does not load, a driver too old, ...
        return " ".join(f"{type(err).__name__}: {err}".split())[:200]


def select(name: str, local_rank: int = 0) -> Backend:
    """The backend ``name`` asks for. ``auto`` takes CuPy only where the node shows an
    NVIDIA driver, CuPy sees a device and a tiny computation on it succeeds; otherwise
    NumPy, saying in one line (local rank 0) why when a device was seen but failed.
    ``cupy`` raises ConfigError with that reason instead.

    With CuPy, rank ``local_rank`` on a node takes device ``local_rank % device_count``.
    """
    if name not in ("auto", "numpy", "cupy"):
        raise ConfigError(f"backend '{name}' is unknown: use auto, numpy or cupy")
    look = name == "cupy" or (name == "auto" and (nvidia_driver_present()
                                                  or standin_requested()))
    devices = cupy_device_count() if look else 0
    if name == "cupy" and devices == 0:
        raise ConfigError(
            "backend = 'cupy' but no CUDA device is usable (CuPy missing or no GPU):"
            " install mpiattn[gpu] on a GPU node, or set backend = 'auto'"
        )
    if devices:
        index = local_rank % devices
        failure = probe_device(index)
        if failure is None:
            import cupy

            cupy.cuda.Device(index).use()
            props = cupy.cuda.runtime.getDeviceProperties(index)
            label = props["name"]
            label = label.decode() if isinstance(label, bytes) else label
            return Backend("cupy", cupy, f"cuda:{index} {label}")
        if name == "cupy":
            raise ConfigError(f"backend = 'cupy' but CUDA device {index} fails a test"
                              f" computation ({failure}): install mpiattn[gpu] (CuPy with"
                              " its CUDA libraries), or set backend = 'numpy'")
        if local_rank == 0:
            print(f"mpiattn: note: CUDA device {index} fails a test computation ({failure});"
                  " using NumPy on the CPU", file=sys.stderr, flush=True)
    return Backend("numpy", np, f"cpu ({os.cpu_count()} cores)")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# The variable each BLAS library reads for its own thread count; every library also
# follows OMP_NUM_THREADS when its own variable is not set.
BLAS_THREAD_VARS = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS"}
_THREADS_FROM: dict[str, str] = {}  # library file -> what set its threads (limit_blas_threads)


def _env_count(name: str) -> int:
    """A positive thread count from environment variable ``name``; 0 when unset or invalid.

    ``OMP_NUM_THREADS=4,2`` (nested levels) counts as 4.
    """
    first = os.environ.get(name, "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else 0


def requested_blas_threads(internal_api: str) -> tuple[int, str]:
    """Threads the environment asks of one BLAS library, and the variable that asks.

    Precedence: the library's own variable (``OPENBLAS_NUM_THREADS`` for OpenBLAS,
    ``MKL_NUM_THREADS`` for MKL), then ``OMP_NUM_THREADS``; ``(0, "")`` when neither is set.
    """
    for name in (BLAS_THREAD_VARS.get(internal_api, ""), "OMP_NUM_THREADS"):
        if name and _env_count(name):
            return _env_count(name), name
    return 0, ""


def _blas_libraries() -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_info

    return [d for d in threadpool_info() if d.get("user_api") == "blas"]


def limit_blas_threads(ranks_on_node: int) -> tuple[int, Any]:
    """Give each of the ranks on a node its share of the cores for BLAS.

    Per library, an explicit variable wins (``requested_blas_threads``: the launcher or batch
    script knows best); otherwise usable cores // ranks on the node, at least 1. Returns the
    thread count in effect after limiting, read back from threadpoolctl (the largest over
    the loaded BLAS libraries; the share when none is loaded), and the threadpoolctl
    limiter, which the caller keeps alive.
    """
    from threadpoolctl import threadpool_limits

    share = blas_threads(usable_cores(), ranks_on_node)
    limits: dict[str, int] = {}
    for lib in _blas_libraries():
        wanted, name = requested_blas_threads(lib["internal_api"])
        limits[lib["filepath"]] = wanted or share  # threadpoolctl keys: file, prefix, API
        _THREADS_FROM[lib["filepath"]] = (f"{name}={wanted}" if wanted else
                                          f"{usable_cores()} cores / {ranks_on_node} ranks")
    limiter = threadpool_limits(limits=limits or share, user_api="blas")
    actual = [int(lib["num_threads"]) for lib in _blas_libraries()]
    return (max(actual) if actual else share), limiter


def oversubscription(ranks_on_node: int, threads: int, cores: int | None = None) -> str | None:
    """One warning line when ranks x BLAS threads exceed the node's cores, else None.

    ``cores`` defaults to this process's usable cores. The line names the variable to set:
    a loaded library's own variable when the environment sets it (it wins), else
    ``OMP_NUM_THREADS``.
    """
    cores = cores or usable_cores()
    if threads < 1 or ranks_on_node * threads <= cores:
        return None
    factor = ranks_on_node * threads / cores
    fit = blas_threads(cores, ranks_on_node)
    names = sorted({requested_blas_threads(lib["internal_api"])[1] or "OMP_NUM_THREADS"
                    for lib in _blas_libraries()}) or ["OMP_NUM_THREADS"]
    fixes = [f"set {' '.join(f'{name}={fit}' for name in names)}"] if threads > fit else []
    if ranks_on_node > cores:
        fixes.append(f"start at most {cores} ranks per node")
    plural = "s" if threads > 1 else ""
    return (f"mpiattn: warning: {ranks_on_node} ranks x {threads} BLAS thread{plural} on"
            f" {cores} cores: oversubscribed, expect ~{factor:.3g}x slower; "
            + " and ".join(fixes))


def blas_info() -> list[dict[str, Any]]:
    """BLAS libraries loaded, their thread counts now and what set them (for provenance).

    ``threads_from`` is ``VAR=N`` or ``C cores / K ranks`` after ``limit_blas_threads``,
    else the variable the library read at load time, else ``library default``.
    """
    keep = ("internal_api", "prefix", "version", "num_threads", "architecture")
    rows = []
    for lib in _blas_libraries():
        wanted, name = requested_blas_threads(lib["internal_api"])
        start = f"{name}={wanted}" if wanted else "library default"
        rows.append({**{k: lib.get(k) for k in keep},
                     "threads_from": _THREADS_FROM.get(lib["filepath"], start)})
    return rows
