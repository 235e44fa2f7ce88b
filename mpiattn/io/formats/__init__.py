"""One module per file kind, each holding the kind's writer, its reader (the class
``mpiattn.open`` returns) and what ``verify`` checks it promises, side by side:

- run (``command`` "run"): ``formats.run``, ``write_run`` / ``RunFile``;
- text run (a run of ``input.text``): ``formats.textrun``, ``write_text_run`` after
  ``io.corpusfile.assemble`` / ``RunFile`` (``ragged``);
- bench: ``formats.bench``, ``write_bench``, ``write_pipeline_bench``,
  ``write_sequence_bench`` / ``BenchFile``;
- train: ``formats.train``, ``write_train`` / ``TrainFile``;
- train checkpoint: ``formats.checkpoint``, ``write_checkpoint`` /
  ``CheckpointFile``.

What every kind shares is ``formats.common`` (provenance, phase seconds, checksum
records) and ``formats.reading`` (``File``, ``Lazy``, ``Labelled``). A new dataset is its
kind's module (writer, reader and check) plus the command that computes it.

    import mpiattn
    with mpiattn.open("run.h5") as f:       # RunFile; only the root attributes are read
        f.config["model"]["hidden"]           # the resolved config TOML, as a dict
        t = f.timings()                       # xarray.DataArray (rank, layer, phase) [s]
        t.sum("layer").max("rank")            # per phase: the slowest rank
        f.pooled[:8]                          # (batch | line, hidden): 8 rows read, no more
        f.ids[:8]                             # a corpus run's record ids (input.id_field)
        f.layer(3)[0]                         # /layers/03/hidden, first sequence
        f.ranks()                             # pandas.DataFrame: host, forward_s, ... per rank
        f.collectives()                       # pandas.DataFrame: one row per checked Allreduce
    with mpiattn.open("bench.h5") as b:       # BenchFile
        b.allreduce()                         # per message size, nccl-tests columns
    with mpiattn.open("train.h5") as t:       # TrainFile
        t.history()["loss"]                   # per optimizer step

``open`` picks the class from the root attribute ``command``. Arrays stay in the file
until asked for: ``Lazy`` wraps one dataset (``shape``, ``dims``, ``attrs``; indexing
reads only the selection, ``np.asarray`` or ``read()`` the whole). Small tables and
labelled arrays are read on each call: ``xarray.DataArray`` and ``pandas.DataFrame`` when
those are installed (``pip install 'mpiattn[analysis]'``), else ``Labelled`` (values,
dims, coords, attrs) and a dict of column arrays; ``raw=True`` asks for the NumPy forms
whatever is installed. Axis names come from each dataset's HDF5 dimension labels,
coordinates from attached dimension scales when the file has them (format 2), else from
the ``phases`` / ``first_step`` attributes and positions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ...errors import InputError
from .. import h5safe
from . import bench, checkpoint, run, train
from .bench import BenchFile
from .checkpoint import CheckpointFile
from .reading import File, Labelled, Lazy, malformed
from .run import RunFile
from .train import TrainFile

__all__ = ["KINDS", "PROMISES", "AnyFile", "BenchFile", "CheckpointFile", "File", "Labelled",
           "Lazy", "RunFile", "TrainFile", "open"]

AnyFile = RunFile | BenchFile | TrainFile | CheckpointFile | File
KINDS: dict[str, type[File]] = {"run": RunFile, "bench": BenchFile, "train": TrainFile,
                                "train checkpoint": CheckpointFile}


# what each kind promises to hold, by ``command`` (``verify``): one line per problem
PROMISES: dict[str, Callable[[Any, dict | None], list[str]]] = {
    "run": run.promised, "bench": bench.promised, "train": train.promised,
    "train checkpoint": checkpoint.promised}


def open(path: str | os.PathLike[str]) -> AnyFile:
    """Open an mpiattn HDF5 file for reading: a ``RunFile``, ``BenchFile``, ``TrainFile``
    or ``CheckpointFile`` by its ``command`` attribute (by its groups when that is absent;
    ``File`` when neither tells). Use as a context manager (or call ``close()``).

    Only the root attributes are read here; every array waits until asked for. The file is
    walked first (``h5safe.open_for_reading``): a missing file, or one with links,
    external or virtual storage, plugin filters or implausible sizes, raises one-line
    ``InputError``.
    """
    where = str(path)
    h5 = h5safe.open_for_reading(where)
    try:
        command = h5safe.attr(h5, "command")
        command = h5safe.text(command, "attribute 'command' of /") if command is not None else ""
        cls = KINDS.get(command) or (File if command else
                                     BenchFile if "bench" in h5 else
                                     TrainFile if "train" in h5 else RunFile)
        return cls(h5, where)
    except InputError as err:
        h5.close()
        raise InputError(f"'{where}': {err}") from None
    except h5safe.MALFORMED as err:
        h5.close()
        raise malformed(where, err) from None

