"""What every benchmark shares: timed repeats behind a barrier and the slowest rank per
repeat. ``bench`` and ``seqbench`` both import it; their files end as every job's do
(``epilogue.finish``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..core.timing import Timer

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


def timed(world: MPI.Comm, clock: Timer | Callable[[], None], fn: Callable[[], Any], repeats: int,
          warmup: int = 1) -> np.ndarray:
    """Seconds per repeat on this rank; a barrier lines the ranks up before each one.

    ``clock``: the backend's ``Timer`` (CuPy: a pair of CUDA events per repeat, all read
    after one synchronise at the end), or a plain callable for host work (``perf_counter``)."""
    timer, sync = (clock, clock.sync) if isinstance(clock, Timer) else (Timer(), clock)
    for _ in range(warmup):
        fn()
    sync()  # the warm-up's device work is not the first repeat's
    spans = []
    for _ in range(repeats):
        world.Barrier()
        start = timer.mark()
        fn()
        if not timer.events:
            sync()  # a host clock reads only after the work is done
        spans.append((start, timer.mark()))
    return np.array(timer.elapsed(spans))


def slowest(world: MPI.Comm, seconds: np.ndarray) -> np.ndarray:
    """Per repeat, the time of the slowest rank: what the job waits for."""
    from mpi4py import MPI

    out = np.empty_like(seconds)
    world.Allreduce(seconds, out, op=MPI.MAX)
    return out
