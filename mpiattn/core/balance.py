"""Head assignment in proportion to measured speed (``parallel.balance = "measured"``).

On ranks of unequal speed (different GPU models, a shared node) an even split makes every
collective wait for the slowest rank. A short calibration times one head's worth of the
layer's GEMMs on each rank; heads are then split in proportion to the rates (largest
remainder, at least one head each), identically on every replica so that data-parallel
gradients still line up.
"""

from __future__ import annotations

import time
from typing import Any

from .shard import weighted_counts


def head_rate(xp: Any, rows: int, hidden: int, head_dim: int, ffn_per_head: int, dtype: Any,
              repeats: int = 3, slowdown: float = 1.0, min_seconds: float = 0.02) -> float:
    """Heads per second this rank computes: one head's QKV, output and MLP GEMMs, the
    best of at least ``repeats`` timings and of ``min_seconds`` of them: on a shared or
    oversubscribed node a short product is often preempted, and the best of a few can all
    be (4 processes on 2 cores, a tiny layer: the best of 3 gave rates up to 2.0x apart
    over 30 calibrations, the best of 20 ms 1.1x).

    ``slowdown`` > 1 emulates a slower rank (tests and demonstrations).
    """
    x = xp.ones((rows, hidden), dtype=dtype)
    w_in = xp.ones((hidden, 3 * head_dim + ffn_per_head), dtype=dtype)
    w_out = xp.ones((head_dim + ffn_per_head, hidden), dtype=dtype)
    h = x @ w_in  # warm-up
    best, count, began = float("inf"), 0, time.perf_counter()
    while count < repeats or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        h = x @ w_in
        y = h[:, -(head_dim + ffn_per_head):] @ w_out
        float(y[0, 0])  # waits for a device, if any
        best = min(best, time.perf_counter() - start)
        count += 1
    return 1.0 / (best * slowdown)


def measured_counts(heads: int, rates: list[float]) -> list[int]:
    """Heads per rank in proportion to ``rates`` (each rank keeps at least one)."""
    return weighted_counts(heads, rates, minimum=1)
