"""mpiattn: head-sharded Transformer attention over MPI, checksum-validated, written to HDF5.

    mpiexec -n 4 mpiattn run                    # embedded BERT-base default
    mpiexec -n 3 mpiattn run jobs/configs/minilm.toml

The files, from Python (no MPI; ``mpiattn/io/formats/``)::

    import mpiattn
    with mpiattn.open("mpiattn-run.h5") as f:
        f.timings()          # (rank, layer, phase) seconds, an xarray.DataArray
        f.pooled[:4]         # embeddings, read on demand
"""

from __future__ import annotations

from .version import __version__

# The file API is imported on first use (PEP 562): `import mpiattn` stays cheap (no
# typing, NumPy or h5py) for the MPI commands, which import what they need themselves.
__all__ = ["BenchFile", "CheckpointFile", "File", "Labelled", "Lazy", "RunFile", "TrainFile",
           "__version__", "open"]

TYPE_CHECKING = False  # type checkers take it as True (without importing typing here)
if TYPE_CHECKING:
    from .io.formats import (
        BenchFile,
        CheckpointFile,
        File,
        Labelled,
        Lazy,
        RunFile,
        TrainFile,
        open,
    )


def __getattr__(name: str) -> object:
    if name in __all__ and name != "__version__":
        from .io import formats

        value = getattr(formats, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mpiattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
