"""NumPy or CuPy: the one place that knows which array module runs, and on which device.

Math modules stay array-module generic (``xp = get_array_module(x)``); the few operations
NumPy lacks (``erf``) and the device chores (sync, timing, host copies, device choice) live
here. CuPy is imported only when asked for or probed, so CPU ranks never pay for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .errors import ConfigError


def get_array_module(x: Any) -> ModuleType:
    """``cupy`` for CuPy arrays, else ``numpy`` (no CuPy import on CPU-only ranks)."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def erf(x: Any, out: Any = None) -> Any:
    """Elementwise erf on the array's own device (exact GELU needs it; NumPy has none)."""
    if get_array_module(x) is np:
        from scipy.special import erf as _erf
    else:
        from cupyx.scipy.special import erf as _erf
    return _erf(x) if out is None else _erf(x, out=out)


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

    def timer(self) -> Callable[[], float]:
        """A clock in seconds that is honest for device work: it syncs before reading."""

        def now() -> float:
            self.sync()
            return time.perf_counter()

        return now

    def memory_high_water(self) -> int:
        """Bytes: the CuPy pool's total on GPU, the process's peak RSS on CPU."""
        if self.is_gpu:
            return int(self.xp.get_default_memory_pool().total_bytes())
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def select(name: str, local_rank: int = 0) -> Backend:
    """The backend ``name`` asks for; ``auto`` takes CuPy only when a device is present.

    With CuPy, rank ``local_rank`` on a node takes device ``local_rank % device_count``.
    """
    if name not in ("auto", "numpy", "cupy"):
        raise ConfigError(f"backend '{name}' is unknown: use auto, numpy or cupy")
    devices = cupy_device_count() if name in ("auto", "cupy") else 0
    if name == "cupy" and devices == 0:
        raise ConfigError(
            "backend = 'cupy' but no CUDA device is usable (CuPy missing or no GPU):"
            " install mpiattn[gpu] on a GPU node, or set backend = 'auto'"
        )
    if devices:
        import cupy

        index = local_rank % devices
        cupy.cuda.Device(index).use()
        props = cupy.cuda.runtime.getDeviceProperties(index)
        label = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return Backend("cupy", cupy, f"cuda:{index} {label}")
    return Backend("numpy", np, f"cpu ({os.cpu_count()} cores)")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def limit_blas_threads(ranks_on_node: int) -> tuple[int, Any]:
    """Give each of the ranks on a node its share of the cores for BLAS.

    Returns the thread count and the threadpoolctl limiter (kept alive by the caller).
    An explicit ``OMP_NUM_THREADS`` wins: the launcher or batch script knows best.
    """
    from threadpoolctl import threadpool_limits

    explicit = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(explicit) if explicit.isdigit() and int(explicit) > 0 else 0
    threads = threads or max(1, usable_cores() // max(1, ranks_on_node))
    return threads, threadpool_limits(limits=threads, user_api="blas")


def blas_info() -> list[dict[str, Any]]:
    """BLAS libraries NumPy loaded and their thread counts (for provenance)."""
    from threadpoolctl import threadpool_info

    keep = ("internal_api", "version", "num_threads", "architecture")
    return [{k: d.get(k) for k in keep} for d in threadpool_info() if d.get("user_api") == "blas"]
