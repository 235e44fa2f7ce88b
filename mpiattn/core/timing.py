"""One clock for device and host work: CUDA events on CuPy, ``time.perf_counter`` on NumPy.

A ``Timer`` hands out *marks* and turns pairs of them into seconds later, in one go:

    timer = Timer(xp)
    start = timer.mark()          # CuPy: a cupy.cuda.Event recorded on the current stream
    ...                           # queued kernels, MPI calls, anything
    end = timer.mark()
    (seconds,) = timer.elapsed([(start, end)])   # one synchronise, then the events' times

On CuPy a mark is an event the device passes when it reaches that point of the stream, so
an interval is the device's time between the two points, whether or not the host waited
in between; the host never reads a clock around queued work. ``elapsed`` synchronises
once (the current stream, where every mark is recorded), then reads every pair with
``cupy.cuda.get_elapsed_time`` (milliseconds, converted to seconds). On NumPy a mark
is ``perf_counter()`` (the work ran when the call returned) and ``elapsed`` subtracts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

HOST = "host clock (perf_counter)"
EVENTS = "cuda events"


def _host_clock() -> float:
    """``time.perf_counter()``, looked up at each call (a test may wrap it)."""
    return time.perf_counter()


class Timer:
    """Marks and intervals on array module ``xp`` (``numpy`` or ``cupy``).

    ``clock``: the host clock of the NumPy path (default ``perf_counter``; tests inject a
    fake one). ``method``:
    ``EVENTS`` or ``HOST``, what a file records as its timing method. ``intervals``: how many
    intervals ``elapsed`` resolved (a test compares it with the events CuPy saw read).
    """

    def __init__(self, xp: Any = np, clock: Callable[[], float] | None = None) -> None:
        self.xp = xp
        self.events = xp is not np and hasattr(xp, "cuda")
        self.method = EVENTS if self.events else HOST
        self.clock = clock if clock is not None else _host_clock
        self.intervals = 0

    def mark(self) -> Any:
        """A point in the work: an event recorded on the current stream, or a host time (s)."""
        if not self.events:
            return self.clock()
        event = self.xp.cuda.Event()
        event.record()
        return event

    def sync(self) -> None:
        """Wait for the work queued on the current stream, every mark included (no-op on
        NumPy)."""
        if self.events:
            self.xp.cuda.get_current_stream().synchronize()

    def elapsed(self, pairs: Sequence[tuple[Any, Any]]) -> list[float]:
        """Seconds of each (start, end) pair of marks, in order; one synchronise in all."""
        self.intervals += len(pairs)
        if not self.events:
            return [end - start for start, end in pairs]
        if not pairs:
            return []
        self.sync()
        get = self.xp.cuda.get_elapsed_time
        return [get(start, end) / 1e3 for start, end in pairs]

    def between(self, start: Any, end: Any) -> float:
        """Seconds of one interval (a synchronise on CuPy: prefer ``elapsed`` for several)."""
        return self.elapsed([(start, end)])[0]
