"""Mislaunch checks: the launcher started N tasks but MPI sees one.

``srun`` without a working PMI plugin (or ``mpiexec`` of another MPI than the one mpi4py
was built against) starts N singletons that each see "rank 0 of 1": every copy would do
the whole job (and with ``--force`` every copy would write the output). The launchers say
how many tasks they started before MPI does:

- Slurm (``srun``): ``SLURM_STEP_NUM_TASKS`` for the step, else ``SLURM_NTASKS`` /
  ``SLURM_NPROCS`` (the allocation's count, which a job step inherits);
- MPICH Hydra and PMI-2 (``srun --mpi=pmi2``): ``PMI_SIZE``;
- PMIx (``srun --mpi=pmix``, Open MPI 5, PRRTE): ``PMIX_SIZE``;
- Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_SIZE``.

A launcher of MPI's own kind (``PMI_SIZE``, ``PMIX_SIZE``, ``OMPI_COMM_WORLD_SIZE``) is
believed over Slurm's allocation count: ``mpirun -n 1`` inside a larger allocation is a
single rank on purpose. ``check(world_size)`` is called by every MPI command right after
MPI starts, before any work: a mismatch is one line from launcher rank 0 and exit 2 on
every copy (the copies are not connected, so there is nothing to agree on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import UserError

MPI_VARS = ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE")  # set by an MPI launcher
SLURM_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")  # first one found


class Mislaunched(UserError):
    """The launcher's task count and MPI's world size disagree (exit 2)."""


def launcher_tasks(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(variable, task count) that the launcher exported, or None when started alone.
    MPI launchers' variables win over Slurm's (module docstring); values that are not
    positive integers are ignored."""
    env = os.environ if env is None else env

    def count(name: str) -> int | None:
        value = env.get(name, "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    for group in (MPI_VARS, SLURM_VARS):
        found = [(name, n) for name in group if (n := count(name)) is not None]
        if found:
            return max(found, key=lambda item: item[1]) if group is MPI_VARS else found[0]
    return None


def mismatch(world_size: int, env: Mapping[str, str] | None = None,
             library: str = "") -> str | None:
    """The one-line message when the launcher started more tasks than MPI sees (N > 1 and
    a world of 1), else None. ``library``: the first line of ``MPI.Get_library_version()``
    (named in the message)."""
    said = launcher_tasks(env)
    if said is None or world_size != 1 or said[1] <= 1:
        return None
    name, n = said
    env = os.environ if env is None else env
    others = " ".join(v for v in (*MPI_VARS, *SLURM_VARS) if v in env)
    lib = f" ({' '.join(library.split())})" if library.strip() else ""
    return (f"{name}={n} says the launcher started {n} tasks, but MPI sees 1 rank: each"
            f" task would run the whole job alone. Under Slurm launch with"
            f" 'srun --mpi=pmix' or 'srun --mpi=pmi2' (see 'srun --mpi=list'); with mpiexec,"
            f" mpi4py's MPI{lib} must be the launcher's: rebuild mpi4py against it"
            f" (pip install --no-binary mpi4py --force-reinstall mpi4py) or use its mpiexec."
            f" (One process inside a larger allocation on purpose? unset {others}.)")


def check(world_size: int, library: str = "") -> None:
    """Raise ``Mislaunched`` (exit 2) when ``mismatch`` finds one in this environment."""
    message = mismatch(world_size, library=library)
    if message is not None:
        raise Mislaunched(message)
