"""Checked transfers: each kind = transport + check + retry policy + ledger of records.

Data that is *summed* carries Huang & Abraham checksum rows (``comm.CheckedAllreduce``);
data that is *moved* carries a 64-bit digest (``checksum.digest64``) computed by its sender
and recomputed by its receiver:

- ``CheckedAllgather``: every rank's block to every rank;
- ``CheckedAlltoall``: block j of every rank to rank j (Ulysses' head <-> sequence swap);
- ``CheckedP2P``: one activation tensor from one rank to another (pipeline stages);
- ``CheckedRing``: one shift of a ring, every rank to the next, nonblocking (ring attention's
  K/V slices travel while each rank computes on the one at hand).

The pieces they share: ``RetryPolicy`` (``checksum.on_mismatch``/``retries``), ``FaultPlan``
(``fault.inject`` flips a bit before sending, after the digest, or in the received copy),
``Ledger`` (one ``Record`` per transfer, written to ``/checksum/collectives``) and
``agree`` (one tiny Allreduce that makes a verdict collective, so every rank retries or
stops together). A transfer that still fails after the retries raises ``IntegrityError``
(exit 3) naming the transfer, layer, site, sender and receiver ranks.

P2P, Alltoall and ring transfers take the caller's arrays on their device and give the
result back there. Device (CuPy) arrays go to MPI as they are when the library is
CUDA-aware (``cuda_aware``; the stream that wrote them is synchronised first), otherwise
through pinned host buffers kept per transfer (one device-to-host copy out, one
host-to-device copy in). Digests are computed where the bytes MPI sends are: on the
device with CUDA-aware MPI (one small read per collective), on the staged host copy
otherwise. The same holds for ``CheckedAllgather`` (ZeRO-1's parameter blocks on a
device; a text run's tokens on the host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core import checksum
from ..core.backend import get_array_module, grown, to_host
from ..errors import IntegrityError
from . import watchdog

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI

_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclass
class Record:
    """What one validated transfer reports (one per layer and site and replica)."""

    layer: int
    site: str
    residual: float
    bound: float
    ratio: float  # residual / bound; <= 1 passes (0 for moved data)
    passed: bool
    retries: int
    digest: int  # agreed 64-bit hash (0 when not hashed at this transfer)
    chunk: int = 0  # which batch chunk, with parallel.overlap


@dataclass
class Ledger:
    """The records of one transfer object, in the order the transfers finished."""

    records: list[Record] = field(default_factory=list)

    def add(self, layer: int, site: str, passed: bool, retries: int, digest: int = 0, *,
            residual: float = 0.0, bound: float = 0.0, ratio: float = 0.0,
            chunk: int = 0) -> None:
        self.records.append(Record(layer, site, residual, bound, ratio, passed, retries,
                                   digest, chunk))


@dataclass(frozen=True)
class RetryPolicy:
    """``on_mismatch = "retry"``: up to ``retries`` more attempts; ``"abort"``: none."""

    on_mismatch: str = "retry"
    retries: int = 2

    def gives_up(self, attempt: int) -> bool:
        """After attempt ``attempt`` (0 = the first) failed, stop instead of retrying?"""
        return self.on_mismatch == "abort" or attempt >= self.retries


@dataclass
class FaultPlan:
    """The ``fault.inject`` entries (``checksum.Fault``) that fire on world rank ``rank``."""

    faults: list = field(default_factory=list)
    rank: int = 0

    def __bool__(self) -> bool:
        return bool(self.faults)

    def apply(self, array: Any, layer: int, site: str, where: str, attempt: int) -> bool:
        """Flip the configured bits of ``array`` (in place); whether any fired."""
        fired = False
        for f in self.faults:
            if (f.rank, f.layer, f.site, f.where) == (self.rank, layer, site, where) and (
                attempt < f.times
            ):
                checksum.flip_bit(array, f.index % array.size, f.bit)
                fired = True
        return fired


def agree(comm: MPI.Comm, failed: bool, digest: int = 0,
          nonfinite: bool = False) -> tuple[bool, int, int, bool]:
    """Collective over ``comm``, one Allreduce of four words: (did any rank fail, the
    lowest and highest digest, did any rank see non-finite data)."""
    from mpi4py import MPI

    vec = np.array([int(failed), digest, digest ^ _MASK64, int(nonfinite)], dtype=np.uint64)
    comm.Allreduce(MPI.IN_PLACE, vec, op=MPI.MAX)
    return bool(vec[0]), int(vec[2]) ^ _MASK64, int(vec[1]), bool(vec[3])


def _digests(blocks: Any) -> np.ndarray:
    """(n,) uint64 host array: the digest of each block, read from a device at once."""
    return checksum.digests64(blocks)


def _sync(xp: Any) -> None:
    """Wait for the device work queued on the current stream (before MPI reads or writes a
    device buffer)."""
    xp.cuda.get_current_stream().synchronize()


def _ready(x: Any) -> None:
    """Before MPI touches ``x`` again after a retry: a device array written since (an
    injected fault) is synchronised; a host array needs nothing."""
    xp = get_array_module(x)
    if xp is not np:
        _sync(xp)


@dataclass
class _Checked:
    """What every moved-data transfer holds."""

    comm: MPI.Comm
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    faults: FaultPlan = field(default_factory=FaultPlan)
    ledger: Ledger = field(default_factory=Ledger)
    group_ranks: list = field(default_factory=list)  # world ranks of comm, for messages
    cuda_aware: bool = False  # device arrays go to MPI as they are (else pinned staging)
    _staging: dict = field(default_factory=dict, repr=False)  # pinned host buffers by name

    def __post_init__(self) -> None:
        if not self.group_ranks:
            self.group_ranks = list(range(self.comm.Get_size()))

    def _pinned(self, name: str, shape: tuple, dtype: Any) -> np.ndarray:
        """Pinned host buffer ``name`` (made once, grown to the largest shape asked for)."""
        import cupyx

        return grown(self._staging, (name, np.dtype(dtype).str), shape,
                     lambda size: cupyx.empty_pinned(size, dtype=dtype))

    def _wire(self, x: Any, name: str) -> Any:
        """What MPI is handed for array ``x`` (C-contiguous): a host array itself; a device
        array itself with CUDA-aware MPI, once the stream that wrote it is synchronised;
        otherwise its copy in pinned host buffer ``name``."""
        xp = get_array_module(x)
        x = xp.ascontiguousarray(x)
        if xp is np:
            return x
        if self.cuda_aware:
            _sync(xp)
            return x
        host = self._pinned(name, x.shape, x.dtype)
        x.get(out=host)
        return host

    def _landing(self, xp: Any, shape: tuple, dtype: Any, name: str) -> Any:
        """Where MPI writes what arrives for a caller on array module ``xp``: a fresh host
        array on NumPy, a fresh device array with CUDA-aware MPI, else pinned buffer ``name``."""
        if xp is np:
            return np.empty(shape, dtype)
        if self.cuda_aware:
            buf = xp.empty(shape, dtype)
            _sync(xp)  # its allocation is device work too
            return buf
        return self._pinned(name, shape, dtype)

    @staticmethod
    def _arrived(buf: Any, xp: Any) -> Any:
        """What arrived, on the caller's array module (a staged host buffer is copied to the
        device: the buffer is reused by the next transfer)."""
        return xp.asarray(buf) if xp is not np and get_array_module(buf) is np else buf

    @property
    def records(self) -> list[Record]:
        return self.ledger.records

    def _outgoing(self, payload: np.ndarray, layer: int, site: str,
                  attempt: int) -> np.ndarray:
        """The payload as sent: a corrupted copy when a send fault fires (after the digest)."""
        if not self.faults:
            return payload
        sent = payload.copy()
        self.faults.apply(sent, layer, site, "send", attempt)
        if get_array_module(sent) is not np:
            _sync(get_array_module(sent))
        return sent

    def _settle(self, kind: str, bad_pairs: list[tuple[int, int]], layer: int, site: str,
                attempt: int, digest: int) -> bool:
        """Agree on the outcome of one attempt; record it when final; raise when the policy
        gives up. ``bad_pairs``: (sender, receiver) group ranks whose block arrived wrong
        here. True when the transfer passed."""
        failed, _, _, _ = agree(self.comm, bool(bad_pairs))
        final = not failed or self.policy.gives_up(attempt)
        if final:
            self.ledger.add(layer, site, not failed, attempt, digest)
        if not failed:
            return True
        if self.policy.gives_up(attempt):
            pairs = sorted({p for part in self.comm.allgather(bad_pairs) for p in part})
            shown = ", ".join(f"{self.group_ranks[s]}->{self.group_ranks[r]}"
                              for s, r in pairs[:8])
            raise IntegrityError(
                f"hash mismatch in the {kind} at layer {layer} site '{site}' over ranks"
                f" {self.group_ranks}: corrupted block(s) sender->receiver {shown}; gave up"
                f" after {attempt} retries", self.comm)
        return False


@dataclass
class CheckedAllgather(_Checked):
    """``out[r] = block of rank r`` on every rank, each block's digest verified on arrival.

    ``block`` on the host or a device; the result on the same. A device block goes to MPI
    as it is with CUDA-aware MPI (the digests too: all of them, sent and recomputed, come
    back in one copy), else through pinned host buffers (one copy out, one back)."""

    def __call__(self, block: Any, *, site: str, layer: int) -> Any:
        """``block`` (...) -> (n, ...): every rank's block, in rank order."""
        n, me = self.comm.Get_size(), self.comm.Get_rank()
        xp = get_array_module(block)
        block = self._wire(block, "allgather.send")
        out = self._landing(xp, (n, *block.shape), block.dtype, "allgather.recv")
        wire = get_array_module(block)  # a device only with CUDA-aware MPI
        if wire is np:
            digest = np.array([checksum.digest64(block)], dtype=np.uint64)
            sent_digests = np.empty(n, dtype=np.uint64)
        else:  # the digests travel as device words, read with the arrivals' in one copy
            digest = checksum.device_digest(block)
            sent_digests = wire.empty(n, dtype=np.uint64)
            _sync(wire)
        watchdog.at(layer=layer, site=site)
        attempt = 0
        while True:
            if attempt:
                _ready(out)
            self.comm.Allgather(self._outgoing(block, layer, site, attempt), out)
            self.comm.Allgather(digest, sent_digests)
            self.faults.apply(out, layer, site, "result", attempt)  # this rank's copy
            got, sent = self._arrival_digests(out, sent_digests)
            bad = [(int(s), me) for s in np.flatnonzero(got != sent)]
            if self._settle("Allgather", bad, layer, site, attempt, checksum.digest64(sent)):
                return self._arrived(out, xp)
            attempt += 1

    @staticmethod
    def _arrival_digests(out: Any, sent_digests: Any) -> tuple[np.ndarray, np.ndarray]:
        """(digest of each block that arrived, the senders' digests), (n,) uint64 host
        arrays; on a device (CUDA-aware) all 2n words come back in one copy."""
        xp = get_array_module(out)
        if xp is np:
            return _digests(out), sent_digests
        n = out.shape[0]
        words = to_host(xp.concatenate([*(checksum.device_digest(b) for b in out),
                                        sent_digests]))
        return words[:n], words[n:]


@dataclass
class CheckedAlltoall(_Checked):
    """``out[s] = blocks[me] of rank s``: block j of every rank goes to rank j, each block's
    digest verified by its receiver."""

    def __call__(self, blocks: Any, *, site: str, layer: int) -> Any:
        """``blocks`` (n, ...) on the host or a device; the result on the same."""
        n, me = self.comm.Get_size(), self.comm.Get_rank()
        if blocks.shape[0] != n:
            raise ValueError(f"Alltoall needs one block per rank: {blocks.shape[0]} for {n}")
        xp = get_array_module(blocks)
        blocks = self._wire(blocks, "alltoall.send")
        out = self._landing(xp, blocks.shape, blocks.dtype, "alltoall.recv")
        digests = _digests(blocks)
        received = np.empty(n, dtype=np.uint64)
        watchdog.at(layer=layer, site=site)
        attempt = 0
        while True:
            if attempt:
                _ready(out)
            self.comm.Alltoall(self._outgoing(blocks, layer, site, attempt), out)
            self.comm.Alltoall(digests, received)
            self.faults.apply(out, layer, site, "result", attempt)
            bad = [(int(s), me) for s in np.flatnonzero(_digests(out) != received)]
            if self._settle("Alltoall", bad, layer, site, attempt,
                            checksum.digest64(received)):
                return self._arrived(out, xp)
            attempt += 1


_PAYLOAD, _DIGEST, _VERDICT = 0, 1, 2  # message tags (times 3 + the caller's tag)
_OK, _AGAIN, _GIVE_UP = 0, 1, 2


@dataclass
class CheckedP2P(_Checked):
    """One tensor from one rank to another, its digest verified by the receiver, who
    answers with a verdict; a corrupted message is sent again (both sides follow the same
    policy, so they agree on the attempts without another collective).

    When the retries are spent the receiver raises ``IntegrityError`` (``comm = None``:
    only this pair knows). With ``abort_on_failure`` (a job, which ends through
    ``MPI_Abort``) the sender is not told, so the receiver's is the one message; without
    it both sides raise (tests, embedding).
    """

    abort_on_failure: bool = False

    def send(self, x: Any, dest: int, *, site: str, layer: int, tag: int = 0) -> None:
        """Send ``x`` (host or device) to ``dest``; returns once the receiver accepted it."""
        x = self._wire(x, "p2p.send")
        wire = get_array_module(x)  # a device only with CUDA-aware MPI
        if wire is np:
            digest = np.array([checksum.digest64(x)], dtype=np.uint64)
        else:  # the digest goes as a device word: the sender reads nothing back
            digest = checksum.device_digest(x)
            _sync(wire)
        verdict = np.empty(1, dtype=np.int64)
        watchdog.at(layer=layer, site=site)
        attempt = 0
        while True:
            self.comm.Send(self._outgoing(x, layer, site, attempt), dest, 3 * tag + _PAYLOAD)
            self.comm.Send(digest, dest, 3 * tag + _DIGEST)
            self.comm.Recv(verdict, dest, 3 * tag + _VERDICT)
            if verdict[0] == _OK:
                return
            if verdict[0] == _GIVE_UP:
                raise self._failure(layer, site, self.comm.Get_rank(), dest, attempt)
            attempt += 1

    def recv(self, out: Any, source: int, *, site: str, layer: int,
             tag: int = 0) -> Any:
        """Receive into ``out`` (C-contiguous, host or device) from ``source``; ``out``."""
        xp = get_array_module(out)
        landing = (out if xp is np or self.cuda_aware
                   else self._pinned("p2p.recv", out.shape, out.dtype))
        if xp is not np and self.cuda_aware:
            _sync(xp)  # whatever last wrote ``out`` is done before MPI writes it
        final = self._recv(landing, source, site=site, layer=layer, tag=tag)
        if final is not out:
            out.set(final)  # staged: one copy to the device
        return out

    def _recv(self, out: Any, source: int, *, site: str, layer: int, tag: int) -> Any:
        digest = np.empty(1, dtype=np.uint64)
        watchdog.at(layer=layer, site=site)
        attempt = 0
        while True:
            if attempt:
                _ready(out)
            self.comm.Recv(out, source, 3 * tag + _PAYLOAD)
            self.comm.Recv(digest, source, 3 * tag + _DIGEST)
            self.faults.apply(out, layer, site, "result", attempt)
            passed = checksum.digest64(out) == int(digest[0])
            final = passed or self.policy.gives_up(attempt)
            if final:  # the message's tag (a pipeline's micro-batch) in the chunk column
                self.ledger.add(layer, site, passed, attempt, int(digest[0]), chunk=tag)
            if final and not passed:
                if self.abort_on_failure:  # the receiver alone reports; the job ends
                    raise self._failure(layer, site, source, self.comm.Get_rank(), attempt)
                self.comm.Send(np.array([_GIVE_UP], dtype=np.int64), source,
                               3 * tag + _VERDICT)
                raise self._failure(layer, site, source, self.comm.Get_rank(), attempt)
            self.comm.Send(np.array([_OK if passed else _AGAIN], dtype=np.int64), source,
                           3 * tag + _VERDICT)
            if passed:
                return out
            attempt += 1

    def _failure(self, layer: int, site: str, sender: int, receiver: int,
                 attempt: int) -> IntegrityError:
        # only the two ranks of the message know: the job ends through the abort path
        return IntegrityError(
            f"hash mismatch in the point-to-point transfer at layer {layer} site '{site}'"
            f" from rank {self.group_ranks[sender]} to rank {self.group_ranks[receiver]};"
            f" gave up after {attempt} retries")


_RING_TAG = 30000  # + 2 x channel + (0 payload, 1 digest); below MPI's minimum tag bound 32767
RING_CHANNELS = 8


@dataclass
class RingShift:
    """One ring shift in flight (from ``CheckedRing.start`` to ``CheckedRing.finish``)."""

    payload: np.ndarray  # what this rank sends, kept for a resend
    sent: np.ndarray  # the buffer of the Isend: ``payload`` or its corrupted copy
    digest: Any  # (1,) uint64, this rank's digest of ``payload`` (Isend buffer; on the
    # device with CUDA-aware MPI and a device payload, else on the host)
    received: Any  # the Irecv buffer: the previous rank's payload
    received_digest: Any  # (1,) uint64, the previous rank's digest (where ``digest`` is)
    requests: list  # the four requests: Irecv x 2, Isend x 2
    layer: int
    site: str
    channel: int
    finished: bool = False
    xp: Any = np  # the caller's array module (the received array is given back on it)


@dataclass
class CheckedRing(_Checked):
    """One ring shift over ``comm``: every rank sends an array to the next rank
    ((rank + 1) % n) and receives the same-shaped array from the previous one, with
    nonblocking Isend/Irecv so the caller computes while it travels. Moved data: the
    sender's 64-bit digest (checksum.digest64) travels with it and the receiver checks it.

    ``finish`` is collective over ``comm`` (one tiny Allreduce): every rank finishes the
    same shifts in the same order. Shifts in flight at once need distinct channels. With
    one rank a shift is a copy of the payload: no MPI call, no record.
    """

    def start(self, payload: np.ndarray, *, site: str, layer: int,
              channel: int = 0) -> RingShift:
        """Post the shift (Irecv into a fresh buffer of payload's shape/dtype, Isend of
        payload and of its digest). The caller must not modify ``payload`` until
        ``finish``. ``channel`` (0..7) keeps up to 8 shifts in flight at once apart
        (distinct tags), e.g. K/V and the dK/dV accumulator in the backward."""
        if not 0 <= channel < RING_CHANNELS:
            raise ValueError(f"ring channel {channel} is outside 0..{RING_CHANNELS - 1}")
        xp = get_array_module(payload)
        n = self.comm.Get_size()
        if n == 1:
            payload = xp.ascontiguousarray(payload)
            digest = np.array([checksum.digest64(payload)], dtype=np.uint64)
            return RingShift(payload, payload, digest, payload.copy(), digest.copy(), [],
                             layer, site, channel, xp=xp)
        payload = self._wire(payload, f"ring.send{channel}")
        received = self._landing(xp, payload.shape, payload.dtype, f"ring.recv{channel}")
        if get_array_module(payload) is np:  # a host payload, or its staged copy
            digest = np.array([checksum.digest64(payload)], dtype=np.uint64)
            received_digest = np.empty(1, dtype=np.uint64)
        else:  # CUDA-aware: the digest travels as a device word, read with the arrival's
            digest = checksum.device_digest(payload)
            received_digest = xp.empty(1, dtype=np.uint64)
            _sync(xp)  # the digest is written before MPI reads it
        prev, nxt = self._neighbours()
        tag = _RING_TAG + 2 * channel
        sent = self._outgoing(payload, layer, site, 0)
        requests = [
            self.comm.Irecv(received, prev, tag),
            self.comm.Irecv(received_digest, prev, tag + 1),
            self.comm.Isend(sent, nxt, tag),
            self.comm.Isend(digest, nxt, tag + 1),
        ]
        return RingShift(payload, sent, digest, received, received_digest, requests, layer,
                         site, channel, xp=xp)

    def poll(self, shift: RingShift) -> None:
        """Let MPI move the shift along (``MPI_Testall``, never blocks). Libraries without an
        asynchronous progress thread (MPICH and Open MPI by default) move a large message
        (rendezvous protocol) only inside MPI calls, so a computation meant to hide the
        shift calls this between its blocks; without it the bytes move in ``finish``."""
        if shift.requests:
            from mpi4py import MPI

            MPI.Request.Testall(shift.requests)

    def finish(self, shift: RingShift) -> np.ndarray:
        """Wait for the shift, verify the received digest, agree over ``comm`` so every
        rank of the ring retries or stops together; on a mismatch resend the kept payload
        (and its digest) with a blocking Sendrecv (same check) up to the policy's retries;
        the received array. One record per shift (the sender's digest); a fault that
        persists raises ``IntegrityError`` naming the sender->receiver world ranks."""
        if shift.finished:
            raise ValueError(f"ring shift at layer {shift.layer} site '{shift.site}' channel"
                             f" {shift.channel} is already finished")
        shift.finished = True
        if self.comm.Get_size() == 1:
            return shift.received
        return self._arrived(self._finish(shift), shift.xp)

    def _finish(self, shift: RingShift) -> Any:
        from mpi4py import MPI

        layer, site = shift.layer, shift.site
        prev, nxt = self._neighbours()
        tag = _RING_TAG + 2 * shift.channel
        watchdog.at(layer=layer, site=site)
        # Isend/Irecv return at once; the wait is here, and a watched comm does not see it
        with watchdog.waiting(f"Waitall (ring shift, channel {shift.channel})",
                              watchdog.rank_ranges(sorted({self.group_ranks[prev],
                                                           self.group_ranks[nxt]}))):
            MPI.Request.Waitall(shift.requests)
        shift.requests = []
        shift.sent = shift.payload  # the send buffer is free (a corrupted copy is dropped)
        attempt = 0
        while True:
            self.faults.apply(shift.received, layer, site, "result", attempt)
            got, expected = self._arrival_digests(shift)
            bad = [] if got == expected else [(prev, self.comm.Get_rank())]
            if self._settle("ring shift", bad, layer, site, attempt, expected):
                return shift.received
            attempt += 1
            _ready(shift.received)
            self.comm.Sendrecv(self._outgoing(shift.payload, layer, site, attempt), nxt, tag,
                               shift.received, prev, tag)
            self.comm.Sendrecv(shift.digest, nxt, tag + 1, shift.received_digest, prev,
                               tag + 1)

    @staticmethod
    def _arrival_digests(shift: RingShift) -> tuple[int, int]:
        """(digest of what arrived, the sender's digest). With device buffers (CUDA-aware)
        both are on the device: one copy of the two words, not two blocking reads."""
        xp = get_array_module(shift.received_digest)
        if xp is np:
            return checksum.digest64(shift.received), int(shift.received_digest[0])
        words = to_host(xp.concatenate([checksum.device_digest(shift.received),
                                        shift.received_digest]))
        return int(words[0]), int(words[1])

    def _neighbours(self) -> tuple[int, int]:
        """(previous, next) group ranks of this rank in the ring."""
        n, me = self.comm.Get_size(), self.comm.Get_rank()
        return (me - 1) % n, (me + 1) % n
