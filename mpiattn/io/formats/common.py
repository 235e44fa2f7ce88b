"""What every file kind writes: provenance (root attributes and ``/ranks``), phase
seconds with their ``phase`` coordinate, and the checksum records of the checked
transfers. Writers take plain values (``Provenance``), never the job's placement.

Dimension names (format 2; docs, "Files"): one name is one length in a file, so axes of
different lengths have different names (``step`` of the history, ``eval_step`` of the
held-out evaluations, ``session_step`` of the timed steps). Units are UDUNITS-2 strings
(``s``, ``bytes``, ``bytes/s``, ``1/s``, ``1``); what a dimensionless number counts (FLOP,
nats, token positions) is in its ``long_name``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...version import __version__
from .. import h5io
from ..collectives import RECORD_DTYPE, site_codes

PHASES = ("qkv", "attention", "out_proj", "allreduce", "norm", "mlp")  # run and bench
AXES = ("tensor", "data", "pipeline", "sequence")  # the parallel axes, root attributes


INPUTS: dict[str, str] = {}  # label -> SHA-256 of every input the job read (``jobkit``)


def record_inputs(digests: dict[str, str]) -> None:
    """Remember the agreed digests of the job's inputs (the resolved config and command
    line excluded), written by ``write_provenance`` as the root attribute ``input_digests``
    (JSON text: label -> SHA-256 hex; ``mpiattn verify --inputs`` lists it)."""
    INPUTS.clear()
    INPUTS.update({k: v for k, v in digests.items() if not k.startswith("the ")})


@dataclass(frozen=True)
class Provenance:
    """What ran, where and with which libraries: the root attributes and ``/ranks`` of
    every file (``commands.epilogue.provenance`` fills it from the job)."""

    command: str  # run | bench | train
    config_toml: str  # the resolved config
    started: dt.datetime  # UTC
    axes: dict[str, int]  # parallel axis (``AXES``) -> size; their product is the world
    head_partition: tuple[int, ...]  # heads per tensor-parallel rank
    backend: str  # numpy | cupy
    cuda_aware: str  # how device buffers reach MPI ("n/a (host arrays)" on NumPy)
    mpi_library: str  # MPI_Get_library_version
    blas: str
    threads: int  # BLAS threads per rank (0 on GPUs)
    attention: str  # the attention algorithm as run ("plain", "blocked (block 512)", ...)
    timing: str  # how device time was read: "cuda events" on CuPy, else the host clock
    hosts: tuple[str, ...]  # (rank,)
    devices: tuple[str, ...]  # (rank,)
    kernels: tuple[str, ...]  # (rank,) what ran the element-wise operations (core.kernels)

    @property
    def world_size(self) -> int:
        return math.prod(self.axes.values())


def write_provenance(f: Any, prov: Provenance) -> None:
    """Root attributes and /ranks (host, device): what ran, where, with which libraries."""
    f.attrs.update({
        "mpiattn_version": __version__, "format_version": h5io.FORMAT_VERSION,
        "command": prov.command, "config": prov.config_toml, "world_size": prov.world_size,
        **{f"{axis}_parallel": prov.axes.get(axis, 1) for axis in AXES},
        "head_partition": np.array(prov.head_partition), "backend": prov.backend,
        "cuda_aware": prov.cuda_aware, "mpi_library": prov.mpi_library, "blas": prov.blas,
        "kernels": prov.kernels[0] if len(set(prov.kernels)) == 1 else
        "mixed: see /ranks/kernels", "blas_threads_per_rank": prov.threads,
        "start_time": prov.started.isoformat(), "attention": prov.attention,
        "timing": prov.timing,
    })
    if INPUTS:
        f.attrs["input_digests"] = json.dumps(INPUTS, sort_keys=True)
    h5io.dimension(f, "rank", np.arange(prov.world_size), long_name="rank in MPI_COMM_WORLD")
    ranks = f.create_group("ranks")
    h5io.write_array(ranks, "host", list(prov.hosts), ("rank",))
    h5io.write_array(ranks, "device", list(prov.devices), ("rank",))
    h5io.write_array(ranks, "kernels", list(prov.kernels), ("rank",))


def write_phase_seconds(g: Any, seconds: np.ndarray, dims: tuple[str, ...],
                        phases: tuple[str, ...] | list[str], **attrs: Any) -> None:
    """``seconds`` per phase in ``g``, the last axis a ``phase`` coordinate of the names
    (and, for readers of format 1, the same names in the attribute ``phases``)."""
    h5io.write_array(g, "seconds", seconds, dims, coords={"phase": list(phases)},
                     phases=list(phases), units="s", **attrs)


def write_records(f: Any, records: list) -> None:
    """``/checksum/collectives``: one row per checked transfer, ``records`` a list of
    (replica, ``transfers.Record``) pairs (``collectives.RECORD_DTYPE``)."""
    table = np.zeros(len(records), dtype=RECORD_DTYPE)
    for field, getter in (("replica", lambda q, r: q), ("layer", lambda q, r: r.layer),
                          ("residual", lambda q, r: r.residual),
                          ("bound", lambda q, r: r.bound), ("ratio", lambda q, r: r.ratio),
                          ("passed", lambda q, r: r.passed),
                          ("retries", lambda q, r: r.retries),
                          ("digest", lambda q, r: r.digest), ("chunk", lambda q, r: r.chunk)):
        table[field] = [getter(q, r) for q, r in records]
    table["site"] = site_codes([r.site for _, r in records])
    g = f.require_group("checksum")
    h5io.write_array(g, "collectives", table, ("record",),
                     description="one row per validated Allreduce; ratio = residual/bound")


def finish(f: Any, status: str = "complete") -> None:
    """The last two root attributes: ``end_time`` and ``status`` (verify needs
    "complete"; a stopped training run writes "interrupted")."""
    f.attrs["end_time"] = dt.datetime.now(dt.UTC).isoformat()
    f.attrs["status"] = status
