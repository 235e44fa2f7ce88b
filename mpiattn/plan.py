"""``mpiattn plan``: predict layer time, speed-up and efficiency at N ranks, offline.

    mpiattn plan s1.h5 s2.h5 s4.h5                    # run files at several rank counts
    mpiattn plan bench2.h5 bench4.h5 --set model.layers=24 --set input.seq_len=512
    mpiattn plan s*.h5 --cores 64 --ranks-per-node 8 --nodes-alpha 5e-6 --nodes-beta 1e-10

Two fitted models, both stated in the output with their numbers:

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

from .errors import ConfigError, InputError
from .report import Loaded, load

PHASE_AR = "allreduce"
REPLICATED = "norm"  # LayerNorm and residuals: the same work on every rank of a head group
CHECK_ROWS = 2  # rows an ABFT partial carries on top of its N rows (sum and |sum|)
PLAN_KEYS = {
    "model.hidden": int, "model.heads": int, "model.layers": int, "model.ffn": int,
    "input.batch": int, "input.seq_len": int, "dtype": str, "checksum.mode": str,
    "checksum.wire": str, "parallel.microbatches": int,
}
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

    def sharded_flops(self, batch: int | None = None) -> float:
        """Model FLOPs of one layer on ``batch`` sequences, all heads (the sharded part)."""
        b = self.batch if batch is None else batch
        n, h, s = b * self.seq_len, self.hidden, self.seq_len
        return float(2 * n * h * 3 * h + 4 * b * s * s * h + 2 * n * h * h + 4 * n * h * self.ffn)

    def wire_bytes(self, batch: int | None = None) -> float:
        """Bytes one rank contributes to one Allreduce. The float64 wire of NumPy ranks
        (``comm.SplitSum``) moves the partial in its own dtype plus float64 checksum rows;
        CuPy ranks send it all in float64 (not modelled here)."""
        n, h = self.tokens(batch), self.hidden
        if self.checksum == "abft":
            return float(n * h * self.elt + CHECK_ROWS * h * (8 if self.wire == "float64"
                                                              else self.elt))
        return float(n * h * self.elt)


def job_with(job: Job, overrides: list[str]) -> Job:
    values = asdict(job)
    names = {"model.layers": "layers", "model.heads": "heads", "model.hidden": "hidden",
             "model.ffn": "ffn", "input.batch": "batch", "input.seq_len": "seq_len",
             "dtype": "dtype", "checksum.mode": "checksum", "checksum.wire": "wire",
             "parallel.microbatches": "microbatches"}
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
    if out.hidden % out.heads:
        raise ConfigError(f"model.hidden = {out.hidden} is not a multiple of model.heads ="
                          f" {out.heads}")
    return out


# --- the machine model ----------------------------------------------------------------------

def threads_for(cores: float, local: int) -> int:
    """BLAS threads per rank, the runner's rule: cores // ranks on the node, at least 1."""
    return max(1, int(cores) // max(1, local))


def speed(cores: float, local: int, threads: int, p: float) -> float:
    """Core-equivalents of one rank: Amdahl over its threads, time-shared past the cores."""
    share = min(1.0, cores / (local * threads))
    return share / ((1.0 - p) + p / threads)


def ring(ranks: int, nbytes: float, alpha: float, beta: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes * beta


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


def reduce_run(rf: Loaded, cores: float) -> Measured | None:
    """A run file's steady-state layer, or a bench file's per-phase layer (after warm-up)."""
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


def layouts(job: Job, n: int) -> list[tuple[int, int]]:
    """(data, tensor) splits of n ranks the runner accepts: T <= heads, D <= batch."""
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    return [(n // t, t) for t in sorted(divisors) if t <= job.heads and n // t <= job.batch]


def pipeline_layouts(job: Job, n: int) -> list[tuple[int, int, int]]:
    """(data, tensor, pipeline) splits of n ranks: P <= layers stages, each a (D, T) split
    of n/P ranks (``layouts``)."""
    return [(d, t, stages) for stages in range(1, min(n, job.layers) + 1) if n % stages == 0
            for d, t in layouts(job, n // stages)]


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
    """The axis a layout mostly splits on: layers (pipeline), heads (tensor) or the batch
    (data), by the largest factor; "none" on one rank."""
    factors = {"layers": r.get("pipeline", 1), "heads": r["tensor"], "batch": r["data"]}
    top = max(factors.values())
    return "none" if top == 1 else next(k for k, v in factors.items() if v == top)


def predict_layout(job: Job, f: Fit, tgt: Target, data: int, tensor: int,
                   stages: int = 1) -> dict[str, Any]:
    """Predicted seconds of one layout: ``layer_s`` per model layer (a pipeline's: its
    forward less the one-off part over the layers), ``forward_s``; with ``stages`` > 1 the
    bubble and the point-to-point seconds per forward (module docstring, 3.)."""
    n = data * tensor * stages
    rpn = tgt.ranks_per_node or n
    local = min(n, rpn)
    k = threads_for(tgt.cores, local)
    sp = speed(tgt.cores, local, k, f.p)
    rows = math.ceil(job.batch / data)
    heads = math.ceil(job.heads / tensor)
    share = speed(tgt.cores, local, k, 0.0)  # single-threaded elementwise work
    compute = (rank_flops(job, heads, rows) / f.rate / sp
               + f.g * job.tokens(rows) * job.hidden / share)
    nbytes = job.wire_bytes(rows)
    spans = tgt.ranks_per_node is not None and (tensor > rpn or rpn % tensor != 0)
    a, b = (tgt.alpha_inter, tgt.beta_inter) if spans else (f.alpha, f.beta)
    allreduce = 2 * (f.h * nbytes / sp + ring(tensor, nbytes, a, b))
    layer = compute + allreduce
    micro = micro_count(job, rows, stages)
    per_stage = math.ceil(job.layers / stages)
    p2p = 0.0
    if stages > 1:
        message = math.ceil(rows / micro) * job.seq_len * job.hidden * job.elt
        across = tgt.ranks_per_node is not None and n > rpn
        a, b = (tgt.alpha_inter, tgt.beta_inter) if across else (f.alpha, f.beta)
        p2p = (micro + stages - 2) * (a + message * b)
    layers_s = per_stage * layer * (micro + stages - 1) / micro + p2p
    return {"ranks": n, "data": data, "tensor": tensor, "pipeline": stages,
            "microbatches": micro, "nodes": math.ceil(n / rpn),
            "heads_per_rank": heads, "threads": k, "speed": sp, "wire_bytes": nbytes,
            "inter_node": spans, "compute_s": compute, "allreduce_s": allreduce,
            "bubble_fraction": bubble_fraction(stages, micro), "p2p_s": p2p,
            "layer_s": layers_s / job.layers, "forward_s": layers_s + f.once / share}


def predict(job: Job, f: Fit, tgt: Target, n: int, layout: str = "heads"
            ) -> dict[str, Any] | None:
    """The prediction at n ranks: heads first (the most head ranks that fit, as
    ``parallel.tensor = 0`` does up to model.heads), or the fastest split of data x heads x
    pipeline stages ("best"), with ``axis`` the one it mostly splits (``best_axis``)."""
    if layout == "best":
        options = [predict_layout(job, f, tgt, d, t, s) for d, t, s in pipeline_layouts(job, n)]
        if not options:
            return None
        best = min(options, key=lambda r: r["forward_s"])
        best["axis"] = best_axis(best)
        return best
    options = [predict_layout(job, f, tgt, d, t) for d, t in layouts(job, n)]
    if not options:
        return None
    return max(options, key=lambda r: r["tensor"])


def table(job: Job, f: Fit, tgt: Target, ranks: list[int], layout: str = "heads"
          ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = None
    for n in ranks:
        r = predict(job, f, tgt, n, layout)
        if r is None:
            rows.append({"ranks": n, "impossible": f"needs ranks <= heads x batch ="
                         f" {job.heads * job.batch} with a split D x T, T <= {job.heads},"
                         f" D <= {job.batch}" + (f" (x P <= {job.layers} stages)"
                                                 if layout == "best" else "")})
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


def assumptions(f: Fit, tgt: Target, layout: str = "heads") -> list[str]:
    where = (f"{tgt.ranks_per_node} ranks per node, {tgt.cores:g} cores per node"
             if tgt.ranks_per_node else f"all ranks on one node of {tgt.cores:g} cores")
    out = [
        f"placement: {where}; BLAS threads per rank = cores // ranks on the node (runner's"
        " rule); ranks beyond the cores time-share them (a rank gets min(1, c/n) of a core)",
        ("layout: for each N the data x head x pipeline split (heads <= model.heads,"
         " replicas <= input.batch, stages <= model.layers) with the shortest predicted"
         " forward; axis = the largest factor (batch, heads or layers)" if layout == "best"
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
        "no overlap of compute and communication (parallel.overlap is not modelled); the"
        " measured machine's per-core rates at every scale",
    ] + ([
        "pipeline: ceil(L/P) layers per stage, M micro-batches (parallel.microbatches, else"
        " min(rows, 4P)); stage time x (M+P-1)/M (bubble (P-1)/(M+P-1), GPipe) plus"
        " (M+P-2) point-to-point messages of ceil(rows/M) x S x H x itemsize bytes at the"
        " Allreduce alpha + bytes beta; a micro-batch's layer costs 1/M of the batch's"
    ] if layout == "best" else [])
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
    rpn = getattr(args, "ranks_per_node", None)
    if rpn is not None and not 1 <= rpn <= MAX_RANKS:
        raise ConfigError(f"--ranks-per-node must be from 1 to {MAX_RANKS} (2**20), got {rpn}")


def plan_command(args: argparse.Namespace) -> int:
    check_options(args)
    ranks = parse_ranks(args.ranks)
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
    rows = table(job, f, tgt, ranks, layout)
    if args.ranks_per_node is None and (args.nodes_alpha is not None
                                        or args.nodes_beta is not None):
        f.notes.append("--nodes-alpha/--nodes-beta are used only with --ranks-per-node:"
                       " ignored")
    checks = check(files, f)
    if args.json:
        print(json.dumps({"job": asdict(job), "fit": asdict(f), "target": asdict(tgt),
                          "assumptions": assumptions(f, tgt, layout), "check": checks,
                          "predictions": rows}, indent=2))
        return 0
    print(format_plan(job, f, tgt, rows, checks, layout))
    return 0


def format_plan(job: Job, f: Fit, tgt: Target, rows: list[dict], checks: list[dict],
                layout: str = "heads") -> str:
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
    lines.append(f"  {'ranks':>6} {'DxT[xP]':>8} {'nodes':>5} {'heads':>5} {'compute ms':>11}"
                 f" {'allred. ms':>11} {'layer ms':>10} {'forward s':>10} {'speed-up':>9}"
                 f" {'eff.':>6}")
    for r in rows:
        if "impossible" in r:
            lines.append(f"  {r['ranks']:>6}  -- {r['impossible']}")
            continue
        split = f"{r['data']}x{r['tensor']}" + (
            f"x{r['pipeline']}" if r.get("pipeline", 1) > 1 else "")
        lines.append(f"  {r['ranks']:>6} {split:>8} {r['nodes']:>5}"
                     f" {r['heads_per_rank']:>5} {r['compute_s'] * 1e3:>11.2f}"
                     f" {r['allreduce_s'] * 1e3:>11.2f} {r['layer_s'] * 1e3:>10.2f}"
                     f" {r['forward_s']:>10.3f} {r['speedup']:>9.2f} {r['efficiency']:>6.2f}"
                     + (f"  {r['axis']}" if "axis" in r else "")
                     + (f" (M={r['microbatches']}, bubble {r['bubble_fraction']:.2f})"
                        if r.get("pipeline", 1) > 1 else ""))
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in assumptions(f, tgt, layout)]
    return "\n".join(lines)
