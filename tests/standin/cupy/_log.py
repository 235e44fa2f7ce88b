"""What the stand-in saw: transfers between host and device, synchronisations, device
memory and the device buffers handed to MPI (one process-wide record, ``cupy.standin``).

The record is plain Python (lists and dicts) so that a test, or a run that dumps it at
exit (``CUPY_STANDIN_RECORD=path``, one JSON file per process), can assert on it.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from dataclasses import asdict, dataclass, field


@dataclass
class Transfer:
    """One copy between host and device (``kind``: ``get``, ``asnumpy``, ``scalar`` for a
    0-d read such as ``float(x)``, ``asarray``/``set``/``setitem`` for host to device)."""

    direction: str  # "d2h" | "h2d"
    kind: str
    nbytes: int
    pinned: bool  # the host side is pinned memory (cupyx.empty_pinned)
    caller: str  # "module:function" of the first frame outside the stand-in


@dataclass
class Record:
    transfers: list[Transfer] = field(default_factory=list)
    syncs: int = 0  # stream/device/event synchronisations
    launches: int = 0  # operations that wrote device memory (a kernel each, on a GPU)
    mpi_device_buffers: int = 0  # device buffers MPI read through __cuda_array_interface__
    mpi_refused: int = 0  # device buffers refused: MPI not CUDA-aware, or stream not synced
    peak_bytes: dict[int, int] = field(default_factory=dict)  # device id -> peak live bytes
    live_bytes: dict[int, int] = field(default_factory=dict)
    allocations: dict[int, int] = field(default_factory=dict)
    pinned_bytes: int = 0
    pinned_allocations: int = 0
    api: dict[str, int] = field(default_factory=dict)  # CuPy names called -> calls
    events: dict[str, int] = field(default_factory=dict)  # caller -> cuda.Event records
    elapsed: dict[str, int] = field(default_factory=dict)  # caller -> get_elapsed_time reads

    def used(self, name: str) -> None:
        self.api[name] = self.api.get(name, 0) + 1

    def d2h(self, kind: str | None = None) -> list[Transfer]:
        return [t for t in self.transfers if t.direction == "d2h"
                and (kind is None or t.kind == kind)]

    def h2d(self) -> list[Transfer]:
        return [t for t in self.transfers if t.direction == "h2d"]

    def reset(self) -> None:
        fresh = Record()
        fresh.live_bytes = dict(self.live_bytes)  # live arrays stay live
        fresh.peak_bytes = dict(self.live_bytes)
        self.__dict__.update(fresh.__dict__)

    def as_dict(self) -> dict:
        return asdict(self)


record = Record()


def mpi_cuda_aware() -> bool:
    """Whether the simulated MPI library takes device buffers (``CUPY_STANDIN_CUDA_AWARE``)."""
    return os.environ.get("CUPY_STANDIN_CUDA_AWARE", "0") not in ("", "0", "false")


# helpers whose caller is the one that matters (the copy is made for the caller)
_PASS_THROUGH = {"mpiattn.core.backend:to_host"}
_COMPREHENSIONS = {"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}  # their function


def caller() -> str:
    """``module:function`` of the nearest frame outside the stand-in packages (and the
    one-line helpers of ``_PASS_THROUGH``, and comprehensions: their function counts)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        name = f"{module}:{frame.f_code.co_name}"
        if (module.split(".")[0] not in ("cupy", "cupyx", "numpy") and name not in _PASS_THROUGH
                and frame.f_code.co_name not in _COMPREHENSIONS):
            return name
        frame = frame.f_back
    return "?"


def _dump() -> None:
    path = os.environ.get("CUPY_STANDIN_RECORD")
    if not path:
        return
    rank = next((os.environ[k] for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK") if k in os.environ),
                "0")
    with open(f"{path}.{rank}.json", "w") as f:
        json.dump(record.as_dict(), f)


atexit.register(_dump)
