"""Injected faults of a run (reliability tests and demos): a rank that raises, dies or
hangs inside a layer (``fault.crash``), a rank made slower (``fault.slow``). Bit flips in
transfers are ``fault.inject`` (``transfers.FaultPlan``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .config import Config
from .errors import ConfigError
from .model import PhaseTimer


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


def check_fault_targets(cfg: Config, world_size: int) -> None:
    """A fault aimed at a rank or layer the job does not have is a mistake, not a silent
    no-op. (Element indices wrap around the message, so any index fires.)"""
    layers = cfg.model.layers
    for key in ("inject", "crash", "slow"):
        for n, entry in enumerate(getattr(cfg.fault, key)):
            if not isinstance(entry, dict):
                continue
            rank, layer = entry.get("rank"), entry.get("layer")
            if isinstance(rank, int) and not 0 <= rank < world_size:
                raise ConfigError(f"fault.{key}[{n}].rank = {rank} but the job has"
                                  f" {world_size} ranks (0..{world_size - 1})")
            if isinstance(layer, int) and not 0 <= layer < layers:
                raise ConfigError(f"fault.{key}[{n}].layer = {layer} but the model has"
                                  f" {layers} layers (0..{layers - 1})")
