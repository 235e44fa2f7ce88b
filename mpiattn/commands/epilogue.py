"""The end of every job (run, text run, bench, train): each rank's host and device
gathered, the file written on rank 0 (provenance first, then the kind's writer from
``io.formats``), published atomically, the outcome agreed by every rank
(``jobkit.conclude``: a failed write is one line and one exit code everywhere), then
rank 0's summary.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..io import h5io
from ..io.formats.common import Provenance, write_provenance
from . import jobkit

if TYPE_CHECKING:
    from mpi4py import MPI

    from .placement import Placement


def attention_description(cfg: Config, p: Placement) -> str:
    """The attention algorithm as the job runs it: "plain", "blocked (block B)", with
    ", sequence parallel: ulysses | ring" under sequence parallelism."""
    from ..core.attention import Options

    impl, block = Options.configured(cfg.attention.impl, cfg.attention.block,
                                     p.threads).resolve(p.batch.shape[1])
    described = impl if impl == "plain" else f"{impl} (block {block})"
    parts = p.grid.axis_size("sequence")
    if parts > 1:
        from ..core.seqattn import SequenceSplit, resolve

        if resolve(cfg.attention.sequence, min(p.head_counts), parts) == "ulysses":
            described += ", sequence parallel: ulysses"
        else:  # the ring runs the blocked online softmax on each slice (make_sequence)
            widest = SequenceSplit(p.batch.shape[1], parts, 0).widest
            described = (f"blocked (block {cfg.attention.block or min(512, widest)}),"
                         " sequence parallel: ring")
    return described


def provenance(cfg: Config, p: Placement, command: str, started: dt.datetime,
               hosts: list[tuple[str, str, str]]) -> Provenance:
    """The job's provenance as plain values; ``hosts`` (rank,) of (host, device,
    kernels)."""
    from mpi4py import MPI

    from ..core.backend import blas_info

    return Provenance(
        command=command, config_toml=cfg.to_toml(), started=started,
        axes={axis: p.grid.axis_size(axis) for axis in ("tensor", "data", "pipeline",
                                                         "sequence")},
        head_partition=tuple(p.head_counts), backend=p.backend.name,
        cuda_aware=("yes" if p.cuda_aware else "no (pinned host staging)")
        if p.backend.is_gpu else "n/a (host arrays)",
        mpi_library=MPI.Get_library_version().replace("\x00", "").strip(),
        blas=str(blas_info()), threads=p.threads, attention=attention_description(cfg, p),
        timing=p.backend.timer().method, hosts=tuple(h for h, _, _ in hosts),
        devices=tuple(d for _, d, _ in hosts), kernels=tuple(k for _, _, k in hosts))


def gather_records(world: MPI.Comm, mine: list) -> list:
    """Collective: every rank's (replica, record) pairs, flattened in rank order on rank
    0 ([] elsewhere)."""
    parts = world.gather(mine)
    return [item for part in parts for item in part] if parts is not None else []


def finish(world: MPI.Comm, out: Any, cfg: Config, p: Placement, started: dt.datetime,
           command: str, write: Callable[[Any], None] | None, *,
           opener: Callable[[Any], Any] = h5io.atomic_file,
           after: Callable[[], Any] | None = None, final: bool = True) -> Any:
    """Collective: the job's file written and published by rank 0, the outcome agreed.

    ``write(f)`` adds the kind's contents after the provenance (rank 0's; the others
    may pass None); ``opener(out)`` is the
    context that publishes (``h5io.atomic_file``; ``atomic_update`` when the replicas
    wrote rows in parallel; the text run's ``disk_file``); ``after()`` runs on rank 0
    once it is published (the summary, an export) and its value is returned there
    (``out.path`` without it). ``final``: as ``jobkit.conclude``. Raises on every rank
    what rank 0's write raised.
    """
    from ..core import kernels

    hosts = world.gather((socket.gethostname(), p.backend.device,
                          kernels.used_for(cfg.dtype, p.backend.is_gpu)))

    def publish() -> Any:
        assert write is not None, "rank 0 writes the file"
        with opener(out) as f:
            write_provenance(f, provenance(cfg, p, command, started, hosts))
            write(f)
        return after() if after is not None else out.path

    return jobkit.conclude(world, publish if world.Get_rank() == 0 else None, final)
