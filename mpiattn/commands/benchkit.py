"""What every benchmark shares: timed repeats behind a barrier,
the slowest rank per repeat, and the bench file's publishing (provenance, result, atomic
file, agreed end). ``bench`` and ``seqbench`` both import it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import Config
from ..core.timing import Timer
from ..io import h5io
from ..io.schema import write_provenance
from . import jobkit


def timed(world: Any, clock: Timer | Callable[[], None], fn: Callable[[], Any], repeats: int,
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


def publish(world: Any, out: Any, cfg: Config, p: Any, started: Any, host_info: Any,
            write_result: Callable[[Any], None]) -> None:
    """Rank 0's end of a bench: the file (provenance, then ``write_result(fh)``) built and
    published atomically (``h5io.atomic_file``), concluded with the others
    (``jobkit.conclude``)."""

    def write() -> None:
        with h5io.atomic_file(out) as fh:
            write_provenance(fh, cfg, p, started, "bench", host_info)
            write_result(fh)

    jobkit.conclude(world, write)


def slowest(world: Any, seconds: np.ndarray) -> np.ndarray:
    """Per repeat, the time of the slowest rank: what the job waits for."""
    from mpi4py import MPI

    out = np.empty_like(seconds)
    world.Allreduce(seconds, out, op=MPI.MAX)
    return out
