"""Progress that reaches the user: a tqdm bar on a terminal, plain timed lines elsewhere.

Under ``mpiexec`` or in a Slurm job stderr is a pipe or a file, where tqdm either turns
itself off or fills the log with carriage returns. ``Progress`` then prints one plain line
at most every ``interval`` seconds (the first at the first update, the last at the end):
done/total, rate, ETA and the caller's fields (loss, lr, tokens/s, ...), flushed to
stderr. Only the verbose rank (rank 0) prints; the others only count.

    with Progress(steps, "step", start=first_step, verbose=rank == 0) as bar:
        for step in range(first_step, steps):
            ...
            bar.update(1, loss=loss, lr=lr, tok_s=tokens / seconds)

An update costs one clock read and a few additions; formatting and the write happen only
when a line is due.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO


def duration(seconds: float) -> str:
    """``3725.2`` -> ``"1h02m05s"``, ``250`` -> ``"4m10s"``, ``7.3`` -> ``"7s"``; ``"?"`` for
    an unknown (negative, infinite or NaN) duration."""
    if not 0 <= seconds < float("inf"):
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _value(v: Any) -> str:
    """A field value, short: floats to 4 significant digits (whole numbers from 10^4 up to
    10^15, no exponent), everything else as str()."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.0f}" if 1e4 <= abs(v) < 1e15 else f"{v:.4g}"


class Progress:
    """Counts units of work toward ``total`` and shows it (see the module docstring).

    ``total``: units the job will have done at the end (including ``start``, the units
    already done before this process began, e.g. on resume). ``unit``: their name.
    ``fields``: initial caller fields, shown in order, updated by ``update(**fields)``.
    ``interval``: seconds between plain lines (> 0). ``verbose``: False on every rank but
    the one that prints. ``stream``: default ``sys.stderr``. ``clock``: seconds, default
    ``time.perf_counter`` (tests inject a fake one). ``tty``: force the bar (True) or the
    plain lines (False); default: ``stream.isatty()``. Raises ValueError for interval <= 0.
    """

    def __init__(self, total: int, unit: str = "it", *, start: int = 0,
                 fields: Mapping[str, Any] | None = None, interval: float = 10.0,
                 verbose: bool = True, desc: str = "mpiattn", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 tty: bool | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"Progress interval must be > 0 seconds, got {interval}")
        self.total, self.unit, self.start, self.done = total, unit, start, start
        self.fields: dict[str, Any] = dict(fields or {})
        self.interval, self.verbose, self.desc = interval, verbose, desc
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = clock()
        self._next = self.t0  # the first update prints at once
        self._closed = False
        self._bar: Any = None
        if verbose and (self._isatty() if tty is None else tty):
            self._bar = self._open_bar()

    def _isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):  # closed or not a file
            return False

    def _open_bar(self) -> Any:
        from tqdm import tqdm

        bar = tqdm(total=self.total, initial=self.start, unit=self.unit, desc=self.desc,
                   file=self.stream, dynamic_ncols=True)
        if self.fields:
            bar.set_postfix(self._postfix(), refresh=False)
        return bar

    def _postfix(self) -> dict[str, str]:
        return {k: _value(v) for k, v in self.fields.items()}

    def update(self, n: int = 1, **fields: Any) -> None:
        """``n`` more units done (0 to change only fields); prints when a line is due."""
        self.done += n
        if not self.verbose:
            return
        if fields:
            self.fields.update(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(self._postfix(), refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        if now >= self._next and self.done < self.total:  # the last line is close()'s
            self._emit(self.line(now))
            self._next = now + self.interval

    def rate(self, now: float) -> float:
        """Units per second done by this process so far (0.0 before any time passed)."""
        elapsed = now - self.t0
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float, final: bool = False) -> str:
        """The plain line for the state at clock time ``now``: done/total, rate, ETA (or,
        when ``final``, the elapsed time) and the fields."""
        rate = self.rate(now)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        when = (f"{duration(now - self.t0)} elapsed" if final else
                f"ETA {duration((self.total - self.done) / rate) if rate > 0 else '?'}")
        parts = [f"{self.unit} {self.done}/{self.total} ({pct:.0f}%)",
                 f"{rate:.3g} {self.unit}/s", when]
        if self.fields:
            parts.append(" ".join(f"{k}={v}" for k, v in self._postfix().items()))
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _emit(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """Print one message line (verbose rank only) without breaking the bar."""
        if not self.verbose:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the display: the bar closes, plain mode prints the final line (with the
        elapsed time). Only the first call does anything."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.verbose:
            self._emit(self.line(self.clock(), final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
