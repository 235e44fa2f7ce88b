"""What every benchmark shares: timed repeats behind a barrier and the slowest rank per
repeat. ``bench`` and ``seqbench`` both import it; their files end as every job's do
(``epilogue.finish``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


def timed(world: MPI.Comm, sync: Callable[[], None], fn: Callable[[], Any], repeats: int,
          warmup: int = 1) -> np.ndarray:
    """Seconds per repeat on this rank; a barrier lines the ranks up before each one."""
    for _ in range(warmup):
        fn()
    sync()  # the warm-up's device work is not the first repeat's
    out = np.empty(repeats)
    for i in range(repeats):
        world.Barrier()
        start = time.perf_counter()
        fn()
        sync()
        out[i] = time.perf_counter() - start
    return out


def slowest(world: MPI.Comm, seconds: np.ndarray) -> np.ndarray:
    """Per repeat, the time of the slowest rank: what the job waits for."""
    from mpi4py import MPI

    out = np.empty_like(seconds)
    world.Allreduce(seconds, out, op=MPI.MAX)
    return out
