"""``cupy.cuda`` of the stand-in: devices, streams, events, the runtime's queries.

A stream counts its launches (every operation that writes device memory is one) and how
far it was synchronised; ``cupy.ndarray.__cuda_array_interface__`` compares the two for
the launch that last wrote a buffer handed to MPI.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .. import _log
from . import runtime as runtime

_state = {"device": 0}
_clock = time.perf_counter  # the events' clock, bound at import (tests may wrap the module's)


def _current_id() -> int:
    return _state["device"]


class Device:
    """CUDA device ``id``: ``use()`` makes it current; ``with Device(i):`` for a block."""

    def __init__(self, device: int | None = None) -> None:
        self.id = _current_id() if device is None else int(device)
        if not 0 <= self.id < runtime.getDeviceCount():
            raise runtime.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self._previous: list[int] = []

    def use(self) -> None:
        _state["device"] = self.id

    def __enter__(self) -> Device:
        self._previous.append(_current_id())
        self.use()
        return self

    def __exit__(self, *exc: Any) -> None:
        _state["device"] = self._previous.pop()

    def synchronize(self) -> None:
        for stream in _streams.get(self.id, {}).values():
            stream._done = stream._pending
        _log.record.syncs += 1

    @property
    def mem_info(self) -> tuple[int, int]:
        total = runtime.getDeviceProperties(self.id)["totalGlobalMem"]
        return total - _log.record.live_bytes.get(self.id, 0), total

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


class Stream:
    """A CUDA stream: launches queue on it until ``synchronize()``."""

    _count = 0

    def __init__(self, null: bool = False, non_blocking: bool = False) -> None:
        Stream._count += 1
        self.name = "null" if null else f"stream{Stream._count}"
        self.device_id = _current_id()
        self._pending = 0  # launches queued
        self._done = 0  # launches known finished (after a synchronisation)
        self._previous: list[Stream] = []

    def _launch(self) -> int:
        self._pending += 1
        _log.record.launches += 1
        return self._pending

    def synchronize(self) -> None:
        self._done = self._pending
        _log.record.syncs += 1

    def record(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event

    def use(self) -> Stream:
        _streams.setdefault(self.device_id, {})["current"] = self
        return self

    def __enter__(self) -> Stream:
        self._previous.append(get_current_stream())
        return self.use()

    def __exit__(self, *exc: Any) -> None:
        self._previous.pop().use()

    @property
    def done(self) -> bool:
        return self._done >= self._pending

    def __repr__(self) -> str:
        return f"<stand-in Stream {self.name} on device {self.device_id}>"


_streams: dict[int, dict[str, Stream]] = {}


def get_current_stream() -> Stream:
    per = _streams.setdefault(_current_id(), {})
    if "null" not in per:
        per["null"] = Stream(null=True)
    return per.get("current", per["null"])


class Event:
    """A CUDA event: ``record()`` on a stream, ``synchronize()``. Its time is the host clock
    read at ``record()``: the stand-in's kernels run eagerly, so every launch queued before
    has finished then (an implicit synchronisation), which makes the elapsed time between
    two events plausible (the host time between the two records). ``record.events`` counts
    records by caller, ``record.elapsed`` the ``get_elapsed_time`` reads."""

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self._stream: Stream | None = None
        self._launch = 0
        self._time = 0.0

    def record(self, stream: Stream | None = None) -> None:
        self._stream = stream or get_current_stream()
        self._launch = self._stream._pending
        self._time = _clock()
        who = _log.caller()
        _log.record.events[who] = _log.record.events.get(who, 0) + 1

    def synchronize(self) -> None:
        if self._stream is None:
            raise runtime.CUDARuntimeError("cudaErrorInvalidResourceHandle: event not recorded")
        self._stream._done = max(self._stream._done, self._launch)
        _log.record.syncs += 1

    @property
    def done(self) -> bool:
        return self._stream is not None and self._stream._done >= self._launch


def get_elapsed_time(start_event: Event, end_event: Event) -> float:
    """Milliseconds between two synchronised events (CUDA refuses unsynchronised ones)."""
    if not end_event.done or not start_event.done:
        raise runtime.CUDARuntimeError("cudaErrorNotReady: device not ready")
    who = _log.caller()
    _log.record.elapsed[who] = _log.record.elapsed.get(who, 0) + 1
    return (end_event._time - start_event._time) * 1e3


def is_available() -> bool:
    return runtime.getDeviceCount() > 0


def _devices() -> int:
    return int(os.environ.get("CUPY_STANDIN_DEVICES", "1"))
