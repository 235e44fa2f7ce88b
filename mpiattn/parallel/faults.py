"""Injected faults of a run (reliability tests and demos): a rank that raises, dies or
hangs inside a layer (``fault.crash``), a rank made slower (``fault.slow``). Bit flips in
transfers are ``fault.inject`` (``transfers.FaultPlan``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..config import Config
from ..core.model import PhaseTimer
from ..errors import ConfigError


def slowdown(cfg: Config, rank: int) -> float:
    """How many times slower ``fault.slow`` makes this rank (1.0: not at all)."""
    factor = 1.0
    for n, entry in enumerate(cfg.fault.slow):
        ok = (isinstance(entry, dict) and set(entry) == {"rank", "factor"}
              and isinstance(entry["rank"], int) and isinstance(entry["factor"], int | float)
              and entry["factor"] >= 1)
        if not ok:
            raise ConfigError(f"fault.slow[{n}] must be a table like {{rank = 1, factor = 3.0}}"
                              " with factor >= 1")
        if entry["rank"] == rank:
            factor *= float(entry["factor"])
    return factor


def crash_points(cfg: Config, rank: int) -> dict[int, str]:
    """layer -> "raise" | "kill" | "hang" for this rank, from ``fault.crash`` (tests)."""
    points = {}
    for n, entry in enumerate(cfg.fault.crash):
        ok = isinstance(entry, dict) and set(entry) <= {"rank", "layer", "how"} and all(
            isinstance(entry.get(k), int) for k in ("rank", "layer")
        ) and entry.get("how", "raise") in ("raise", "kill", "hang")
        if not ok:
            raise ConfigError(f"fault.crash[{n}] must be a table like {{rank = 2, layer = 1,"
                              ' how = "raise"}} (how: raise, kill or hang)')
        if entry["rank"] == rank:
            points[entry["layer"]] = entry.get("how", "raise")
    return points


class FaultyPhases:
    """The phase timer, plus configured faults: a crash inside a layer's MLP (mid-layer)
    and a slowdown that stretches every compute phase (an emulated slower rank)."""

    COMPUTE = ("qkv", "attention", "out_proj", "mlp", "norm")

    def __init__(self, timer: PhaseTimer, points: dict[int, str], rank: int,
                 factor: float = 1.0) -> None:
        self.timer, self.points, self.rank, self.factor = timer, points, rank, factor

    @property
    def layer(self) -> int:
        return self.timer.layer

    @layer.setter
    def layer(self, value: int) -> None:
        self.timer.layer = value

    def __call__(self, name: str) -> Any:
        how = self.points.get(self.layer) if name == "mlp" else None
        if how == "kill":
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise":
            raise RuntimeError(f"injected crash on rank {self.rank} in layer {self.layer}")
        if how == "hang":  # a rank stuck outside MPI: the others' watchdog ends the job
            print(f"mpiattn: note: rank {self.rank} hangs in layer {self.layer} (fault.crash)",
                  file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        if self.factor > 1.0 and name in self.COMPUTE:
            return self._stretched(name)
        return self.timer(name)

    @contextmanager
    def _stretched(self, name: str) -> Iterator[None]:
        with self.timer(name):
            start = time.perf_counter()
            yield
            time.sleep((self.factor - 1.0) * (time.perf_counter() - start))


Span = Callable[[str, int], tuple[int, str]]  # (site, rank) -> (layer count, what it is)


def check_fault_targets(cfg: Config, world_size: int, span: Span | None = None) -> None:
    """A fault aimed at a rank or layer the job does not have, or at a bit its elements
    (``cfg.dtype``) lack, is a mistake, not a silent no-op or a crash mid-job. (Element
    indices wrap around the message, so any index fires.)

    ``span(site, rank)`` says how many layer indices a ``fault.inject`` site has on that
    rank and what they are, where that is not the model's layers (train: gradient buckets,
    one-number sums); a count of 0 means the site moves nothing in this job.
    """
    layers, bits = cfg.model.layers, 8 * np.dtype(cfg.dtype).itemsize
    for key in ("inject", "crash", "slow"):
        for n, entry in enumerate(getattr(cfg.fault, key)):
            if not isinstance(entry, dict):
                continue
            rank, layer = entry.get("rank"), entry.get("layer")
            if isinstance(rank, int) and not 0 <= rank < world_size:
                raise ConfigError(f"fault.{key}[{n}].rank = {rank} but the job has"
                                  f" {world_size} ranks (0..{world_size - 1})")
            bit = entry.get("bit")
            if key == "inject" and isinstance(bit, int) and not 0 <= bit < bits:
                raise ConfigError(f"fault.inject[{n}].bit = {bit} but a {cfg.dtype} element has"
                                  f" {bits} bits (0..{bits - 1})")
            count, what = layers, f"the model has {layers} layers"
            if key == "inject" and span is not None and isinstance(rank, int):
                count, what = span(str(entry.get("site")), rank)
                if count == 0:
                    raise ConfigError(f"fault.inject[{n}].site = '{entry.get('site')}': {what}")
            if isinstance(layer, int) and not 0 <= layer < count:
                raise ConfigError(f"fault.{key}[{n}].layer = {layer} but {what}"
                                  f" (0..{count - 1})")
