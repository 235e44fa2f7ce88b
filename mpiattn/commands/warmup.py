"""First-call costs paid before the timed forward, and counted as setup.

The first layer of a forward used to pay 0.4-0.8 s that no later layer pays: the BLAS
thread pool starting, the erf kernel's first call, MPI's first Allreduce of a size
(shared-memory segments), and page faults of the work arrays and reduction buffers as
they are first written. ``warm_up`` pays them in setup instead, with the same code the
forward runs: one layer on one sequence (every kernel, every collective of the layer, at
layer -1 so no configured fault fires and no record is kept), then every work array and
reduction buffer that pass made grown to the batch's size and written once (page faults
now, not in layer 0). Nothing computed here is used later; the cost shows in
``/timings/setup``.

Not covered: the fresh (batch*seq, hidden) temporaries of the residual adds and
LayerNorms; the heap grows to hold them over layers 0 and 1 (~0.07 s more in their
"norm" phase at BERT-base, seq 512). Two LayerNorms at full size here did not change it
(malloc gives such blocks back between layers until its thresholds settle).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.attention import KeyMask, Options
from ..core.backend import get_array_module
from ..core.model import LayerShard, layer_forward
from ..errors import NumericalError

WARM_LAYER = -1  # the layer index of the warm-up pass: no fault.inject entry matches it


def warm_up(layer: LayerShard, options: Options, reduce: Any, batch: int, seq: int,
            hidden: int, dtype: Any, eps: float) -> None:
    """One pass of ``layer`` over one sequence of ``seq`` zeros-and-ones tokens, then the
    work arrays of ``options`` and the buffers of ``reduce`` (a ``comm.CheckedAllreduce``
    or ``model.LocalReduce``) made big enough for ``batch`` sequences and touched.

    Collective over ``reduce``'s group when it has one: every rank of the group calls it.
    Buffers are grown on NumPy only (CuPy allocates from its pool, pinned host buffers
    stay as they are); with ``parallel.overlap`` the buffers of slots after the first are
    made in layer 0 as before.
    """
    xp = get_array_module(layer.w_qkv)
    x = xp.ones((1, seq, hidden), dtype=dtype)
    ledger = getattr(reduce, "ledger", None)
    kept = len(ledger.records) if ledger is not None else 0
    seconds = getattr(reduce, "seconds", 0.0)
    try:
        layer_forward(x, layer, KeyMask([seq]), reduce, WARM_LAYER, eps, options=options)
    except NumericalError:  # raised on every rank of the group alike: the timed forward
        pass  # meets the same inf/NaN in layer 0 and names it there, not at layer -1
    finally:
        if ledger is not None:  # the warm-up's checked reductions are not the job's
            del ledger.records[kept:]
        if hasattr(reduce, "seconds"):
            reduce.seconds = seconds
    if xp is not np:
        return
    _grow(options._scratch, batch)
    transport = getattr(reduce, "transport", None)
    if transport is not None:
        _grow(transport._buffers, batch + 1)  # + 1: room for the two checksum rows


def _grow(cache: dict, factor: int) -> None:
    """Every flat buffer of a ``backend.grown`` cache made ``factor`` times bigger and
    written once (``empty`` maps pages lazily; the write faults them in now)."""
    for key, buf in list(cache.items()):
        bigger = np.empty(buf.size * max(factor, 1), dtype=buf.dtype)
        bigger.fill(0)
        cache[key] = bigger
