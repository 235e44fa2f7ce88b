"""What every benchmark shares: timed repeats behind a barrier,
the slowest rank per repeat, and the bench file's publishing (provenance, result, atomic
file, agreed end). ``bench`` and ``seqbench`` both import it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import Config
from ..io import h5io
from ..io.schema import write_provenance
from . import jobkit


def timed(world: Any, sync: Callable[[], None], fn: Callable[[], Any], repeats: int,
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
