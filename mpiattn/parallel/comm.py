"""The checksum-validated Allreduce and small collective helpers; knows nothing about
models. (The process grid and its communicators are ``grid``.)

Every function takes its communicator as an argument; nothing binds ``COMM_WORLD`` at import.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from ..core import checksum
from ..core.backend import Backend, data_ptr, get_array_module, grown, to_host
from ..core.shard import partition
from ..errors import IntegrityError, NumericalError
from . import watchdog
from .transfers import FaultPlan, Ledger, Record, RetryPolicy, agree


def cuda_aware_mpi() -> bool:
    """Whether the loaded MPI library says it takes CUDA device buffers.

    mpi4py has no query for this; MPICH and Open MPI export ``MPIX_Query_cuda_support``.
    Under the CuPy test stand-in (``tests/standin``) the simulated library answers.
    """
    cupy = sys.modules.get("cupy")
    if getattr(cupy, "__standin__", None) == "mpiattn":
        return bool(cupy.standin.mpi_cuda_aware())
    try:
        query = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (AttributeError, OSError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


def check_finite(comm: MPI.Comm, layer: int, **sites: Any) -> None:
    """Collective: raise NumericalError on every rank of ``comm`` if any rank's arrays hold
    inf or NaN. ``sites``: site name -> array, in the order they were computed (a layer's
    ``attention=`` then ``mlp=``); the first site with a bad array anywhere is reported.

    One flag per site, read from a device in one copy (not one blocking read each), all
    flags in one tiny Allreduce, so no rank is left waiting."""
    names = list(sites)
    arrays = list(sites.values())
    xp = get_array_module(arrays[0])
    if xp is np:
        bad = np.array([0 if bool(np.isfinite(a).all()) else 1 for a in arrays],
                       dtype=np.int32)
    else:  # the flags formed on the device, read at once
        ok = xp.stack([xp.isfinite(a).all() for a in arrays])
        bad = (1 - to_host(ok).astype(np.int32)).astype(np.int32)
    flags = np.empty_like(bad)
    comm.Allreduce(bad, flags, op=MPI.MAX)
    for k, name in enumerate(names):
        if flags[k]:
            ranks = [r for r, b in enumerate(comm.allgather(int(bad[k]))) if b]
            raise NumericalError(f"non-finite activations at layer {layer} after the {name}"
                                 f" block on rank(s) {ranks} (inf/NaN): check the input and"
                                 " the weights", comm)


def gather_rows(comm: MPI.Comm, rows: np.ndarray, root: int = 0) -> np.ndarray | None:
    """Concatenate every rank's rows (axis 0) on ``root`` in rank order (Gatherv)."""
    rows = np.ascontiguousarray(rows)
    per_row = int(np.prod(rows.shape[1:], dtype=np.int64))
    counts = comm.allgather(rows.shape[0])
    out = None
    if comm.Get_rank() == root:
        out = np.empty((sum(counts), *rows.shape[1:]), dtype=rows.dtype)
        comm.Gatherv(rows, [out, [c * per_row for c in counts]], root=root)
    else:
        comm.Gatherv(rows, None, root=root)
    return out


@dataclass
class Pending:
    """A reduction in flight: its buffers, its request and how many attempts it took."""

    partial: Any
    site: str
    layer: int
    slot: int
    send: Any
    recv: Any
    request: Any
    attempt: int
    out: Any = None
    aliased: bool = False  # the partial was computed in place in the send buffer
    clean: Any = None  # a copy of an aliased partial, kept only when faults are injected
    split: Any = None  # a SplitSum round (float32 partials summed in float64), or None


@dataclass
class AllreduceTransport:
    """Preallocated buffers and the nonblocking Allreduce(SUM) over ``comm``: device
    buffers straight to a CUDA-aware MPI, otherwise through pinned host buffers."""

    comm: MPI.Comm
    backend: Backend
    cuda_aware: bool = False
    group_ranks: list = field(default_factory=list)
    _buffers: dict = field(default_factory=dict)

    def buffer(self, name: str, shape: tuple, dtype: Any, host: bool = False) -> Any:
        """The buffer ``name`` of this shape and dtype (made once, then reused; a view of
        the largest one asked for)."""
        def make(size: int) -> Any:
            if host and self.backend.is_gpu:
                import cupyx

                return cupyx.empty_pinned(size, dtype=dtype)
            return (np if host else self.backend.xp).empty(size, dtype=dtype)

        # one per name, grown to the largest shape (batches of every length reuse it)
        return grown(self._buffers, (name, np.dtype(dtype).str, host), shape, make)

    def post(self, send: Any, recv: Any, slot: int) -> Any:
        """Start the sum of ``send`` into ``recv``; the request."""
        self.backend.sync()  # device work that fills ``send`` must be done
        if not self.backend.is_gpu or self.cuda_aware:
            return self.comm.Iallreduce(send, recv, op=MPI.SUM)
        host_send = self.buffer(f"host_send{slot}", send.shape, send.dtype, host=True)
        host_recv = self.buffer(f"host_recv{slot}", recv.shape, recv.dtype, host=True)
        send.get(out=host_send)
        return self.comm.Iallreduce(host_send, host_recv, op=MPI.SUM)

    def wait(self, request: Any, recv: Any, slot: int) -> None:
        with watchdog.waiting("Iallreduce", ",".join(map(str, self.group_ranks))):
            request.Wait()
        if self.backend.is_gpu and not self.cuda_aware:
            recv.set(self.buffer(f"host_recv{slot}", recv.shape, recv.dtype, host=True))


@dataclass
class CheckedAllreduce:
    """Allreduce(SUM) over a head group, carrying its own proof (see ``checksum``).

    Built from a transport (``AllreduceTransport``), the ABFT check (``checksum``: two
    rows appended to every partial, verified against the sum), hash agreement of the
    result (``checksum.digest64``, compared by ``transfers.agree``), a retry policy, the
    injected faults and a ledger of records (``transfers``). With ``mode = "abft"`` the
    partial travels in the wire dtype (float64 by default); after the sum every rank checks
    the rows against the result, hashes it, and one tiny Allreduce makes the verdict
    collective, so all ranks retry or stop together. Send and receive buffers are distinct
    and preallocated, so the partial survives the reduction and a retry needs no
    recomputation.
    """

    comm: MPI.Comm
    backend: Backend
    mode: str = "abft"
    wire: str = "float64"  # "float64" | "native": the dtype the partials travel in
    on_mismatch: str = "retry"
    retries: int = 2
    hash_every: str = "collective"
    cuda_aware: bool = False
    faults: list = field(default_factory=list)
    world_rank: int = 0
    group_ranks: list = field(default_factory=list)  # world ranks of the group, for messages
    seconds: float = 0.0  # time inside __call__ (the "allreduce" phase)

    def __post_init__(self) -> None:
        self.transport = AllreduceTransport(self.comm, self.backend, self.cuda_aware,
                                            self.group_ranks)
        self.policy = RetryPolicy(self.on_mismatch, self.retries)
        self.injector = FaultPlan(self.faults, self.world_rank)
        self.ledger = Ledger()

    @property
    def records(self) -> list[Record]:
        return self.ledger.records

    def buffer(self, rows: int, cols: int, dtype: Any, slot: int = 0) -> Any:
        """Where to compute a partial. When it travels in its own dtype this is the body of
        the send buffer itself, so neither the payload nor the result is ever copied."""
        if (self.mode == "abft" and self.comm.Get_size() > 1
                and self.wire_dtype(dtype) == np.dtype(dtype)):
            send = self.transport.buffer(f"send{slot}", (rows + checksum.CHECK_ROWS, cols),
                                         dtype)
            return send[:rows]
        return self.transport.buffer(f"partial{slot}", (rows, cols), dtype)

    def wire_dtype(self, dtype: Any) -> np.dtype:
        wide = self.mode == "abft" and self.wire == "float64"
        return np.dtype(np.float64) if wide else np.dtype(dtype)

    def __call__(self, partial: Any, *, site: str, layer: int) -> Any:
        return self.finish(self.start(partial, site=site, layer=layer))

    def start(self, partial: Any, *, site: str, layer: int, slot: int = 0) -> Pending:
        """Checksum the partial and start its Allreduce; ``finish`` validates the result.

        Each ``slot`` has its own buffers, so several reductions can be in flight while
        the next chunk is computed (``parallel.overlap``).
        """
        t0 = time.perf_counter()
        watchdog.at(layer=layer, site=site)
        rows, cols = partial.shape
        if self.comm.Get_size() == 1:  # one rank holds all heads: no sum, nothing to check
            return Pending(partial, site, layer, slot, partial, partial, None, 0, partial)
        out = self.transport.buffer(f"result{slot}", (rows, cols), partial.dtype)
        if self._splits(partial):
            pending = Pending(partial, site, layer, slot, None, None, None, 0, out)
            pending.split = SplitSum(self, pending)
            pending.split.post()
            self.seconds += time.perf_counter() - t0
            return pending
        if self.mode == "off":
            self.injector.apply(partial, layer, site, "send", 0)
            pending = Pending(partial, site, layer, slot, partial, out, None, 0, out)
        else:
            wire = self.wire_dtype(partial.dtype)
            shape = (rows + checksum.CHECK_ROWS, cols)
            send = self.transport.buffer(f"send{slot}", shape, wire)
            recv = self.transport.buffer(f"recv{slot}", shape, wire)
            aliased = wire == partial.dtype and data_ptr(partial) == data_ptr(send)
            pending = Pending(partial, site, layer, slot, send, recv, None, 0,
                              recv[:rows] if aliased else out, aliased)
            self._fill(pending)
        pending.request = self.transport.post(pending.send, pending.recv, slot)
        self.seconds += time.perf_counter() - t0
        return pending

    def _splits(self, partial: Any) -> bool:
        """Whether this reduction goes the split way (``SplitSum``): float64 sums of
        narrower partials on the host, at least one row per rank."""
        return (self.mode == "abft" and not self.backend.is_gpu
                and self.wire_dtype(partial.dtype) != partial.dtype
                and partial.shape[0] >= self.comm.Get_size())

    def _fill(self, p: Pending) -> None:
        """The send buffer of attempt ``p.attempt``: payload, checksum rows, injected faults."""
        rows, cols = p.partial.shape
        if p.aliased and self.injector:  # keep the clean partial: injection writes over it
            if p.clean is None:
                p.clean = p.partial.copy()
            else:
                p.partial[...] = p.clean
        scratch = self.transport.buffer(f"abs{p.slot}", (rows, cols), p.partial.dtype)
        checksum.append_checksums(p.partial, p.send, scratch, copy=not p.aliased)
        if self.injector:  # corrupt the payload after its checksums, in the partial's dtype
            body = self.transport.buffer("corrupt", (rows, cols), p.partial.dtype)
            body[...] = p.partial if p.clean is None else p.clean
            self.injector.apply(body, p.layer, p.site, "send", p.attempt)
            with np.errstate(invalid="ignore", over="ignore"):  # a flip may make NaN/inf
                p.send[:rows] = body

    def finish(self, p: Pending) -> Any:
        """Wait for a started reduction, validate it, retry it if asked; the summed result."""
        t0 = time.perf_counter()
        try:
            return self._finish(p)
        finally:
            self.seconds += time.perf_counter() - t0

    def _finish(self, p: Pending) -> Any:
        if p.split is not None:
            return self._finish_split(p)
        if p.request is None:  # a group of one rank
            return p.out
        self.transport.wait(p.request, p.recv, p.slot)
        rows = p.partial.shape[0]
        if self.mode == "off":
            self.injector.apply(p.out, p.layer, p.site, "result", 0)
            return p.out
        ranks = self.comm.Get_size()
        while True:
            if self.backend.is_gpu:  # the checks on the device, one read for all of them
                def result() -> None:  # queued after the checksum test, before the hash
                    if not p.aliased:
                        p.out[...] = p.recv[:rows]
                    self.injector.apply(p.out, p.layer, p.site, "result", p.attempt)

                hashed = p.out if self.hash_every == "collective" else None
                residual, bound, ratio, local_bad, digest = checksum.device_verdict(
                    p.recv, ranks, p.send[rows + 1], hashed, result)
            else:
                residual, bound, ratio = checksum.residual_ratio(p.recv, ranks)
                if not p.aliased:
                    p.out[...] = p.recv[:rows]
                # |P| sums are finite on every rank with finite data: else nothing to retry
                local_bad = not bool(np.isfinite(p.send[rows + 1]).all())
                digest = None  # _verdict applies the result faults, then hashes
            if self._verdict(p, residual, bound, ratio, local_bad, digest=digest):
                return p.out
            p.attempt += 1  # the partial is intact: send it again
            self._fill(p)
            p.request = self.transport.post(p.send, p.recv, p.slot)
            self.transport.wait(p.request, p.recv, p.slot)

    def _finish_split(self, p: Pending) -> Any:
        """``_finish`` of a split round: the same verdict, agreement, records and retries;
        a failure reports the worst block's figures (the same on every rank)."""
        while True:
            if self._verdict(p, *p.split.complete(), worst_block=True):
                return p.out
            p.attempt += 1  # the partial is intact: send it again
            p.split.post()

    def _verdict(self, p: Pending, residual: float, bound: float, ratio: float,
                 local_bad: bool, worst_block: bool = False, digest: int | None = None) -> bool:
        """One attempt's outcome, agreed by the group: result faults, the hash, the
        non-finite check (NumericalError), the record when final; True when it passed,
        False to retry, IntegrityError when the policy gives up. ``digest``: the result's
        hash when the caller applied the result faults and hashed it already (a device)."""
        if digest is None:
            self.injector.apply(p.out, p.layer, p.site, "result", p.attempt)
            digest = checksum.digest64(p.out) if self.hash_every == "collective" else 0
        failed, low, high, nonfinite = agree(self.comm, ratio > 1.0, digest, local_bad)
        if nonfinite:
            bad = [r for r, b in zip(self.group_ranks, self.comm.allgather(local_bad),
                                     strict=True) if b]
            raise NumericalError(
                f"non-finite values (inf/NaN) in the partial sums at layer {p.layer} site"
                f" '{p.site}' on rank(s) {bad}: check the input and the weights", self.comm)
        passed = not failed and low == high
        if failed and worst_block:  # failure path only
            residual, bound, ratio = max(self.comm.allgather((residual, bound, ratio)),
                                         key=lambda x: x[2])
        if passed or self.policy.gives_up(p.attempt):
            self.ledger.add(p.layer, p.site, passed, p.attempt, high, residual=residual,
                            bound=bound, ratio=ratio, chunk=p.slot)
        if passed:
            return True
        problem = self._describe(p.site, p.layer, failed, residual, bound, ratio, digest)
        if self.policy.gives_up(p.attempt):
            raise IntegrityError(f"{problem}; gave up after {p.attempt} retries", self.comm)
        return False

    def _describe(self, site: str, layer: int, failed: bool, residual: float, bound: float,
                  ratio: float, digest: int) -> str:
        where = f"Allreduce at layer {layer} site '{site}' over ranks {self.group_ranks}"
        if failed:
            return (f"checksum mismatch in the {where}: residual {residual:.3e} exceeds the"
                    f" rounding bound {bound:.3e} (x{ratio:.3g})")
        return f"ranks disagree on the result of the {where}: {self._who_differs(digest)}"

    def _ranks_by(self, value: Any) -> dict[Any, list[int]]:
        """Collective, failure paths only: every rank's ``value``, each distinct one with
        the (world) ranks that hold it, in rank order."""
        groups: dict[Any, list[int]] = {}
        for i, v in enumerate(self.comm.allgather(value)):
            groups.setdefault(v, []).append(self.group_ranks[i])
        return groups

    def _who_differs(self, digest: int) -> str:
        """Collective, failure path only: which ranks' copies differ from the others'."""
        groups = self._ranks_by(digest)
        sizes = sorted(len(g) for g in groups.values())
        if len(groups) == 2 and sizes[0] < sizes[1]:
            odd = min(groups.values(), key=len)
            return f"rank(s) {odd} differ bit-wise from the others"
        return "copies differ bit-wise: " + " vs ".join(str(g) for g in groups.values())

    def check_agreement(self, x: Any, *, site: str, layer: int) -> int:
        """Hash ``x`` on every rank of the group and raise if any copy differs. The error
        names the ranks that differ and, for float32 on NumPy, whether they ran different
        element-wise kernels (``core.kernels``: another build, CPU clone or
        ``MPIATTN_KERNELS``), which alone makes replicated copies differ in the last bits."""
        digest = checksum.digest64(x)
        _, low, high, _ = agree(self.comm, False, digest)
        if low != high:
            from ..core import kernels

            who = self._who_differs(digest)
            kinds = self._ranks_by(kernels.used_for(x.dtype, get_array_module(x) is not np))
            message = (f"ranks disagree on their copies at layer {layer} site '{site}'"
                       f" (ranks {self.group_ranks}): {who}")
            if len(kinds) > 1:
                message += ("; they ran different element-wise kernels ("
                            + "; ".join(f"ranks {r}: {k}" for k, r in kinds.items())
                            + "): install the same build on every node, or set"
                            " MPIATTN_KERNELS=numpy on every rank")
            raise IntegrityError(message, self.comm)
        return high


_TAG = 0x6D70  # point-to-point tags of SplitSum: _TAG + 4 * slot + (0 blocks, 1 rows, 2 sums)


class SplitSum:
    """One round of the float64-wire check with float32 bytes on the wire (NumPy ranks).

    The rows of the sum are split into one block per rank (``shard.partition``). Each rank
    sends block j of its float32 partial to rank j with that block's two checksum rows in
    float64 (column sums of the block taken in float64, and the inflated column sums of
    its absolute values, as ``checksum.append_checksums`` makes them); rank j sums the k
    blocks in float64, in rank order, and checks them against the summed rows with the
    same bound as the float64 wire (``checksum.residual_ratio`` over k ranks), rounds its
    block to the partial's dtype and sends it to every rank. Every rank then holds the
    whole sum; ``CheckedAllreduce`` hashes it and agrees on the verdict as for an Allreduce.

    For two ranks every float64 sum is the exact sum of two float32 values, rounded once
    to float32: the numbers are those of the float64-wire Allreduce, bit for bit. The
    check sees what that one sees (a flip in a partial after its checksums, in transit or
    in the sum), and the wire carries half its bytes, point to point, which on shared
    memory here is faster even than the float32 Allreduce.
    """

    def __init__(self, owner: CheckedAllreduce, p: Pending) -> None:
        self.owner, self.p = owner, p
        comm = owner.comm
        self.k, self.rank = comm.Get_size(), comm.Get_rank()
        rows, cols = p.partial.shape
        self.spans = []
        for j in range(self.k):
            count, start = partition(rows, self.k, j)
            self.spans.append((start, start + count))
        mine = self.spans[self.rank]
        buf = owner.transport.buffer
        slot, dtype = p.slot, p.partial.dtype
        self.blocks = buf(f"split_in{slot}", (self.k, mine[1] - mine[0], cols), dtype)
        chunk = max(1, checksum.SPLIT_CHUNK // max(cols, 1))  # rows of the in-cache float64 passes
        self.wide = buf(f"split_wide{slot}", (chunk, cols), np.float64)
        self.magnitude = buf(f"split_abs{slot}", (chunk, cols), dtype)
        self.rows_out = buf(f"split_rows{slot}", (self.k, checksum.CHECK_ROWS, cols),
                            np.float64)
        self.rows_in = buf(f"split_rows_in{slot}", (self.k, checksum.CHECK_ROWS, cols),
                           np.float64)
        self.requests: list = []
        self.local_bad = False

    def post(self) -> None:
        """Checksum rows of the clean partial's blocks, the (perhaps corrupted) payload
        out and every other rank's blocks for this rank in."""
        p, owner = self.p, self.owner
        rows, cols = p.partial.shape
        for j, (a, b) in enumerate(self.spans):
            checksum.wide_checksum_rows(p.partial[a:b], self.rows_out[j], self.wide,
                                        self.magnitude)
        self.local_bad = not bool(np.isfinite(self.rows_out[:, 1]).all())
        payload = p.partial
        if owner.injector:  # corrupt a copy after the checksums; the partial stays clean
            payload = owner.transport.buffer(f"corrupt{p.slot}", (rows, cols), p.partial.dtype)
            payload[...] = p.partial
            with np.errstate(invalid="ignore", over="ignore"):
                owner.injector.apply(payload, p.layer, p.site, "send", p.attempt)
        a, b = self.spans[self.rank]
        self.own = payload[a:b]  # this rank's own block, as sent
        comm, tag = owner.comm, _TAG + 4 * p.slot
        self.requests = []
        for j, (c, d) in enumerate(self.spans):
            if j == self.rank:
                continue
            self.requests.append(comm.Irecv(self.blocks[j], source=j, tag=tag))
            self.requests.append(comm.Irecv(self.rows_in[j], source=j, tag=tag + 1))
            self.requests.append(comm.Isend(payload[c:d], dest=j, tag=tag))
            self.requests.append(comm.Isend(self.rows_out[j], dest=j, tag=tag + 1))

    def complete(self) -> tuple[float, float, float, bool]:
        """Wait, sum and check this rank's block, share it: (residual, bound, ratio of this
        rank's block, whether this rank's partial had non-finite values)."""
        p, owner, comm = self.p, self.owner, self.owner.comm
        ranks = ",".join(map(str, owner.group_ranks))
        with watchdog.waiting("checked sum (point to point)", ranks):
            MPI.Request.Waitall(self.requests)
        a, b = self.spans[self.rank]
        self.rows_in[self.rank] = self.rows_out[self.rank]
        parts = [self.own if i == self.rank else self.blocks[i] for i in range(self.k)]
        total_sums = np.zeros(p.out.shape[1])  # column sums of this rank's block of the sum
        step = self.wide.shape[0]
        with np.errstate(invalid="ignore", over="ignore"):
            for i in range(0, b - a, step):  # a chunk of rows at a time, in cache
                total = self.wide[: min(step, b - a - i)]
                total[...] = parts[0][i : i + step]
                for part in parts[1:]:  # in rank order, the same on every rank and every run
                    total += part[i : i + step]
                total_sums += checksum.column_sums(total)
                p.out[a + i : a + i + total.shape[0]] = total  # rounded once
        sums = self.rows_in.sum(axis=0)
        residual, bound, ratio = checksum.ratio_of_sums(total_sums, sums[0], sums[1], b - a,
                                                        self.k)
        tag = _TAG + 4 * p.slot + 2
        requests = []
        for j, (c, d) in enumerate(self.spans):
            if j != self.rank:
                requests.append(comm.Irecv(p.out[c:d], source=j, tag=tag))
                requests.append(comm.Isend(p.out[a:b], dest=j, tag=tag))
        with watchdog.waiting("checked sum (point to point)", ranks):
            MPI.Request.Waitall(requests)
        return residual, bound, ratio, self.local_bad
