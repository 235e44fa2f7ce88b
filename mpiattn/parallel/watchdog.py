"""No rank waits forever: a watchdog over every MPI wait, and signals that end the job cleanly.

MPI has no timeout on a collective: when one rank hangs or leaves, the others wait in their
next collective until the allocation ends. PyTorch's process-group watchdog solves this for
NCCL; this is the same for MPI. Every blocking MPI call goes through ``Watchdog.waiting``
(the communicators of a job are wrapped by ``watch``), which records what this rank waits
in; a daemon thread checks the record, and a wait older than ``comm.timeout`` seconds makes
the rank print the operation, its layer and site, its peers and how long it waited, then
``MPI_Abort`` the job with exit code ``EXIT_TIMEOUT``.

The same thread handles signals. Python runs signal handlers only between bytecodes, never
inside a blocking MPI call, so the handler does nothing but wake the thread
(``signal.set_wakeup_fd``). For commands that stop at once (``run``, ``bench``) the thread
removes this rank's temporary, prints one line on rank 0 and ends the process with 128 +
the signal number. For ``train`` the first SIGINT/SIGTERM/SIGUSR1 sets a flag the step loop
reads (``stop_requested``), so that all ranks agree on a step, checkpoint and leave; a
second signal ends the job at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI

EXIT_TIMEOUT = 5
GRACE_SECONDS = 0.2  # between a rank's last line and MPI_Abort: the launcher forwards it
STAGGER_SECONDS = 0.5  # rank r's watchdog fires r x this later (up to rank 8): one line
DUPLICATE_SECONDS = 2.0  # signals this close count as one (Slurm and mpiexec both pass it on)
DEFAULT_TIMEOUT = 600.0  # seconds; as PyTorch's NCCL watchdog: no healthy job waits that long
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Watchdog:
    """One per process. ``timeout`` seconds (0: off); ``abort(code)`` ends the job."""

    def __init__(self, timeout: float, abort: Callable[[int], None], rank: int = 0) -> None:
        self.timeout, self.abort, self.rank = timeout, abort, rank
        self.where: dict[str, Any] = {}  # layer, site, step: set by the computation
        self._wait: tuple[str, str, float] | None = None  # (operation, peers, since)
        self._lock = threading.Lock()
        self._cleanups: list[Callable[[], None]] = []
        # what an interrupted job leaves for the user (e.g. "the finished chunks are kept"),
        # said instead of "nothing written"; None: nothing is left
        self.kept: Callable[[], str | None] | None = None
        self._signal_mode = "none"  # "exit": end at once; "flag": set stop_requested
        self.stop_requested = 0  # the signal number a "flag" command has received
        self.finished = False  # the output is published: a late signal changes nothing
        self.fired = False  # the timeout has ended the job
        self.concluding = False  # the final output is being written and agreed on
        self._last_signal = -math.inf
        self.deferred = 0  # a signal that came while concluding (acted on if that fails)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="mpiattn-watchdog", daemon=True)
        self._thread.start()

    # --- waits ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def waiting(self, operation: str, peers: str = "") -> Iterator[None]:
        """Record that this rank waits in ``operation`` with ``peers`` (nested: outermost)."""
        if self._wait is not None:
            yield
            return
        self._wait = (operation, peers, time.monotonic())
        try:
            yield
        finally:
            self._wait = None

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in self.where.items() if v is not None]
        return ", ".join(parts)

    # --- signals -------------------------------------------------------------------------

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` before this rank ends on a signal or a timeout (e.g. drop a temporary)."""
        self._cleanups.append(fn)

    def handle_signals(self, mode: str) -> None:
        """``"exit"``: SIGINT/SIGTERM end the job at once (run, bench); ``"flag"``: they and
        SIGUSR1 (Slurm's warning before the time limit) set ``stop_requested`` for the step
        loop (train), and a second one ends the job at once. Call from the main thread."""
        self._signal_mode = mode
        signals = STOP_SIGNALS + ((signal.SIGUSR1,) if mode == "flag" else ())
        with contextlib.suppress(ValueError):  # not the main thread (tests): leave as is
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            for sig in signals:
                signal.signal(sig, _ignore)
        while _early:  # arrived before these handlers: act on them now
            self._signalled(_early.pop(0))

    def _loop(self) -> None:
        import select

        while True:
            period = min(1.0, self.timeout / 10) if self.timeout > 0 else 1.0
            ready, _, _ = select.select([self._wake_r], [], [], period)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    for byte in self._wake_r.recv(64):
                        self._signalled(byte)
            self._check_wait()

    def _signalled(self, signum: int) -> None:
        now = time.monotonic()
        if now - self._last_signal < DUPLICATE_SECONDS:
            return  # the same signal again: from the launcher and from Slurm at once
        self._last_signal = now
        if self._signal_mode == "flag" and not self.stop_requested:
            self.stop_requested = signum
            if self.rank == 0:
                _say(f"mpiattn: {signal.Signals(signum).name} received: stopping after this"
                     " step with a checkpoint (send it again to stop at once)")
            return
        if self._signal_mode == "none" or self.finished:
            return
        if self.concluding and not self.deferred:  # the output is being written: finish it
            self.deferred = signum
            return
        self.cleanup()
        name = signal.Signals(signum).name
        where = self.describe()
        kept = self.kept() if self.kept is not None else None
        line = (f"interrupted by {name}{' (' + where + ')' if where else ''};"
                f" {kept or 'nothing written'}")
        if self.rank != 0:
            # when the launcher signalled every rank, rank 0 speaks and the launcher ends
            # this one meanwhile; still alive, this rank alone was signalled: it says so
            time.sleep(1.0)
            _say(f"mpiattn: rank {self.rank}: {line}")
            time.sleep(GRACE_SECONDS)
            self.abort(128 + signum)
        _say(f"mpiattn: {line}")
        os._exit(128 + signum)

    def _check_wait(self) -> None:
        wait = self._wait
        if wait is None or self.timeout <= 0 or self.fired:
            return
        operation, peers, since = wait
        waited = time.monotonic() - since
        # lower ranks speak first, so one line usually reaches the user
        if waited < self.timeout + STAGGER_SECONDS * min(self.rank, 8):
            return
        with self._lock:
            where = self.describe()
            cause = ("a rank did not join the job's start (an argument or config mistake on"
                     " one rank only, no MPI library on its node: see its own message)"
                     if self.where.get("during") == "start-up" else "a peer hung or died")
            _say(f"mpiattn: timeout: rank {self.rank} waited {waited:.0f} s in {operation}"
                 f"{' (' + where + ')' if where else ''}{' with ranks ' + peers if peers else ''}"
                 f" (comm.timeout = {self.timeout:g} s): {cause}; ending the job")
            self.cleanup()
            self.fired = True  # once: the abort ends the job (a test's callback returns)
            time.sleep(GRACE_SECONDS)
            self.abort(EXIT_TIMEOUT)

    def cleanup(self) -> None:
        for fn in self._cleanups:
            with contextlib.suppress(Exception):
                fn()


_early: list[int] = []  # stop signals that arrived before the watchdog handled them


def _remember(signum: int, frame: Any) -> None:
    _early.append(signum)


def record_early_signals() -> None:
    """From process start to ``handle_signals("flag")``: a SIGTERM/SIGUSR1/SIGINT is noted
    (then acted on as a stop request) instead of killing the process (Slurm's warning may
    come while the ranks still import)."""
    for sig in (*STOP_SIGNALS, signal.SIGUSR1):
        signal.signal(sig, _remember)


def _ignore(signum: int, frame: Any) -> None:
    """The Python-level handler: nothing (the watchdog thread acts, woken by the fd)."""


def _say(line: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def startup_guard(timeout: float, rank: int) -> Iterator[None]:
    """Bound the wait in MPI start-up (``MPI_Init``), before any communicator exists: after
    ``timeout`` seconds (0: never) one line is printed and this process is killed; the
    launcher then ends the others.

    ``MPI_Init`` runs inside the import of ``mpi4py.MPI`` holding the interpreter lock, so
    no thread of this process can act: a watcher process (forked twice, so it is nobody's
    zombie) waits on a pipe that this process closes once MPI is up, or that closes when
    this process dies.
    """
    if timeout <= 0 or not hasattr(os, "fork"):
        yield
        return
    read_end, write_end = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # the watcher: no Python state is touched, only syscalls, then _exit
        try:
            os.close(write_end)
            if os.fork() == 0:
                import select

                ready, _, _ = select.select([read_end], [], [],
                                            timeout + STAGGER_SECONDS * min(rank, 8))
                if not ready:
                    os.write(2, (f"mpiattn: timeout: rank {rank} waited {timeout:g} s in MPI"
                                 " start-up (MPI_Init): a rank did not start MPI (a --help or"
                                 " a mistake on one rank only, no MPI library on its node: see"
                                 " its own message); ending the job\n").encode())
                    os.kill(parent, signal.SIGKILL)
        finally:
            os._exit(0)
    os.close(read_end)
    os.waitpid(child, 0)
    try:
        yield
    finally:
        os.close(write_end)  # the watcher sees the pipe close and leaves


_current: Watchdog | None = None


def current() -> Watchdog | None:
    return _current


def install(timeout: float, abort: Callable[[int], None], rank: int) -> Watchdog:
    """The process's watchdog (made once; later calls update the timeout)."""
    global _current
    if _current is None:
        _current = Watchdog(timeout, abort, rank)
    _current.timeout, _current.rank = timeout, rank
    return _current


def at(**where: Any) -> None:
    """Note where the computation is (layer, site, step) for the messages."""
    if _current is not None:
        _current.where.update(where)


@contextlib.contextmanager
def waiting(operation: str, peers: str = "") -> Iterator[None]:
    if _current is None:
        yield
        return
    with _current.waiting(operation, peers):
        yield


# --- communicators whose blocking calls are watched --------------------------------------

BLOCKING = (
    "Barrier", "Allreduce", "Reduce", "Bcast", "Gather", "Gatherv", "Allgather", "Allgatherv",
    "Alltoall", "Alltoallv", "Scatter", "Scatterv", "Send", "Recv", "Sendrecv", "Probe",
    "barrier", "allreduce", "reduce", "bcast", "gather", "allgather", "alltoall", "scatter",
    "send", "recv", "sendrecv", "Split", "Split_type", "Dup", "Create",
)


def watch(comm: MPI.Comm) -> Any:
    """``comm`` with every blocking call recorded by the watchdog (a subclass of its own
    type, so MPI and h5py take it as it is); sub-communicators from ``Split`` are watched
    too."""
    if isinstance(comm, _Watched) or comm is None:
        return comm
    cls = _watched_class(type(comm))
    return cls(comm)


class _Watched:
    _peers: str = ""


_classes: dict[type, type] = {}


def _watched_class(base: type) -> type:
    if base in _classes:
        return _classes[base]

    def wrap(name: str) -> Callable:
        method = getattr(base, name)

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            with waiting(name, self.peers()):
                result = method(self, *args, **kwargs)
            if name in ("Split", "Split_type", "Dup", "Create"):
                result = watch(result)
            return result

        call.__name__ = name
        call.__doc__ = method.__doc__
        return call

    def peers(self: Any) -> str:
        if not self._peers:
            from mpi4py import MPI

            group = self.Get_group()
            world = MPI.COMM_WORLD.Get_group()
            ranks = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world)
            group.Free()
            world.Free()
            self._peers = rank_ranges(list(ranks))
        return self._peers

    body = {name: wrap(name) for name in BLOCKING if hasattr(base, name)}
    body["peers"] = peers
    cls = type(f"Watched{base.__name__}", (_Watched, base), body)
    _classes[base] = cls
    return cls


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out)
