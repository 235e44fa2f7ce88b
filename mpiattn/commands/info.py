"""``mpiattn info``: what this machine and MPI library give a job, per rank under mpiexec."""

from __future__ import annotations

import platform
import socket
import sys
from importlib import metadata

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info(world: MPI.Comm) -> int:
    from mpi4py import MPI

    from ..core import kernels
    from ..core.backend import blas_info, cupy_device_count, usable_cores
    from ..parallel.comm import cuda_aware_mpi
    from ..version import __version__

    rank, size = world.Get_rank(), world.Get_size()
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    gpus = cupy_device_count()
    device = f"cuda:{local_rank % gpus}" if gpus else "cpu"
    rows = world.gather((rank, socket.gethostname(), local_rank, local_size, device))
    if rank != 0:
        return 0
    try:
        import h5py

        h5_mpi, h5_version = bool(h5py.get_config().mpi), h5py.__version__
    except ImportError:
        h5_mpi, h5_version = False, "not installed"
    # the gpu extra's wheel (cupy-cuda13x), gpu-cuda12's, or a source build
    cupy = next((v for v in map(_version, ("cupy-cuda13x", "cupy-cuda12x", "cupy"))
                 if v != "not installed"), "not installed")
    if getattr(sys.modules.get("cupy"), "__standin__", None):
        cupy = "the CuPy stand-in of the tests (tests/standin): NumPy, no GPU"
    lines = [
        f"mpiattn      {__version__}",
        f"python       {platform.python_version()} ({platform.machine()})",
        f"numpy        {_version('numpy')}",
        f"mpi4py       {_version('mpi4py')}",
        f"h5py         {h5_version} (MPI support: {'yes' if h5_mpi else 'no'})",
        f"cupy         {cupy}",
        f"MPI library  {MPI.Get_library_version().splitlines()[0].strip()}",
        f"MPI standard {'.'.join(map(str, MPI.Get_version()))}",
        f"CUDA-aware   {'yes' if cuda_aware_mpi() else 'no'} (MPIX_Query_cuda_support)",
        f"GPUs         {gpus}",
        f"CPU cores    {usable_cores()} usable",
    ]
    for lib in blas_info():
        lines.append(f"BLAS         {lib['internal_api']} {lib['version']}"
                     f" ({lib['num_threads']} threads, {lib['architecture']})")
    lines.append(f"kernels      {kernels.description()}")
    lines.append(f"ranks        {size}")
    for r, host, lr, ls, dev in rows:
        lines.append(f"  rank {r:<4} host {host}  local {lr}/{ls}  device {dev}")
    print("\n".join(lines))
    return 0
