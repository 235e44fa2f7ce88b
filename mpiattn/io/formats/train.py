"""The training file (``mpiattn train``): its writer (``write_train``), its reader
(``TrainFile``) and what ``verify`` checks it holds (``promised``).

Layout (docs, "Training"): ``/train`` (per-step history: step, loss [nats per masked
token], lr, grad_norm, tokens_per_second; held-out eval_step and eval_loss),
``/timings/seconds`` (rank, session_step, phase), ``/timings/total`` (rank,),
``/checksum/collectives``; provenance from ``formats.common``. Checkpoints are
``formats.checkpoint``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import h5io
from .checks import need
from .common import finish, write_phase_seconds, write_records
from .reading import Columns, File, _frame, _guarded

if TYPE_CHECKING:
    import pandas


TRAIN_PHASES = ("forward", "backward", "allreduce", "optimizer", "checkpoint")


def write_train(f: Any, history: Any, attrs: dict, seconds: np.ndarray, totals: np.ndarray,
                records: list, first_step: int, status: str) -> None:
    """``/train`` (per-step history, ``attrs``), per-rank per-step timings, records;
    ``status`` "complete" or "interrupted" (a stopped run's output so far)."""
    g = f.create_group("train")
    history.write(g)
    g.attrs.update(attrs)
    tg = f.create_group("timings")
    h5io.dimension(tg, "session_step", first_step + np.arange(seconds.shape[1]),
                   long_name="optimizer step timed by this session (from first_step on)")
    write_phase_seconds(tg, seconds, ("rank", "session_step", "phase"), TRAIN_PHASES,
                        first_step=first_step)
    h5io.write_array(tg, "total", totals, ("rank",), units="s")
    if records:
        write_records(f, records)
    finish(f, status)


class TrainFile(File):
    """A file of ``mpiattn train``: per-step history, held-out evaluations, per-rank
    per-step timings (rank, step, phase), checksum records."""

    kind = "train"

    @_guarded
    def history(self, raw: bool = False) -> Columns | pandas.DataFrame | None:
        """Per optimizer step (index ``step``): loss [nats per masked token], lr,
        grad_norm, tokens_per_second; None when the file has no /train/loss."""
        loss = self._numbers("train/loss")
        if loss is None:
            return None
        step = self._numbers("train/step")
        cols: Columns = {"step": (step if step is not None and step.size == loss.size
                                  else np.arange(loss.size)).astype(np.int64)}
        for name in ("loss", "lr", "grad_norm", "tokens_per_second"):
            value = self._numbers(f"train/{name}")
            if value is not None and value.size == loss.size:
                cols[name] = value
        return _frame(cols, "step", {"loss": "nats", "tokens_per_second": "1/s"}, raw,
                      "train")

    @_guarded
    def evals(self, raw: bool = False) -> Columns | pandas.DataFrame | None:
        """Held-out loss (index ``step``: after that step; -1 = before training)."""
        loss, step = self._numbers("train/eval_loss"), self._numbers("train/eval_step")
        if loss is None:
            return None
        step = step if step is not None and step.size == loss.size else np.arange(loss.size)
        return _frame({"step": step.astype(np.int64), "eval_loss": loss}, "step",
                      {"eval_loss": "nats"}, raw, "train")

    @property
    @_guarded
    def train_attrs(self) -> dict[str, Any]:
        """/train's attributes: first_step, resumed_from, unigram_entropy, vocab."""
        return self._attrs(self.h5["train"]) if "train" in self.h5 else {}


def promised(f: Any, config: dict | None) -> list[str]:
    """A training file holds its loss history (``/train/loss``)."""
    problems: list[str] = []
    need(f, "train/loss", problems)
    return problems
