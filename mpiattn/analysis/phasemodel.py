"""Text runs and training modelled from the phase costs their files record (``mpiattn plan``
on a text-run or training file), including the parts that do not shrink with ranks.

    costs = text_costs(path)                 # per-phase seconds of a text run at N0 ranks
    rows = predict_text(costs, [1, 2, 4, 64], gpu_speedup=0)
    print(format_text(costs, rows))

Text run, from one run file at N0 ranks (``/timings``, ``/work``, rank 0's chunk loop):

- scan: the pre-flight scan, max over ranks; shrinks as N0/N (byte ranges) for uncompressed
  plain text and JSON Lines (``input_format`` "text", or "jsonl" scanned by more than rank 0:
  files written before JSON Lines was split scanned it on rank 0), stays whole on rank 0 for
  other formats;
- tokenize: each rank's slices and the checked token Allgather, max over ranks; shrinks as
  N0/N (the Allgather's bytes per rank do not shrink; they are inside this phase);
- encode: the replicas' busy seconds in rank-seconds (busy mean x ranks), split over N
  ranks: ``E·N0/N``; on GPUs divided by ``gpu_speedup``;
- gather/write: what rank 0 spends in its chunk loop outside encoding and tokenizing
  (``forward - busy - tokenize``: gathering every replica's rows, writing each part,
  waiting for the slowest replica): per line, the same at every N (rank 0 writes every row);
- setup: weights and start-up, the same at every N.

Training, from one training file at (tensor T0, data D0): forward+backward rank-seconds
split over the N ranks (global batch fixed), allreduce (gradients across replicas, ring)
``a0·f(D)/f(D0)`` with ``f(D) = 2(D-1)/D`` (constant where D0 = 1: the head group's
collectives), optimizer ``o0·T0/T`` (each rank updates its heads' parameters; ZeRO-1 adds
``D0/D``). Predictions keep the file's tensor width T0 and add replicas: D = N/T0.

Which part stops scaling first: the non-shrinking part that is largest at the largest N,
and the smallest N at which the non-shrinking parts take half the time (efficiency <= 0.5).
Only h5py and NumPy are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

TEXT_PHASES = ("scan", "tokenize", "encode", "gather/write", "setup")
TEXT_FIXED = ("gather/write", "setup")  # the same at every N
TRAIN_PHASES = ("forward+backward", "allreduce", "optimizer")


@dataclass
class TextCosts:
    """Seconds per phase of one text run at ``ranks`` ranks (see the module's list)."""

    ranks: int
    lines: int
    scan: float
    tokenize: float
    encode_rank_s: float  # rank-seconds of encoding (all replicas' ranks)
    write: float
    setup: float
    split_scan: bool = True
    path: str = ""


@dataclass
class TrainCosts:
    """Seconds per step of one training run (mean over timed steps, max over ranks)."""

    tensor: int
    data: int
    fb: float
    allreduce: float
    optimizer: float
    zero: bool = False
    path: str = ""

    @property
    def ranks(self) -> int:
        return self.tensor * self.data


@dataclass
class Prediction:
    ranks: int
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.phases.values()))


def _read(f: Any, name: str) -> np.ndarray:
    if name not in f:
        raise InputError(f"'{f.filename}': no /{name}: not a text run file of this version"
                         " (mpiattn run with input.text)")
    return np.asarray(f[name][()], dtype=np.float64)


def _has(path: str | Path, *names: str) -> bool:
    """Whether ``path`` is a regular HDF5 file holding every name (False for anything
    else: the plan's own reader then names what is wrong with it)."""
    import os
    import stat

    import h5py

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with h5py.File(path, "r") as f:
            return all(n in f for n in names)
    except (OSError, ValueError):
        return False


def is_text_run(path: str | Path) -> bool:
    return _has(path, "work/lines_tokenized", "timings/tokenize", "timings/busy")


def is_training(path: str | Path) -> bool:
    return _has(path, "train", "timings/seconds")


def plan_sections(paths: list[str], ranks: list[int], gpu_speedup: float = 0.0
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """(text for each text-run or training file among ``paths``, the same as JSON rows)."""
    texts, rows = [], []
    for path in paths:
        if is_text_run(path):
            c = text_costs(path)
            pred = predict_text(c, ranks, gpu_speedup)
            texts.append(format_text(c, pred, gpu_speedup))
            part, half = first_to_stop(pred, TEXT_FIXED + (() if c.split_scan else ("scan",)))
        elif is_training(path):
            t = train_costs(path)
            pred = predict_train(t, ranks, gpu_speedup)
            if not pred:
                continue
            texts.append(format_train(t, pred, gpu_speedup))
            part, half = first_to_stop(pred, ("allreduce",) + (() if t.zero else
                                                               ("optimizer",)))
        else:
            continue
        rows.append({"path": path, "stops_first": part, "half_fixed_from": half,
                     "predictions": [{"ranks": r.ranks, **r.phases, "total_s": r.total}
                                     for r in pred]})
    return texts, rows


def text_costs(path: str | Path) -> TextCosts:
    """The phase costs of a text run file (``mpiattn run`` with ``input.text``)."""
    import h5py

    with h5py.File(path, "r") as f:
        tok, busy = _read(f, "timings/tokenize"), _read(f, "timings/busy")
        forward, setup = _read(f, "timings/forward"), _read(f, "timings/setup")
        scan = _read(f, "timings/scan") if "timings/scan" in f else np.zeros_like(tok)
        lines = int(f.attrs.get("lines", 0))
        fmt = str(f.attrs.get("input_format", "text"))
        scanned = _read(f, "work/scan_bytes") if "work/scan_bytes" in f else None
    ranks = len(tok)
    split = fmt == "text" or (fmt == "jsonl" and scanned is not None
                              and (ranks == 1 or bool((scanned[1:] > 0).any())))
    write = max(0.0, float(forward[0] - busy[0] - tok[0]))
    return TextCosts(ranks, lines, float(scan.max()), float(tok.max()),
                     float(busy.mean() * ranks), write, float(setup.max()), split,
                     str(path))


def train_costs(path: str | Path) -> TrainCosts:
    """The per-step phase costs of a training file (``mpiattn train``)."""
    import tomllib

    import h5py

    with h5py.File(path, "r") as f:
        seconds = _read(f, "timings/seconds")  # (rank, step, phase)
        names = [p.decode() if isinstance(p, bytes) else str(p)
                 for p in f["timings/seconds"].attrs.get("phases", [])]
        try:
            cfg = tomllib.loads(str(f.attrs.get("config", "")))
        except tomllib.TOMLDecodeError:
            cfg = {}
        tensor = int(f.attrs.get("tensor_parallel", 0) or 0) or seconds.shape[0]
        data = int(f.attrs.get("data_parallel", 0) or 0) or seconds.shape[0] // tensor
        zero = bool(cfg.get("parallel", {}).get("zero", False))
    steps = seconds[:, 1:] if seconds.shape[1] > 1 else seconds  # the first step warms up
    per = steps.mean(axis=1).max(axis=0)  # (phase,): mean step, slowest rank
    get = {n: float(per[i]) for i, n in enumerate(names)}
    return TrainCosts(tensor, max(1, data), get.get("forward", 0.0)
                      + get.get("backward", 0.0), get.get("allreduce", 0.0),
                      get.get("optimizer", 0.0), zero, str(path))


def predict_text(c: TextCosts, ranks: list[int], gpu_speedup: float = 0.0
                 ) -> list[Prediction]:
    """Seconds per phase of the same corpus at each rank count (CPU ranks, or GPU ranks
    encoding ``gpu_speedup`` times faster than one measured CPU rank)."""
    out = []
    for n in ranks:
        encode = c.encode_rank_s / n / (gpu_speedup if gpu_speedup > 0 else 1.0)
        scan = c.scan * c.ranks / n if c.split_scan else c.scan
        out.append(Prediction(n, {"scan": scan, "tokenize": c.tokenize * c.ranks / n,
                                  "encode": encode, "gather/write": c.write,
                                  "setup": c.setup}))
    return out


def _ring(d: int) -> float:
    return 2 * (d - 1) / d


def predict_train(c: TrainCosts, ranks: list[int], gpu_speedup: float = 0.0
                  ) -> list[Prediction]:
    """Seconds per step at each rank count that the file's tensor width divides."""
    out = []
    speed = gpu_speedup if gpu_speedup > 0 else 1.0
    for n in ranks:
        if n % c.tensor:
            continue
        d = n // c.tensor
        allreduce = c.allreduce * (_ring(d) / _ring(c.data) if c.data > 1 else 1.0) \
            if d > 1 or c.data == 1 else 0.0
        opt = c.optimizer * (c.data / d if c.zero else 1.0) / speed
        out.append(Prediction(n, {"forward+backward": c.fb * c.ranks / n / speed,
                                  "allreduce": allreduce, "optimizer": opt}))
    return out


def first_to_stop(rows: list[Prediction], fixed: tuple[str, ...]) -> tuple[str, int | None]:
    """(the non-shrinking part largest at the largest N, the smallest N where the
    non-shrinking parts take at least half the time; None when none does)."""
    last = rows[-1]
    part = max(fixed, key=lambda k: last.phases.get(k, 0.0))
    half = next((r.ranks for r in rows
                 if sum(r.phases.get(k, 0.0) for k in fixed) >= 0.5 * r.total), None)
    return part, half


def format_text(c: TextCosts, rows: list[Prediction], gpu_speedup: float = 0.0) -> str:
    head = (f"text run: {c.lines} lines at {c.ranks} ranks ({c.path}): scan {c.scan:.3f} s,"
            f" tokenize {c.tokenize:.3f} s, encode {c.encode_rank_s:.2f} rank-s, gather/write"
            f" {c.write:.3f} s, setup {c.setup:.2f} s")
    lines = [head, f"  {'ranks':>6} " + " ".join(f"{p:>12}" for p in TEXT_PHASES)
             + f" {'total s':>9} {'lines/s':>10}"]
    for r in rows:
        lines.append(f"  {r.ranks:>6} " + " ".join(f"{r.phases[p]:>12.4f}" for p in TEXT_PHASES)
                     + f" {r.total:>9.3f} {c.lines / max(r.total, 1e-12):>10.1f}")
    part, half = first_to_stop(rows, TEXT_FIXED + (() if c.split_scan else ("scan",)))
    why = {"gather/write": "rank 0 gathers and writes every chunk's part",
           "setup": "loading the weights and starting up, on every rank",
           "scan": "rank 0 scans the whole file: this format cannot be split by byte ranges"}
    lines.append(f"  stops scaling first: {part} ({why[part]})"
                 + (f"; the parts that do not shrink take half the time from {half} ranks"
                    if half else ""))
    lines.append("  assumes: scan and tokenize shrink as 1/N (plain text; other formats are"
                 " scanned whole by rank 0), encoding as 1/N in rank-seconds, gather/write"
                 " and setup stay" + (f"; GPU ranks encode {gpu_speedup:g}x one measured CPU"
                                      " rank, scan/tokenize/write stay on the CPU"
                                      if gpu_speedup > 0 else "; CPU ranks as measured"))
    return "\n".join(lines)


def format_train(c: TrainCosts, rows: list[Prediction], gpu_speedup: float = 0.0) -> str:
    lines = [f"training: tensor {c.tensor} x data {c.data} ({c.path}): per step"
             f" forward+backward {c.fb:.3f} s, allreduce {c.allreduce:.3f} s, optimizer"
             f" {c.optimizer:.3f} s",
             f"  {'ranks':>6} {'DxT':>7} " + " ".join(f"{p:>16}" for p in TRAIN_PHASES)
             + f" {'step s':>9}"]
    for r in rows:
        lines.append(f"  {r.ranks:>6} {f'{r.ranks // c.tensor}x{c.tensor}':>7} "
                     + " ".join(f"{r.phases[p]:>16.4f}" for p in TRAIN_PHASES)
                     + f" {r.total:>9.3f}")
    if rows:
        fixed = ("allreduce",) + (() if c.zero else ("optimizer",))
        part, half = first_to_stop(rows, fixed)
        lines.append(f"  stops scaling first: {part}" + (
            f"; the parts that do not shrink take half the step from {half} ranks"
            if half else ""))
    lines.append("  assumes: the global batch fixed and split over N/T replicas (forward+"
                 "backward as 1/N), gradient allreduce 2(D-1)/D of its measured bytes (ring),"
                 " the optimizer over each rank's heads" + (" and ZeRO-1 shard" if c.zero
                                                            else " (replicated over replicas)")
                 + (f"; GPU ranks compute {gpu_speedup:g}x one measured CPU rank, the"
                    " allreduce as measured" if gpu_speedup > 0 else ""))
    return "\n".join(lines)
