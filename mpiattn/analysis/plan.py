"""``mpiattn plan``: predict layer time, speed-up and efficiency at N ranks, offline.

    mpiattn plan s1.h5 s2.h5 s4.h5                    # run files at several rank counts
    mpiattn plan bench2.h5 bench4.h5 --set model.layers=24 --set input.seq_len=512
    mpiattn plan s*.h5 --cores 64 --ranks-per-node 8 --nodes-alpha 5e-6 --nodes-beta 1e-10
    mpiattn plan b1.h5 b2.h5 --set input.seq_len=65536 --layout best --memory 1.5

Two fitted models, both stated in the output with their numbers, and the layouts built on
them:

1. Compute (every phase but the Allreduce), per rank and layer:
   ``t = (F_rank / R + g·N·H) / speed``. ``F_rank`` is the rank's share of the model FLOPs
   ``2·N·H·3H + 4·B·S²·H + 2·N·H·H + 4·N·H·F`` (N = B·S tokens, split by heads/ranks),
   ``g·N·H`` the replicated elementwise work (LayerNorm, residuals), ``R`` the FLOP rate of
   one dedicated core, and ``speed`` the core-equivalents of the rank: ``k`` BLAS threads
   (cores // ranks on the node, as the runner sets them) scale by Amdahl's law with a
   fitted parallel fraction ``p``, and ranks beyond the cores share them:
   ``speed = min(1, c/(L·k)) / ((1-p) + p/k)``, L ranks on a node of c cores.
2. Allreduce, two per layer, ring algorithm over the T ranks of a head group:
   ``t = h·bytes/speed + 2(T-1)·α + 2(T-1)/T·bytes·β``; ``h`` is the local checksum work
   (column sums, hash) that the run's "allreduce" phase also holds. Bytes on the wire:
   ``N·H·elt + 2·H·8`` with ABFT checksums on the float64 wire (NumPy ranks sum blocks
   of rows in float64 after a float32 exchange: ``comm.SplitSum``), ``N·H·elt`` without.

3. Pipeline stages (``--layout best`` weighs them against heads and replicas): P stages of
   ceil(L/P) layers, M micro-batches (GPipe): ``forward = ceil(L/P)·layer·(M+P-1)/M +
   (M+P-2)·(α + b·S·H·elt·β)``; the bubble is (P-1)/(M+P-1) of the stage time (Huang et al.,
   "GPipe", 2019), and a micro-batch of b = ceil(B/(D·M)) sequences crosses each boundary
   as one point-to-point message at the fitted Allreduce α, β (inter-node ones when the
   ranks span nodes). M = ``parallel.microbatches`` (``--set``), else min(rows, 4P).

4. Sequence parallelism (``--set parallel.sequence=Q``, ``--set attention.sequence=
   ulysses|ring|auto``; ``--layout best`` weighs every Q and both algorithms): a rank holds
   ceil(S/Q) tokens of each sequence, so the GEMMs, LayerNorm and the head group's two
   Allreduces work on N/Q tokens. Attention FLOPs of the slowest rank: ring
   ``4·B·ceil(S/Q)·S·W`` (its queries against every key), Ulysses ``4·B·S·S·ceil(h/Q)·d``
   (whole sequences, its share of the T-rank's h heads; needs floor(heads/T) >= Q, as
   ``seqattn.resolve``). Transfers use the fitted Allreduce α, β (inter-node ones when the
   sequence group of T·Q ranks spans nodes), ``h`` per byte hashed (sender and receiver),
   and a tiny agreement Allreduce ``2·ceil(log2 Q)·α`` per transfer (``transfers.agree``).
   - Ulysses (Jacobs et al. 2023, DeepSpeed-Ulysses): two Alltoalls per layer forward,
     Q/K/V to heads (``Q·3·B·ceil(S/Q)·ceil(h/Q)·d·elt`` bytes per rank, blocks padded as
     ``seqattn`` pads them) and the output back (a third of that); each costs
     ``(Q-1)·α + (Q-1)/Q·bytes·β`` (pairwise exchange) ``+ (Q-1)·α`` (the digests' Alltoall)
     ``+ 2·h·bytes + agreement``.
   - Ring (Liu et al. 2023, Ring Attention): Q-1 shifts of K/V, ``2·B·ceil(S/Q)·W·elt``
     bytes each, overlapped with the block attention of the slice at hand (step compute =
     attention / Q): a shift adds ``max(0, α + bytes·β - step) + 2·h·bytes + agreement``.
     The overlap assumes the MPI library progresses Isend/Irecv while the rank computes.
   A rough per-rank memory estimate (``memory``: weights + one layer's activations of the
   local tokens + attention's scores and buffers) goes with every row; ``--memory GIB``
   leaves out the layouts that would not fit.

Inputs: ``mpiattn bench`` files (``/bench/allreduce`` bytes/seconds/ranks, ``/bench/gemm``)
and/or run files at several rank counts. Only h5py and NumPy are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import socket
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..core import costs
from ..core.attention import DEFAULT_BLOCK, PLAIN_MAX_SEQ
from ..core.costs import CHECK_ROWS
from ..errors import ConfigError, InputError
from .report import Loaded, load
from .trainshare import format_share, layout_shares, step_flops

PHASE_AR = "allreduce"
REPLICATED = "norm"  # LayerNorm and residuals: the same work on every rank of a head group
PLAN_KEYS = {
    "model.hidden": int, "model.heads": int, "model.layers": int, "model.ffn": int,
    "input.batch": int, "input.seq_len": int, "dtype": str, "checksum.mode": str,
    "checksum.wire": str, "parallel.microbatches": int, "parallel.sequence": int,
    "attention.sequence": str,
}
SEQUENCE_CHOICES = ("auto", "ulysses", "ring")  # attention.sequence, as seqattn.resolve takes it
DEFAULT_RANKS = [1 << i for i in range(11)]  # 1 .. 1024
MAX_RANKS = 2**20  # the largest rank count (and ranks per node) plan predicts
MAX_RANK_COUNTS = 1024  # rank counts in one --ranks list
MAX_SET_INT = 2**40  # a --set integer (model or input size)


@dataclass
class Job:
    """The predicted job's shape."""

    layers: int
    heads: int
    hidden: int
    ffn: int
    batch: int
    seq_len: int
    dtype: str = "float32"
    checksum: str = "abft"
    wire: str = "float64"
    microbatches: int = 0  # per pipeline; 0: min(rows, 4 x stages)
    sequence: int = 0  # parallel.sequence Q; 0: not fixed (1 for --layout heads, any for best)
    seq_algorithm: str = "auto"  # attention.sequence: "auto" | "ulysses" | "ring"

    @classmethod
    def from_file(cls, rf: Loaded) -> Job:
        m, i, c = rf.model, rf.input, rf.config.get("checksum", {})
        try:
            return cls(int(m["layers"]), int(m["heads"]), int(m["hidden"]), int(m["ffn"]),
                       int(i["batch"]), int(i["seq_len"]), str(rf.config.get("dtype", "float32")),
                       str(c.get("mode", "abft")), str(c.get("wire", "float64")))
        except KeyError as err:
            raise InputError(f"{rf.path}: its config attribute lacks {err}; cannot tell the"
                             " model shape") from None

    @property
    def elt(self) -> int:
        return 8 if self.dtype == "float64" else 4

    def tokens(self, batch: int | None = None) -> int:
        return (self.batch if batch is None else batch) * self.seq_len

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_flops(self, tokens: int) -> float:
        """FLOPs of one layer's GEMMs outside attention (QKV, output projection, MLP) on
        ``tokens`` tokens, all heads: ``2·n·H·3H + 2·n·H·H + 4·n·H·F``."""
        return costs.linear_flops(tokens, self.hidden, self.ffn)

    def attention_flops(self, batch: int, queries: int, keys: int, heads: int) -> float:
        """Scores and weighted sum: ``4·b·queries·keys·heads·head_dim`` FLOPs."""
        return costs.attention_flops(batch, queries, keys, heads, self.head_dim)

    def sharded_flops(self, batch: int | None = None) -> float:
        """Model FLOPs of one layer on ``batch`` sequences, all heads (the sharded part)."""
        b = self.batch if batch is None else batch
        return (self.linear_flops(b * self.seq_len)
                + self.attention_flops(b, self.seq_len, self.seq_len, self.heads))

    def wire_bytes(self, batch: int | None = None, seq: int | None = None) -> float:
        """Bytes one rank contributes to one Allreduce (``seq`` tokens of each sequence:
        a sequence slice's, else all). The float64 wire of NumPy ranks (``comm.SplitSum``)
        moves the partial in its own dtype plus float64 checksum rows; CuPy ranks send it
        all in float64 (not modelled here)."""
        n = (self.batch if batch is None else batch) * (seq or self.seq_len)
        h = self.hidden
        if self.checksum == "abft":
            return float(n * h * self.elt + CHECK_ROWS * h * (8 if self.wire == "float64"
                                                              else self.elt))
        return float(n * h * self.elt)


def job_with(job: Job, overrides: list[str]) -> Job:
    values = asdict(job)
    names = {"model.layers": "layers", "model.heads": "heads", "model.hidden": "hidden",
             "model.ffn": "ffn", "input.batch": "batch", "input.seq_len": "seq_len",
             "dtype": "dtype", "checksum.mode": "checksum", "checksum.wire": "wire",
             "parallel.microbatches": "microbatches", "parallel.sequence": "sequence",
             "attention.sequence": "seq_algorithm"}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in PLAN_KEYS:
            raise ConfigError(f"--set {item!r}: plan understands {', '.join(PLAN_KEYS)}"
                              " as KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        if not isinstance(value, PLAN_KEYS[key]) or isinstance(value, bool) or (
                isinstance(value, int) and not 1 <= value <= MAX_SET_INT):
            limit = " at most 2**40" if PLAN_KEYS[key] is int else ""
            raise ConfigError(f"--set {key} needs a positive {PLAN_KEYS[key].__name__}{limit},"
                              f" got {raw!r}")
        values[names[key]] = value
    out = Job(**values)
    if out.seq_algorithm not in SEQUENCE_CHOICES:
        raise ConfigError(f"--set attention.sequence = {out.seq_algorithm!r}: give one of"
                          f" {', '.join(SEQUENCE_CHOICES)}")
    if out.sequence > out.seq_len:
        raise ConfigError(f"--set parallel.sequence = {out.sequence} ranks for sequences of"
                          f" {out.seq_len} tokens: each rank needs a token (parallel.sequence"
                          f" <= {out.seq_len})")
    if out.hidden % out.heads:
        raise ConfigError(f"model.hidden = {out.hidden} is not a multiple of model.heads ="
                          f" {out.heads}")
    return out


# --- the machine model ----------------------------------------------------------------------

def threads_for(cores: float, local: int) -> int:
    """BLAS threads per rank, the runner's rule (``costs.blas_threads``)."""
    return costs.blas_threads(cores, local)


def speed(cores: float, local: int, threads: int, p: float) -> float:
    """Core-equivalents of one rank: Amdahl over its threads, time-shared past the cores."""
    share = min(1.0, cores / (local * threads))
    return share / ((1.0 - p) + p / threads)


def ring(ranks: int, nbytes: float, alpha: float, beta: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes * beta


def alltoall(ranks: int, nbytes: float, alpha: float, beta: float) -> float:
    """Pairwise-exchange Alltoall of ``nbytes`` per rank (all Q blocks, its own included):
    ``(Q-1)·α + (Q-1)/Q·bytes·β``."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) * alpha + (ranks - 1) / ranks * nbytes * beta


def agreement(ranks: int, alpha: float) -> float:
    """One tiny Allreduce that makes a transfer's verdict collective (``transfers.agree``):
    latency only, ``2·ceil(log2 Q)·α`` (recursive doubling, there and back)."""
    return 2 * math.ceil(math.log2(ranks)) * alpha if ranks > 1 else 0.0


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of unknowns (every active set is tried)."""
    k = a.shape[1]
    best, best_res = np.zeros(k), float(np.sum(y ** 2))
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sub = a[:, cols]
            if np.linalg.matrix_rank(sub) < r:
                continue
            x, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if np.any(x < 0):
                continue
            res = float(np.sum((sub @ x - y) ** 2))
            if res < best_res * (1 - 1e-9):
                best = np.zeros(k)
                best[list(cols)] = x
                best_res = res
    return best


@dataclass
class Measured:
    """One run file reduced to what the fit uses (per layer, seconds)."""

    path: str
    job: Job
    world: int
    tensor: int
    replicas: int
    heads: list[int]  # per head rank
    local: int  # ranks on the busiest host
    threads: int
    compute: np.ndarray  # per rank, per layer
    replicated: np.ndarray  # the part of compute that does not shrink with T
    allreduce: np.ndarray  # per rank, per layer (both Allreduces)
    forward: float  # max over ranks of /timings/forward, seconds
    layers: int
    sharded_phases: list[str] = field(default_factory=list)

    @property
    def layer(self) -> float:
        """Steady-state layer time: the slowest rank's."""
        return float(np.max(self.compute + self.allreduce))

    @property
    def once(self) -> float:
        """Forward time outside the steady layers: first-call warm-up, embeddings, pooling."""
        return max(0.0, self.forward - self.layers * self.layer)


@dataclass
class Fit:
    cores: float  # of the machine the inputs were measured on
    rate: float  # R, FLOP/s of one dedicated core
    g: float  # s per (token x hidden) of replicated work, one core
    p: float  # parallel fraction of a rank's compute over its BLAS threads
    h: float  # s per wire byte of local checksum work, one core
    alpha: float
    beta: float
    once: float = 0.0  # s per forward outside the steady layers, on one core (median)
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def measured_cores(files: list[Loaded], override: float | None) -> tuple[float, str]:
    if override:
        return float(override), "--measured-cores"
    here = socket.gethostname()
    if any(rf.hosts and all(h == here for h in rf.hosts) for rf in files):
        return float(len(os.sched_getaffinity(0))), f"this host ({here}), os.sched_getaffinity"
    found = [int(rf.attrs.get("blas_threads_per_rank", 0) or 0) * max(Counter(rf.hosts).values())
             for rf in files if rf.hosts and int(rf.attrs.get("blas_threads_per_rank", 0) or 0) > 1]
    if found:
        return float(max(found)), "blas_threads_per_rank x ranks per host in the files"
    return float(os.cpu_count() or 1), "os.cpu_count() here (files do not tell)"


def sequence_of(rf: Loaded) -> int:
    """``parallel.sequence`` of a file's config (1 when absent)."""
    par = rf.config.get("parallel", {})
    return int(par.get("sequence", 1) or 1) if isinstance(par, dict) else 1


def reduce_run(rf: Loaded, cores: float) -> Measured | None:
    """A run file's steady-state layer, or a bench file's per-phase layer (after warm-up).
    None for what the per-layer model cannot take (sequence-parallel runs among them)."""
    if sequence_of(rf) > 1:  # its phases hold Alltoalls / ring shifts the fit does not model
        return None
    phases = rf.phases
    if rf.seconds is not None and rf.forward is not None:
        layers = rf.seconds.shape[1]
        # steady state: the median layer, without layer 0 (its first calls pay for lazy
        # imports and first-touch allocations; that one-off cost is kept apart as `once`)
        steady = rf.seconds[:, 1:] if layers > 1 else rf.seconds
        per = np.median(steady, axis=1)  # (rank, phase) per layer
        forward = float(rf.forward.max())
    elif "pipeline" in rf.bench:  # a stage's whole forward, not one layer: not fitted
        return None
    elif "phase_seconds" in rf.bench:
        per, phases, layers = rf.bench["phase_seconds"], rf.bench["phases"], 1
        forward = float(per.sum(axis=1).max())
    else:
        return None
    if PHASE_AR not in phases:
        return None
    job = Job.from_file(rf)
    rf = dataclasses.replace(rf, phases=phases)
    ar = per[:, rf.phases.index(PHASE_AR)]
    local = max(Counter(rf.hosts).values()) if rf.hosts else rf.world_size
    threads = int(rf.attrs.get("blas_threads_per_rank", 0) or 0) or threads_for(cores, local)
    heads = rf.head_partition or [job.heads]
    rep = per[:, rf.phases.index(REPLICATED)] if REPLICATED in rf.phases else np.zeros(len(ar))
    return Measured(rf.path, job, rf.world_size, rf.tensor_parallel or len(heads),
                    rf.data_parallel or 1, heads, local, threads, per.sum(axis=1) - ar, rep, ar,
                    forward, layers,
                    [n for n in rf.phases if n not in (PHASE_AR, REPLICATED)])


def rank_flops(job: Job, heads: int, batch: int) -> float:
    return job.sharded_flops(batch) * heads / job.heads


def fastest(files: list[Loaded]) -> list[Loaded]:
    """One run per layout and shape: the fastest forward (interference only slows a run).
    Files without timings (bench files) all stay."""
    best: dict[tuple, Loaded] = {}
    out = []
    for rf in files:
        if rf.forward_s is None or rf.seconds is None:
            out.append(rf)
            continue
        key = (rf.world_size, rf.tensor_parallel, rf.data_parallel,
               repr(rf.model), repr(rf.input), rf.config.get("dtype"))
        if key not in best or rf.forward_s < best[key].forward_s:  # type: ignore[operator]
            best[key] = rf
    return out + list(best.values())


def fit(files: list[Loaded], cores_override: float | None = None) -> Fit:
    streamed = [rf.path for rf in files if rf.command == "run" and "lines" in rf.attrs]
    if streamed:
        raise InputError(f"'{streamed[0]}' is a streamed text run: its micro-batches vary in"
                         " length, so it cannot calibrate a per-layer model; give mpiattn"
                         " bench files or runs of seeded input")
    cores, cores_from = measured_cores(files, cores_override)
    files = fastest(files)
    runs = [m for m in (reduce_run(rf, cores) for rf in files) if m is not None]
    benches = [rf for rf in files if rf.bench]
    notes: list[str] = []
    sources = {"cores": f"{cores:g} ({cores_from})"}
    gpu = [rf for rf in files if rf.attrs.get("backend") == "cupy"]
    if gpu:  # what a GPU input ran on, how it moved data and how it was timed
        devices = sorted({str(d) for rf in gpu for d in rf.ranks.get("device", [])})
        modes = sorted({str(rf.attrs.get("cuda_aware", "?")) for rf in gpu})
        timing = sorted({str(rf.attrs.get("timing", "unrecorded")) for rf in gpu})
        notes.append(f"{len(gpu)} input(s) ran on CuPy devices ({', '.join(devices[:3])});"
                     f" CUDA-aware MPI: {', '.join(modes)}; times from {', '.join(timing)}")
    skipped = [rf.path for rf in files if sequence_of(rf) > 1]
    if skipped:
        notes.append(f"{len(skipped)} sequence-parallel file(s) not fitted (their phases mix"
                     f" Alltoalls and ring shifts into attention): {', '.join(skipped[:3])}")

    # 1. compute. The "norm" phase is the replicated elementwise work (single-threaded
    # NumPy): g = its time x share / (N·H). The other phases are the sharded FLOPs: for
    # each p on a grid R is the geometric-mean fit of F / (t·speed); the best p is kept.
    rate = g = 0.0
    p = 1.0
    if runs:
        flops, ts, spec, rep = [], [], [], []
        for m in runs:
            rows_per_replica = math.ceil(m.job.batch / m.replicas)
            elems = m.job.tokens(rows_per_replica) * m.job.hidden
            for r in range(len(m.compute)):
                heads = m.heads[r % len(m.heads)]
                flops.append(rank_flops(m.job, heads, rows_per_replica))
                ts.append(m.compute[r] - m.replicated[r])
                spec.append((m.local, m.threads))
                rep.append(m.replicated[r] * speed(cores, m.local, m.threads, 0.0) / elems)
        fl, t = np.array(flops), np.maximum(np.array(ts), 1e-12)
        g = float(np.median(rep))
        threaded = any(k > 1 for _, k in spec)
        best = None
        for pp in np.linspace(0.0, 1.0, 101) if threaded else [1.0]:
            sp = np.array([speed(cores, loc, k, pp) for loc, k in spec])
            logs = np.log(fl / (t * sp))
            err = float(np.var(logs))
            if best is None or err < best[0] - 1e-12:
                best = (err, pp, float(np.exp(logs.mean())))
        assert best is not None
        _, p, rate = best
        sources["compute"] = (f"{len(runs)} file(s) with phase timings: sharded phases"
                              f" {', '.join(sorted(set(runs[0].sharded_phases)))}; replicated"
                              f" phase {REPLICATED}")
        if not threaded:
            notes.append("no input ran more than one BLAS thread per rank: thread scaling"
                         " assumed ideal (p = 1)")
    elif any("gemm_flops_per_second" in b.bench for b in benches):
        rates = []
        for b in benches:  # no phase timings anywhere: the GEMM peak is all there is
            if "gemm_flops_per_second" in b.bench:
                local = max(Counter(b.hosts).values()) if b.hosts else b.world_size
                k = int(b.attrs.get("blas_threads_per_rank", 0) or 0) or threads_for(cores, local)
                rates.append(float(np.median(b.bench["gemm_flops_per_second"]))
                             / speed(cores, local, k, 1.0))
        rate = max(rates)
        sources["compute"] = "bench GEMM rate (peak at the layer's GEMM shapes)"
        notes.append("compute rate is the GEMM peak: attention softmax, GELU and LayerNorm run"
                     " slower, so compute times are optimistic; thread scaling assumed ideal")
    else:
        raise InputError("no compute timings: give run files (with /timings/seconds) or"
                         " bench files (with /bench/gemm)")

    # 2. Allreduce: h (local checksum work), alpha, beta
    arows, ays = [], []
    for m in runs:
        rows_per_replica = math.ceil(m.job.batch / m.replicas)
        nbytes = m.job.wire_bytes(rows_per_replica)
        sp = speed(cores, m.local, m.threads, p)
        # uneven compute shows up as waiting inside the Allreduce: take it out
        wait = float(m.compute.max() - m.compute.mean())
        t = max(float(m.allreduce.mean()) - wait, 1e-9) / 2  # per Allreduce
        arows.append((nbytes / sp, 2 * (m.tensor - 1), 2 * (m.tensor - 1) / m.tensor * nbytes))
        ays.append(t)
    for b in benches:
        ar = b.bench.get("allreduce")
        if ar is None:
            continue
        for nb, t, n in zip(ar["bytes"], ar["seconds"], ar["ranks"], strict=True):
            if n > 1:
                arows.append((0.0, 2 * (n - 1), 2 * (n - 1) / n * nb))
                ays.append(float(t))
    h = alpha = beta = 0.0
    if arows:
        a, y = np.array(arows, float), np.array(ays, float)
        scale = np.where(a.max(axis=0) > 0, a.max(axis=0), 1.0)
        x = nnls(a / scale / y[:, None], np.ones(len(y))) / scale
        h, alpha, beta = (float(v) for v in x)
    multi = [r for r in arows if r[1] > 0]
    if not multi:
        notes.append("no input ran an Allreduce over more than one rank: alpha = beta = 0"
                     " unless --nodes-alpha/--nodes-beta are given")
    elif len({(r[1], round(r[2])) for r in multi}) < 2:
        notes.append("Allreduce measured at one rank count and one size only: latency and"
                     " bandwidth are not separable (their sum fits that one point)")
    elif len({round(r[2] * (r[1] / 2 + 1) / r[1]) for r in multi}) < 2:  # bytes
        notes.append("Allreduce measured at one message size only: the split between"
                     " latency (alpha) and bandwidth (beta) is weakly determined, and on an"
                     " oversubscribed node both absorb scheduling delays; a bench file's"
                     " size sweep (mpiattn bench) pins them down")
    sources["allreduce"] = (f"{len(multi)} multi-rank point(s) from "
                            + ("bench /bench/allreduce" if any(b.bench.get("allreduce")
                                                                for b in benches) else "run files"))
    # the one-off is single-threaded work (imports, first touches): it scales with the share
    whole = [m for m in runs if m.layers > 1]  # run files: a whole forward
    once = float(np.median([m.once * speed(cores, m.local, m.threads, 0.0) for m in whole])
                 ) if whole else 0.0
    return Fit(cores, rate, g, p, h, alpha, beta, once, sources, notes)


# --- prediction -------------------------------------------------------------------------------

@dataclass
class Target:
    cores: float  # per node
    ranks_per_node: int | None  # None: all ranks on one node
    alpha_inter: float
    beta_inter: float


def divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)})


def layouts(job: Job, n: int) -> list[tuple[int, int]]:
    """(data, tensor) splits of n ranks the runner accepts: T <= heads, D <= batch."""
    return [(n // t, t) for t in divisors(n) if t <= job.heads and n // t <= job.batch]


def pipeline_layouts(job: Job, n: int) -> list[tuple[int, int, int]]:
    """(data, tensor, pipeline) splits of n ranks: P <= layers stages, each a (D, T) split
    of n/P ranks (``layouts``)."""
    return [(d, t, stages) for stages in range(1, min(n, job.layers) + 1) if n % stages == 0
            for d, t in layouts(job, n // stages)]


def sequence_parts(job: Job, n: int) -> list[int]:
    """Sequence sizes Q a layout of n ranks may use: ``job.sequence`` when it is fixed (and
    divides n), else every divisor of n up to the tokens of a sequence."""
    if job.sequence:
        return [job.sequence] if n % job.sequence == 0 else []
    return [q for q in divisors(n) if q <= job.seq_len]


def sequence_algorithms(job: Job, tensor: int, parts: int, weigh: bool) -> list[str]:
    """The attention.sequence algorithms a layout with T head ranks and Q sequence ranks
    can run: [""] at Q = 1; Ulysses only when the fewest heads of a head rank (floor(h/T))
    are >= Q (``seqattn.resolve``). "auto" is the runner's rule (Ulysses when it fits, else
    the ring), or with ``weigh`` (``--layout best``) both, to be timed against each other."""
    if parts == 1:
        return [""]
    fits = job.heads // tensor >= parts
    if job.seq_algorithm == "auto":
        if weigh:
            return ["ulysses", "ring"] if fits else ["ring"]
        return ["ulysses" if fits else "ring"]
    return [job.seq_algorithm] if job.seq_algorithm == "ring" or fits else []


def grid_layouts(job: Job, n: int, best: bool) -> list[tuple[int, int, int, int, str]]:
    """(data, tensor, pipeline, sequence, algorithm) layouts of n ranks: with ``best`` every
    D x T x P x Q split (``pipeline_layouts`` of n/Q, ``sequence_parts``), else no stages
    and the sequence size fixed by ``job.sequence`` (1 when unset)."""
    if best:
        parts = sequence_parts(job, n)
    else:
        parts = [job.sequence or 1] if n % (job.sequence or 1) == 0 else []
    out = []
    for q in parts:
        splits = (pipeline_layouts(job, n // q) if best
                  else [(d, t, 1) for d, t in layouts(job, n // q)])
        for d, t, stages in splits:
            out += [(d, t, stages, q, a) for a in sequence_algorithms(job, t, q, best)]
    return out


def bubble_fraction(stages: int, micro: int) -> float:
    """GPipe's idle fraction of a pipeline, (P-1)/(M+P-1) (Huang et al., 2019)."""
    return (stages - 1) / (micro + stages - 1)


def micro_count(job: Job, rows: int, stages: int) -> int:
    """Micro-batches of a replica's ``rows`` sequences: ``job.microbatches`` (at most one
    per sequence), else min(rows, 4 x stages) (GPipe: M >= 4P hides the bubble)."""
    if stages == 1:
        return 1
    return max(1, min(rows, job.microbatches or 4 * stages))


def best_axis(r: dict[str, Any]) -> str:
    """The axis a layout mostly splits on: layers (pipeline), heads (tensor), the tokens of
    each sequence (sequence) or the batch (data), by the largest factor; "none" on one
    rank."""
    factors = {"layers": r.get("pipeline", 1), "heads": r["tensor"],
               "sequence": r.get("sequence", 1), "batch": r["data"]}
    top = max(factors.values())
    return "none" if top == 1 else next(k for k, v in factors.items() if v == top)


def attention_flops(job: Job, rows: int, heads: int, parts: int, algorithm: str) -> float:
    """Attention FLOPs per layer of the slowest rank of a head rank with ``heads`` heads
    and ``rows`` sequences, split over ``parts`` sequence ranks: Q = 1 all queries against
    all keys; the ring ceil(S/Q) queries against all S keys, every head (4·B·ceil(S/Q)·S·W);
    Ulysses every query against every key of ceil(h/Q) heads (4·B·S·S·ceil(h/Q)·d)."""
    s = job.seq_len
    if algorithm == "ring":
        return job.attention_flops(rows, math.ceil(s / parts), s, heads)
    if algorithm == "ulysses":
        return job.attention_flops(rows, s, s, math.ceil(heads / parts))
    return job.attention_flops(rows, s, s, heads)


def ulysses_bytes(job: Job, rows: int, heads: int, parts: int) -> tuple[float, float]:
    """Bytes one rank hands to each of the forward's two Alltoalls (all Q blocks, its own
    included; Q-1 of them leave it): Q, K, V of its tokens to head shares
    ``Q·3·B·ceil(S/Q)·ceil(h/Q)·d·elt``, the attention output back ``Q·B·ceil(S/Q)·
    ceil(h/Q)·d·elt``. The blocks are padded to the widest slice and head share
    (``seqattn``), so uneven splits move a little more than 3·B·(S/Q)·W·elt."""
    block = rows * math.ceil(job.seq_len / parts) * math.ceil(heads / parts) * job.head_dim
    return float(parts * 3 * block * job.elt), float(parts * block * job.elt)


def ring_bytes(job: Job, rows: int, heads: int, parts: int) -> float:
    """Bytes of one ring shift: the K/V of a (padded) sequence slice, 2·B·ceil(S/Q)·W·elt."""
    return float(rows * math.ceil(job.seq_len / parts) * 2 * heads * job.head_dim * job.elt)


def memory(job: Job, rows: int, heads: int, tensor: int, parts: int, algorithm: str,
           stages: int = 1) -> tuple[float, float]:
    """(weights, activations) bytes per rank, a rough forward (inference) model:
    weights ceil(L/P)·(4·H·W + 2·H·ceil(F/T))·elt; activations of one layer at a time for
    the n = B·ceil(S/Q) local tokens: n·(2H + 4W + ceil(F/T))·elt (input and output states,
    Q/K/V, attention output, MLP intermediate) plus the Allreduce buffer, plus attention's:
    scores B·h'·S·S·elt (plain, S <= 2048, every head at once) or B·h'·b²·elt (blocked,
    b = min(512, S)), h' = ceil(h/Q) heads over the whole sequence for Ulysses with its
    whole-sequence Q/K/V/output (4·B·S·h'·d·elt) and the QKV Alltoall's send and receive
    blocks; for the ring three K/V slices (own, at hand, in flight), the output and scaled
    queries (2·n·W·elt) and B·h·b²·elt scores, b = min(512, ceil(S/Q))."""
    elt, d, hid, s = job.elt, job.head_dim, job.hidden, job.seq_len
    local = math.ceil(s / parts)
    n, w, ffn = rows * local, heads * d, math.ceil(job.ffn / tensor)
    weights = math.ceil(job.layers / stages) * (4 * hid * w + 2 * hid * ffn) * elt
    acts = n * (2 * hid + 4 * w + ffn) * elt + job.wire_bytes(rows, local)
    if algorithm == "ring":
        blk = min(DEFAULT_BLOCK, local)
        acts += 3 * ring_bytes(job, rows, heads, parts) + 2 * n * w * elt
        acts += rows * heads * blk * blk * elt
    else:
        h_att = math.ceil(heads / parts) if algorithm == "ulysses" else heads
        blk = s if s <= PLAIN_MAX_SEQ else min(DEFAULT_BLOCK, s)
        acts += rows * h_att * (s * s if s <= PLAIN_MAX_SEQ else blk * blk) * elt
        if algorithm == "ulysses":
            acts += 4 * rows * s * h_att * d * elt + 2 * ulysses_bytes(job, rows, heads, parts)[0]
    return float(weights), float(acts)


def predict_layout(job: Job, f: Fit, tgt: Target, data: int, tensor: int,
                   stages: int = 1, sequence: int = 1, algorithm: str = "") -> dict[str, Any]:
    """Predicted seconds of one layout: ``layer_s`` per model layer (a pipeline's: its
    forward less the one-off part over the layers), ``forward_s``; with ``stages`` > 1 the
    bubble and the point-to-point seconds per forward (module docstring, 3.); with
    ``sequence`` = Q > 1 ranks splitting the tokens, ``algorithm`` "ulysses" or "ring"
    (default: the runner's choice, ``seqattn.resolve``) and its communication ``seq_s``
    (module docstring, 4.)."""
    from ..core.seqattn import resolve

    q = sequence
    n = data * tensor * stages * q
    rpn = tgt.ranks_per_node or n
    local_ranks = min(n, rpn)
    k = threads_for(tgt.cores, local_ranks)
    sp = speed(tgt.cores, local_ranks, k, f.p)
    rows = math.ceil(job.batch / data)
    heads = math.ceil(job.heads / tensor)
    local = math.ceil(job.seq_len / q)
    algo = "" if q == 1 else (algorithm or resolve(job.seq_algorithm, job.heads // tensor, q))
    share = speed(tgt.cores, local_ranks, k, 0.0)  # single-threaded elementwise work
    att = attention_flops(job, rows, heads, q, algo)
    compute = ((job.linear_flops(rows * local) * heads / job.heads + att) / f.rate / sp
               + f.g * rows * local * job.hidden / share)
    nbytes = job.wire_bytes(rows, local)
    spans = tgt.ranks_per_node is not None and (tensor > rpn or rpn % tensor != 0)
    a, b = (tgt.alpha_inter, tgt.beta_inter) if spans else (f.alpha, f.beta)
    allreduce = 2 * (f.h * nbytes / sp + ring(tensor, nbytes, a, b))
    seq: dict[str, Any] = {"sequence": q, "algorithm": algo or "none", "local_tokens": local,
                           "attention_flops": att, "seq_s": 0.0, "seq_inter_node": False}
    if q > 1:
        group = tensor * q  # the sequence group: every T-th rank of a run of T·Q
        seq["seq_inter_node"] = across = (tgt.ranks_per_node is not None
                                          and (group > rpn or rpn % group != 0))
        a, b = (tgt.alpha_inter, tgt.beta_inter) if across else (f.alpha, f.beta)
        if algo == "ulysses":
            moved = ulysses_bytes(job, rows, heads, q)
            # per Alltoall: the blocks hashed when sent and when received, the payload
            # exchange, the digests' own Alltoall (latency), the agreement
            seq["seq_s"] = sum(2 * f.h * x / sp + alltoall(q, x, a, b) + (q - 1) * a
                               + agreement(q, a) for x in moved)
            seq["alltoall_bytes"] = list(moved)
            seq["alltoall_sent_bytes"] = (q - 1) / q * sum(moved)
        else:
            kv = ring_bytes(job, rows, heads, q)
            step = att / q / f.rate / sp  # the block attention of one slice
            transfer = a + kv * b
            # Q-1 shifts, each overlapped with a step: only what the transfer takes beyond
            # the step shows, plus the digests (sent, received) and the agreement
            seq["seq_s"] = (q - 1) * (max(0.0, transfer - step) + 2 * f.h * kv / sp
                                      + agreement(q, a))
            seq.update(ring_shifts=q - 1, ring_bytes=kv, ring_step_s=step,
                       ring_transfer_s=transfer,
                       ring_hidden_fraction=min(step, transfer) / transfer if transfer else 1.0)
    weights, acts = memory(job, rows, heads, tensor, q, algo, stages)
    layer = compute + allreduce + seq["seq_s"]
    micro = micro_count(job, rows, stages)
    per_stage = math.ceil(job.layers / stages)
    p2p = 0.0
    if stages > 1:
        message = math.ceil(rows / micro) * local * job.hidden * job.elt
        across = tgt.ranks_per_node is not None and n > rpn
        a, b = (tgt.alpha_inter, tgt.beta_inter) if across else (f.alpha, f.beta)
        p2p = (micro + stages - 2) * (a + message * b)
    layers_s = per_stage * layer * (micro + stages - 1) / micro + p2p
    return {"ranks": n, "data": data, "tensor": tensor, "pipeline": stages,
            "microbatches": micro, "nodes": math.ceil(n / rpn),
            "heads_per_rank": heads, "threads": k, "speed": sp, "wire_bytes": nbytes,
            "inter_node": spans, "compute_s": compute, "allreduce_s": allreduce, **seq,
            "weights_bytes": weights, "activation_bytes": acts, "memory_bytes": weights + acts,
            "bubble_fraction": bubble_fraction(stages, micro), "p2p_s": p2p,
            "layer_s": layers_s / job.layers, "forward_s": layers_s + f.once / share}


def predict(job: Job, f: Fit, tgt: Target, n: int, layout: str = "heads",
            memory_limit: float | None = None) -> dict[str, Any] | None:
    """The prediction at n ranks: heads first (the most head ranks that fit, as
    ``parallel.tensor = 0`` does up to model.heads; ``parallel.sequence`` fixed by the job,
    1 when unset), or the fastest split of data x pipeline x sequence x heads ("best"),
    with ``axis`` the one it mostly splits (``best_axis``). ``memory_limit``: bytes per
    rank a layout's estimate must fit in (``memory``); None when no layout is left."""
    best = layout == "best"
    options = [predict_layout(job, f, tgt, d, t, s, q, a)
               for d, t, s, q, a in grid_layouts(job, n, best)]
    if memory_limit is not None:
        options = [r for r in options if r["memory_bytes"] <= memory_limit]
    if not options:
        return None
    if best:
        choice = min(options, key=lambda r: r["forward_s"])
        choice["axis"] = best_axis(choice)
        return choice
    return max(options, key=lambda r: r["tensor"])


def impossible(job: Job, n: int, layout: str, memory_limit: float | None) -> str:
    """Why no layout of n ranks is predicted (``predict`` returned None)."""
    if memory_limit is not None and grid_layouts(job, n, layout == "best"):
        return (f"every layout needs more than --memory {memory_limit / 2**30:g} GiB per rank"
                " (estimate: the memory column)")
    text = (f"needs ranks <= heads x batch = {job.heads * job.batch} with a split D x T,"
            f" T <= {job.heads}, D <= {job.batch}")
    if layout == "best":
        text += f" (x P <= {job.layers} stages" + (
            f" x Q <= {job.seq_len} sequence ranks)" if not job.sequence else ")")
    if job.sequence:
        text += f" x parallel.sequence = {job.sequence}"
        if job.seq_algorithm == "ulysses":
            text += " (Ulysses: heads per head rank >= Q, else attention.sequence = ring)"
    return text


def table(job: Job, f: Fit, tgt: Target, ranks: list[int], layout: str = "heads",
          memory_limit: float | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = None
    for n in ranks:
        r = predict(job, f, tgt, n, layout, memory_limit)
        if r is None:
            rows.append({"ranks": n, "impossible": impossible(job, n, layout, memory_limit)})
            continue
        if base is None:
            base = r
        r["speedup"] = base["layer_s"] / r["layer_s"]
        r["efficiency"] = r["speedup"] * base["ranks"] / n
        rows.append(r)
    return rows


def check(files: list[Loaded], f: Fit) -> list[dict[str, Any]]:
    """The fit against each input run: predicted layer time vs measured, same layout."""
    out = []
    for rf in files:
        m = reduce_run(rf, f.cores)
        if m is None:
            continue
        tgt = Target(f.cores, None, f.alpha, f.beta)
        r = predict_layout(m.job, f, tgt, m.replicas, m.tensor)
        row = {"path": m.path, "ranks": m.world, "measured_layer_s": m.layer,
               "predicted_layer_s": r["layer_s"], "layer_error": r["layer_s"] / m.layer - 1}
        if m.layers > 1:  # a bench file times one layer, not a forward
            row.update(measured_forward_s=m.forward, predicted_forward_s=r["forward_s"],
                       forward_error=r["forward_s"] / m.forward - 1)
        out.append(row)
    return out


def assumptions(f: Fit, tgt: Target, layout: str = "heads", job: Job | None = None,
                memory_limit: float | None = None) -> list[str]:
    where = (f"{tgt.ranks_per_node} ranks per node, {tgt.cores:g} cores per node"
             if tgt.ranks_per_node else f"all ranks on one node of {tgt.cores:g} cores")
    out = [
        f"placement: {where}; BLAS threads per rank = cores // ranks on the node (runner's"
        " rule); ranks beyond the cores time-share them (a rank gets min(1, c/n) of a core)",
        ("layout: for each N the data x pipeline x sequence x head split (heads <="
         " model.heads, replicas <= input.batch, stages <= model.layers, sequence ranks <="
         " input.seq_len, or parallel.sequence when set) with the shortest predicted forward;"
         " axis = the largest factor (layers, heads, sequence or batch)" if layout == "best"
         else
         "layout: for each N the most head ranks T <= model.heads that divide N; the rest"
         " data-parallel replicas (<= input.batch); --layout best picks the fastest split"),
        "compute scales with the rank's heads (ceil(heads/T)) and sequences (ceil(B/D)); the"
        " replicated LayerNorm/residual work does not shrink with T",
        "Allreduce: ring, 2(T-1) alpha + 2(T-1)/T bytes beta, 2 per layer; a head group that"
        " spans nodes runs at the inter-node alpha/beta for every step",
        "layer = the steady state (median over layers 1..L-1); forward = layers x layer +"
        f" a one-off {f.once * 1e3:.1f} ms per dedicated core (first-call warm-up, embeddings,"
        " pooling: the median of the inputs; it does not shrink with more ranks)",
        "no overlap of compute and the Allreduces (parallel.overlap is not modelled; the"
        " ring's K/V shifts are the one overlap modelled); the"
        " measured machine's per-core rates at every scale",
    ] + ([
        "pipeline: ceil(L/P) layers per stage, M micro-batches (parallel.microbatches, else"
        " min(rows, 4P)); stage time x (M+P-1)/M (bubble (P-1)/(M+P-1), GPipe) plus"
        " (M+P-2) point-to-point messages of ceil(rows/M) x S x H x itemsize bytes at the"
        " Allreduce alpha + bytes beta; a micro-batch's layer costs 1/M of the batch's"
    ] if layout == "best" else [])
    if layout == "best" or (job is not None and job.sequence > 1):
        out += [
            "sequence (parallel.sequence = Q): a rank holds ceil(S/Q) tokens of each sequence;"
            " QKV, output projection, MLP, LayerNorm and the head group's Allreduces scale"
            " with them; attention FLOPs of the slowest rank: ring 4·B·ceil(S/Q)·S·W, Ulysses"
            " 4·B·S²·ceil(h/Q)·d (Ulysses needs floor(heads/T) >= Q; attention.sequence ="
            " auto runs Ulysses when it fits" + (", --layout best times both)" if layout
                                                 == "best" else ")"),
            "sequence transfers at the fitted Allreduce alpha, beta (the inter-node ones when"
            " the sequence group spans nodes), checksum work h per byte hashed, a tiny"
            " Allreduce agreement of 2·ceil(log2 Q)·alpha per transfer. Ulysses: two"
            " Alltoalls per layer (Q/K/V 3·B·ceil(S/Q)·W·elt, output B·ceil(S/Q)·W·elt, head"
            " shares padded to ceil(h/Q)), each (Q-1)·alpha + (Q-1)/Q·bytes·beta (pairwise"
            " exchange) + (Q-1)·alpha for the digests + 2·bytes·h. Ring: Q-1 shifts of K/V"
            " (2·B·ceil(S/Q)·W·elt), each overlapped with one slice's block attention: a step"
            " costs max(step compute, alpha + bytes·beta) + 2·bytes·h + agreement; the overlap"
            " assumes the MPI library moves the Isend/Irecv while the rank computes (async"
            " progress); without it the whole transfer adds",
            "memory (per rank, rough, forward): weights of its layers and heads + one layer's"
            " activations of its local tokens (states, Q/K/V, MLP intermediate, Allreduce"
            " buffer) + attention's scores (plain S <= 2048: every head's S x S at once;"
            " blocked/ring: 512 x 512 blocks), Ulysses' whole-sequence Q/K/V of its head share"
            " and Alltoall buffers, the ring's three K/V slices" + (
                f"; layouts above --memory {memory_limit / 2**30:g} GiB are left out"
                if memory_limit else ""),
        ]
    return out + f.notes


def parse_ranks(text: str) -> list[int]:
    """The rank counts of ``--ranks`` (the defaults when empty); one-line ConfigError for
    anything but 1 to ``MAX_RANK_COUNTS`` integers in 1 .. ``MAX_RANKS``."""
    if not text.strip():
        return list(DEFAULT_RANKS)
    items = [x for x in text.split(",") if x.strip()]
    shown = text if len(text) <= 40 else text[:37] + "..."
    if len(items) > MAX_RANK_COUNTS:
        raise ConfigError(f"--ranks lists {len(items)} rank counts; give at most"
                          f" {MAX_RANK_COUNTS}")
    try:  # more than 20 digits is beyond any cap: refused without converting it
        ranks = sorted({int(x) if len(x.strip()) <= 20 else MAX_RANKS + 1 for x in items})
    except ValueError:
        raise ConfigError(f"--ranks expects comma-separated integers, got '{shown}'") from None
    if not ranks or ranks[0] < 1 or ranks[-1] > MAX_RANKS:
        raise ConfigError(f"--ranks needs rank counts from 1 to {MAX_RANKS} (2**20), got"
                          f" '{shown}'")
    return ranks


def check_options(args: argparse.Namespace) -> None:
    """Every numeric option of ``plan``, before any file is read: cores finite and > 0,
    ranks per node 1 .. ``MAX_RANKS``, inter-node alpha and beta finite and >= 0; one-line
    ConfigError naming the option otherwise."""
    for option, name in (("--cores", "cores"), ("--measured-cores", "measured_cores")):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{option} must be a finite number of cores > 0, got {value!r}:"
                              " give the cores per node, e.g. 64")
    for option, name, unit, example in (("--nodes-alpha", "nodes_alpha", "seconds", "5e-6"),
                                        ("--nodes-beta", "nodes_beta", "seconds per byte",
                                         "1e-10")):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{option} must be a finite number of {unit} >= 0, got"
                              f" {value!r}: e.g. {option} {example}")
    gpu = getattr(args, "gpu_speedup", None)
    if gpu is not None and not (math.isfinite(gpu) and gpu > 0):
        raise ConfigError(f"--gpu-speedup must be a finite factor > 0, got {gpu!r}: how many"
                          " times one GPU rank computes as fast as one measured CPU rank,"
                          " e.g. 40")
    gib = getattr(args, "memory", None)
    if gib is not None and not (math.isfinite(gib) and gib > 0):
        raise ConfigError(f"--memory must be a finite number of GiB per rank > 0, got {gib!r}:"
                          " e.g. --memory 1.5")
    rpn = getattr(args, "ranks_per_node", None)
    if rpn is not None and not 1 <= rpn <= MAX_RANKS:
        raise ConfigError(f"--ranks-per-node must be from 1 to {MAX_RANKS} (2**20), got {rpn}")


def plan_command(args: argparse.Namespace) -> int:
    check_options(args)
    ranks = parse_ranks(args.ranks)
    from .phasemodel import is_text_run, is_training, plan_sections

    gpu = getattr(args, "gpu_speedup", None) or 0.0
    sections, phase_rows = plan_sections(list(args.files), ranks, gpu)
    if all(is_text_run(p) or is_training(p) for p in args.files):  # phase costs only
        print(json.dumps(phase_rows, indent=2) if args.json else "\n\n".join(sections))
        return 0
    files = [load(p) for p in args.files]
    f = fit(files, getattr(args, "measured_cores", None))
    base = next((rf for rf in files if rf.config.get("model")), None)
    if base is None:
        raise InputError("no input file carries a config attribute with the model shape")
    job = job_with(Job.from_file(base), args.overrides)
    tgt = Target(args.cores or f.cores, args.ranks_per_node,
                 f.alpha if args.nodes_alpha is None else args.nodes_alpha,
                 f.beta if args.nodes_beta is None else args.nodes_beta)
    layout = getattr(args, "layout", "heads")
    gib = getattr(args, "memory", None)
    limit = None if gib is None else gib * 2**30
    rows = table(job, f, tgt, ranks, layout, limit)
    if args.ranks_per_node is None and (args.nodes_alpha is not None
                                        or args.nodes_beta is not None):
        f.notes.append("--nodes-alpha/--nodes-beta are used only with --ranks-per-node:"
                       " ignored")
    checks = check(files, f)
    training = training_shape(job, base)
    if args.json:
        shares = {} if training is None else {
            "tensor2_vocab_split": step_flops(**training, tensor=2, vocab_split=True),
            "tensor2_whole_vocab": step_flops(**training, tensor=2, vocab_split=False),
            **layout_shares(training)}
        print(json.dumps({"job": asdict(job), "fit": asdict(f), "target": asdict(tgt),
                          "assumptions": assumptions(f, tgt, layout, job, limit),
                          "check": checks, "training": shares, "phase_models": phase_rows,
                          "predictions": rows}, indent=2))
        return 0
    print(format_plan(job, f, tgt, rows, checks, layout, limit))
    for section in sections:
        print(section)
    if training is not None:
        print("training (FLOPs a head group's ranks repeat, analysis.trainshare):\n  "
              + format_share(training, 2))
    return 0


def training_shape(job: Job, rf: Loaded) -> dict[str, Any] | None:
    """The arguments of ``trainshare.step_flops`` for ``job`` (its model's vocabulary and
    tables, ``train.mask_prob`` or 0.15 from the file's config), or None when the file
    does not say how many words the model has."""
    m, t = rf.model, rf.config.get("train", {})
    try:
        vocab = int(m.get("vocab", 0))
        positions, types = int(m.get("max_positions", 512)), int(m.get("type_vocab", 2))
        mask = float(t.get("mask_prob", 0.15))
    except (TypeError, ValueError):
        return None
    if vocab < 1:
        return None
    return {"layers": job.layers, "heads": job.heads, "hidden": job.hidden, "ffn": job.ffn,
            "vocab": vocab, "batch": job.batch, "seq": job.seq_len, "mask_prob": mask,
            "max_positions": positions, "type_vocab": types}


def format_plan(job: Job, f: Fit, tgt: Target, rows: list[dict], checks: list[dict],
                layout: str = "heads", memory_limit: float | None = None) -> str:
    lines = [f"plan: {job.layers} layers, {job.heads} heads, hidden {job.hidden}, ffn"
             f" {job.ffn}; batch {job.batch} x seq {job.seq_len}, {job.dtype}, checksums"
             f" {job.checksum}" + (f" ({job.wire} wire)" if job.checksum == "abft" else ""),
             f"  {job.sharded_flops() / 1e9:.2f} GFLOP per layer;"
             f" {job.wire_bytes() / 2**20:.2f} MiB per Allreduce per rank (one replica)",
             "fit:",
             f"  compute   R = {f.rate / 1e9:.2f} GFLOP/s per core, parallel fraction over"
             f" threads p = {f.p:.2f}, replicated {f.g * 1e9:.3f} ns per token x hidden (1 thread)"
             f"  [{f.sources.get('compute', '')}]",
             f"  allreduce alpha = {f.alpha * 1e6:.2f} us, beta = {f.beta * 1e9:.4f} ns/B"
             + (f" ({1 / f.beta / 1e9:.2f} GB/s)" if f.beta > 0 else "")
             + f", checksum work {f.h * 1e9:.3f} ns/B  [{f.sources.get('allreduce', '')}]",
             f"  cores     {f.sources.get('cores', '')}"]
    if tgt.ranks_per_node:
        lines.append(f"  inter-node alpha = {tgt.alpha_inter * 1e6:.2f} us, beta ="
                     f" {tgt.beta_inter * 1e9:.4f} ns/B")
    if checks:
        lines.append("check against the inputs (steady-state layer; whole forward, max over"
                     " ranks):")
        for c in checks:
            lines.append(f"  {c['ranks']:>5} ranks  layer {c['measured_layer_s'] * 1e3:8.2f} ms"
                         f" -> {c['predicted_layer_s'] * 1e3:8.2f} ms"
                         f" {100 * c['layer_error']:+6.1f}%   "
                         + (f"forward {c['measured_forward_s']:7.3f} s ->"
                            f" {c['predicted_forward_s']:7.3f} s {100 * c['forward_error']:+6.1f}%"
                            if "forward_error" in c else f"{'(bench: one layer)':<34}")
                         + f"  ({c['path']})")
    lines.append("prediction:")
    seq = layout == "best" or job.sequence > 1
    lines.append(f"  {'ranks':>6} {'DxT[xP]':>8} {'nodes':>5} {'heads':>5} {'compute ms':>11}"
                 f" {'allred. ms':>11}"
                 + (f" {'seq':>11} {'seq. ms':>9}" if seq else "")
                 + f" {'layer ms':>10} {'forward s':>10} {'speed-up':>9} {'eff.':>6}"
                 f" {'mem MiB':>8}")
    for r in rows:
        if "impossible" in r:
            lines.append(f"  {r['ranks']:>6}  -- {r['impossible']}")
            continue
        split = f"{r['data']}x{r['tensor']}" + (
            f"x{r['pipeline']}" if r.get("pipeline", 1) > 1 else "")
        algo = f"{r['sequence']} {r['algorithm']}" if r["sequence"] > 1 else "-"
        hidden = (f", {100 * r['ring_hidden_fraction']:.0f}% of shifts hidden"
                  if "ring_hidden_fraction" in r else "")
        lines.append(f"  {r['ranks']:>6} {split:>8} {r['nodes']:>5}"
                     f" {r['heads_per_rank']:>5} {r['compute_s'] * 1e3:>11.2f}"
                     f" {r['allreduce_s'] * 1e3:>11.2f}"
                     + (f" {algo:>11} {r['seq_s'] * 1e3:>9.2f}" if seq else "")
                     + f" {r['layer_s'] * 1e3:>10.2f}"
                     f" {r['forward_s']:>10.3f} {r['speedup']:>9.2f} {r['efficiency']:>6.2f}"
                     f" {r['memory_bytes'] / 2**20:>8.0f}"
                     + (f"  {r['axis']}" if "axis" in r else "")
                     + (f" (M={r['microbatches']}, bubble {r['bubble_fraction']:.2f})"
                        if r.get("pipeline", 1) > 1 else "")
                     + (f" ({r['algorithm']}{hidden})" if r["sequence"] > 1 else ""))
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in assumptions(f, tgt, layout, job, memory_limit)]
    return "\n".join(lines)
