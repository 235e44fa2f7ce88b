"""``cupy.cuda.runtime`` of the stand-in: the device count and properties mpiattn reads."""

from __future__ import annotations

import os
from typing import Any


class CUDARuntimeError(RuntimeError):
    pass


def getDeviceCount() -> int:
    """``CUPY_STANDIN_DEVICES`` (default 1; 0 shows a node without a usable device)."""
    count = int(os.environ.get("CUPY_STANDIN_DEVICES", "1"))
    if count == 0:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return count


def getDeviceProperties(device: int) -> dict[str, Any]:
    if not 0 <= device < getDeviceCount():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return {"name": f"CuPy stand-in {device} (NumPy)".encode(), "totalGlobalMem": 16 << 30,
            "major": 9, "minor": 0, "multiProcessorCount": 1}


def runtimeGetVersion() -> int:
    return 12080
