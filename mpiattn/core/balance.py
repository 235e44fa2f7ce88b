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
              repeats: int = 3, slowdown: float = 1.0) -> float:
    """Heads per second this rank computes: one head's QKV, output and MLP GEMMs.

    ``slowdown`` > 1 emulates a slower rank (tests and demonstrations).
    """
    x = xp.ones((rows, hidden), dtype=dtype)
    w_in = xp.ones((hidden, 3 * head_dim + ffn_per_head), dtype=dtype)
    w_out = xp.ones((head_dim + ffn_per_head, hidden), dtype=dtype)
    h = x @ w_in  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        h = x @ w_in
        y = h[:, -(head_dim + ffn_per_head):] @ w_out
        float(y[0, 0])  # waits for a device, if any
        best = min(best, time.perf_counter() - start)
    return 1.0 / (best * slowdown)


def measured_counts(heads: int, rates: list[float]) -> list[int]:
    """Heads per rank in proportion to ``rates`` (each rank keeps at least one)."""
    return weighted_counts(heads, rates, minimum=1)
