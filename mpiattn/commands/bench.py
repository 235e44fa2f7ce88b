"""``mpiattn bench``: the sharded layer against the limits measured in the same run.

    OMP_NUM_THREADS=2 mpiexec -n 1 mpiattn bench --set input.seq_len=512 -o bench.h5
    mpiexec -n 2 mpiattn bench --set input.seq_len=512 -o bench2.h5

Measured after warm-up, ``--repeats`` times, median and spread (max - min):
the backend's matrix-multiply rate at the layer's own GEMM shapes (the practical limit),
the attention block and the whole layer in model FLOP/s and as a fraction of that limit,
the checked Allreduce (latency, bus bandwidth) against a plain memory copy, the per-phase
breakdown and load imbalance, peak memory per rank, checksums on vs off, and optionally a
sweep over sequence lengths. Inputs are full-length sequences, so no FLOP is skipped.

With ``parallel.pipeline = P > 1`` (``bench_pipeline``) it times the whole pipelined
forward instead (``pipeline.stage_forward`` on every stage, as ``mpiattn run`` does):
per rank its stage and per-phase seconds (``p2p`` and ``bubble`` included), the measured
bubble fraction against GPipe's ideal (P-1)/(M+P-1), and the time per layer.

With ``parallel.sequence = Q > 1`` (``seqbench.bench_sequence``) every rank holds its slice
of the tokens and the layer is timed at every sweep length, with the sequence transfers'
seconds, the peak RSS of each length and the ring's hidden transfer fraction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..core.attention import KeyMask
from ..core.backend import get_array_module
from ..core.costs import layer_flops
from ..core.model import Phase, PhaseTimer, attention_block, layer_forward, no_timing
from ..core.pipeline import PHASES as PIPELINE_PHASES
from ..core.pipeline import micro_batches, stage_forward, stage_layers
from ..core.timing import Timer
from ..io.formats.bench import (
    BenchResult,
    PipelineBenchResult,
    write_bench,
    write_pipeline_bench,
)
from ..io.formats.common import PHASES
from . import epilogue
from .benchkit import slowest, timed
from .placement import attention_options, load_shards, make_p2p
from .runner import setup

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


def gemm_rate(xp: Any, shapes: list[tuple[int, int, int]], dtype: Any, world: MPI.Comm,
              sync: Timer | Callable[[], None], repeats: int) -> float:
    """Best FLOP/s of this rank's backend over the layer's GEMM shapes, all ranks at once."""
    best = 0.0
    for m, k, n in shapes:
        a = xp.ones((m, k), dtype=dtype)
        b = xp.ones((k, n), dtype=dtype)
        out = xp.empty((m, n), dtype=dtype)
        sec = slowest(world, timed(world, sync, lambda a=a, b=b, out=out: xp.matmul(a, b, out=out),
                                   repeats))
        best = max(best, 2.0 * m * k * n / float(np.median(sec)))
    return best


def allreduce_sweep(world: MPI.Comm, comm: MPI.Comm, sizes: list[int], repeats: int) -> dict:
    """Latency and bus bandwidth of a plain Allreduce (float32) and of a memory copy."""
    from mpi4py import MPI

    n = comm.Get_size()
    rows: dict[str, list] = {k: [] for k in ("bytes", "seconds", "spread", "busbw",
                                             "copy_seconds", "copy_bandwidth")}
    for nbytes in sizes:
        count = max(1, nbytes // 4)
        send = np.ones(count, np.float32)
        recv = np.empty_like(send)
        sec = slowest(world, timed(world, lambda: None,
                                   lambda s=send, r=recv: comm.Allreduce(s, r, op=MPI.SUM),
                                   repeats, warmup=2))
        copy = timed(world, lambda: None, lambda s=send, r=recv: np.copyto(r, s), repeats)
        t, tc = float(np.median(sec)), float(np.median(copy))
        rows["bytes"].append(count * 4)
        rows["seconds"].append(t)
        rows["spread"].append(float(sec.max() - sec.min()))
        rows["busbw"].append(count * 4 / t * 2 * (n - 1) / n if n > 1 else 0.0)
        rows["copy_seconds"].append(tc)
        rows["copy_bandwidth"].append(count * 4 / tc)
    return {k: np.array(v) for k, v in rows.items()}


def train_step(x: Any, shard: Any, reducer: Any, eps: float,
               attention: tuple[str, int]) -> Callable[[], Any]:
    """One layer's forward with its cache and the hand-written backward (training)."""
    from ..core.attention import mask_bias
    from ..core.model import layer_backward, layer_forward_cached

    impl, block = attention
    xp = get_array_module(x)
    dy = x * 0.01
    bias = mask_bias(xp.ones(x.shape[:2], dtype=bool), x.dtype)  # full sequences

    def step() -> Any:
        _, cache = layer_forward_cached(x, shard, bias, reducer, 0, eps, impl, block)
        return layer_backward(dy, cache, reducer)

    return step


def checksum_overhead(world: MPI.Comm, sync: Timer | Callable[[], None], layer: Callable[[], Any],
                      reducer: Any, repeats: int) -> float:
    """Median layer time with checksums on over off, the modes interleaved so that a
    change of machine load hits both alike."""
    mode = reducer.mode
    seconds: dict[str, list[float]] = {"abft": [], "off": []}
    for _ in range(repeats):
        for m in ("abft", "off"):
            reducer.mode = m
            seconds[m].append(float(slowest(world, timed(world, sync, layer, 1))[0]))
    reducer.mode = mode
    return float(np.median(seconds["abft"]) / np.median(seconds["off"]))


def bench(cfg: Config, world: MPI.Comm, out_path: str, force: bool, repeats: int,
          sweep: list[int], warmup: int = 1) -> Path | None:
    """The bench on every rank: the pipelined forward (``parallel.pipeline > 1``), the
    sequence-parallel layer over the sweep (``parallel.sequence > 1``, ``seqbench``;
    ``warmup`` untimed layers per length), or the head-parallel layer."""
    from ..errors import ConfigError
    from .seqbench import bench_sequence, check_sweep

    started = dt.datetime.now(dt.UTC)
    cfg.input.min_fill = 1.0  # full sequences: every counted FLOP is done
    cfg.output.layers = "none"

    def sequence_checks() -> None:  # in the pre-flight: one line from rank 0
        if cfg.parallel.sequence > 1:
            if cfg.parallel.pipeline > 1:
                raise ConfigError("mpiattn bench times parallel.sequence on one layer: set"
                                  " parallel.pipeline = 1 (or parallel.sequence = 1)")
            check_sweep(cfg, sweep)

    p, reducer, out = setup(cfg, world, out_path, force, "bench", sequence_checks)
    try:
        if p.grid.axis_size("pipeline") > 1:
            return bench_pipeline(cfg, world, p, reducer, out, started, repeats)
        if p.grid.axis_size("sequence") > 1:
            return bench_sequence(cfg, world, p, reducer, out, started, repeats, sweep,
                                  warmup)
        return _bench(cfg, world, p, reducer, out, started, repeats, sweep)
    finally:
        if out is not None:
            out.discard()


def _bench(cfg: Config, world: MPI.Comm, p: Any, reducer: Any, out: Any, started: dt.datetime,
           repeats: int, sweep: list[int]) -> Path | None:
    from ..parallel.comm import gather_rows

    rank = world.Get_rank()
    xp, sync = p.backend.xp, p.backend.timer()  # CuPy: CUDA events
    m, dtype = cfg.model, np.dtype(cfg.dtype)
    b, s = p.rows[0], p.batch.shape[1]  # this replica's sequences, full length
    _, (shard,) = load_shards(cfg, p, world, range(1))
    rng = np.random.default_rng(cfg.seed)
    x = xp.asarray(rng.standard_normal((b, s, m.hidden)).astype(dtype))
    mask = KeyMask([s] * b)
    options = attention_options(cfg, p)

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    data, tensor = p.grid.axis_size("data"), p.grid.axis_size("tensor")
    say(f"bench: hidden {m.hidden}, heads {m.heads} {p.head_counts}, ffn {m.ffn}, batch"
        f" {p.batch.shape[0]} x seq {s}, {cfg.dtype}, {p.grid.size} ranks"
        f" ({data} data x {tensor} head), {p.threads or '-'} threads/rank")

    # 1. the limit: GEMM rate at the layer's own shapes on this rank
    rows, w, f = b * s, p.shard.width, p.shard.ffn_cols.stop - p.shard.ffn_cols.start
    peak = gemm_rate(xp, [(rows, m.hidden, 3 * w), (rows, w, m.hidden), (rows, m.hidden, f),
                          (rows, f, m.hidden)], dtype, world, sync, repeats)
    peaks = np.array(world.allgather(peak))

    # 2. attention block and whole layer, checksums on and off
    flops = layer_flops(p.batch.shape[0], s, m.hidden, m.ffn)
    x2 = x.reshape(rows, m.hidden)

    def block() -> Any:
        return attention_block(x2, shard, mask, reducer, 0, b, s, options=options)

    timer = PhaseTimer(p.backend.timer(), PHASES)

    def layer(phase: Phase = no_timing) -> Any:
        return layer_forward(x, shard, mask, reducer, 0, m.layer_norm_eps, phase, options,
                             cfg.parallel.overlap)

    results: dict[str, np.ndarray] = {}
    results["attention_block"] = slowest(world, timed(world, sync, block, repeats))
    results["layer"] = slowest(world, timed(world, sync, layer, repeats))
    results["layer_train"] = slowest(world, timed(world, sync, train_step(
        x, shard, reducer, m.layer_norm_eps, options.resolve(s)), repeats))
    overhead = checksum_overhead(world, sync, layer, reducer, repeats)
    mine = timed(world, sync, lambda: layer(timer), repeats, warmup=0)
    phase_seconds = np.array([sum(v for (_, ph), v in timer.seconds.items() if ph == name)
                              for name in PHASES]) / repeats
    all_phases = gather_rows(world, phase_seconds[None])
    layer_per_rank = gather_rows(world, np.array([np.median(mine)]))
    memory = gather_rows(world, np.array([p.backend.memory_high_water()], dtype=np.int64))

    # 3. the Allreduce at the layer's message size and around it, vs a memory copy
    message = rows * m.hidden * dtype.itemsize
    sizes = sorted({8, 1 << 12, 1 << 16, 1 << 20, message, min(4 * message, 1 << 26)})
    comm_table = allreduce_sweep(world, p.grid.comm("tensor"), sizes, repeats)

    # 4. optional sweep over sequence lengths (whole layer)
    sweep_rows = []
    for seq in sweep:
        xs = xp.asarray(rng.standard_normal((b, seq, m.hidden)).astype(dtype))
        ms = KeyMask([seq] * b)

        def fn(xs: Any = xs, ms: KeyMask = ms) -> Any:
            return layer_forward(xs, shard, ms, reducer, 0, m.layer_norm_eps, options=options)

        t = float(np.median(slowest(world, timed(world, sync, fn, max(1, repeats // 2)))))
        fl = layer_flops(p.batch.shape[0], seq, m.hidden, m.ffn)["layer"]
        sweep_rows.append((seq, t, fl / t))
        say(f"  sweep seq {seq:>6}: layer {t * 1e3:9.1f} ms, {fl / t / 1e9:7.1f} GFLOP/s")

    if rank != 0:
        return epilogue.finish(world, out, cfg, p, started, "bench", None)
    total_peak = float(peaks.sum())
    summary = {}
    flops["layer_train"] = 3 * flops["layer"]  # backward = twice the forward's products
    for name in ("attention_block", "layer", "layer_train"):
        t = float(np.median(results[name]))
        summary[name] = (t, flops[name] / t, flops[name] / t / total_peak)
    imbalance = float(layer_per_rank.max() / layer_per_rank.mean())
    path = out.path

    result = BenchResult(peaks, summary, results, flops, all_phases, layer_per_rank,
                         imbalance, memory, comm_table, p.grid.axis_size("tensor"), overhead,
                         reducer.mode, sweep_rows)

    epilogue.finish(world, out, cfg, p, started, "bench",
                    lambda fh: write_bench(fh, result))

    print(f"  GEMM limit      {total_peak / 1e9:8.1f} GFLOP/s "
          f"({', '.join(f'{x / 1e9:.1f}' for x in peaks)} per rank)")
    for name, (t, rate, frac) in summary.items():
        print(f"  {name:<15} {t * 1e3:8.1f} ms  {rate / 1e9:8.1f} GFLOP/s  {frac:5.2f} of limit"
              f"  (spread {np.ptp(results[name]) * 1e3:.1f} ms)")
    share = all_phases.mean(axis=0) / max(all_phases.mean(axis=0).sum(), 1e-12)
    print("  phases          " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in
                                          zip(PHASES, share, strict=True)))
    print(f"  imbalance       {imbalance:.3f} (max/mean layer time over ranks)")
    print(f"  checksums       on/off = {overhead:.3f}")
    i = int(np.argmin(np.abs(comm_table['bytes'] - message)))
    print(f"  allreduce       {comm_table['bytes'][i] / 2**20:.1f} MiB in"
          f" {comm_table['seconds'][i] * 1e3:.2f} ms, busbw"
          f" {comm_table['busbw'][i] / 1e9:.2f} GB/s vs copy"
          f" {comm_table['copy_bandwidth'][i] / 1e9:.2f} GB/s; 8 B latency"
          f" {comm_table['seconds'][0] * 1e6:.1f} us")
    print(f"  peak memory     {memory.max() / 2**30:.2f} GiB per rank (max)")
    print(f"wrote {path}")
    return path


def ideal_bubble(stages: int, micro: int) -> float:
    """GPipe's idle fraction of a stage, (P-1)/(M+P-1), for P equal stages and M
    micro-batches with free messages (Huang et al., "GPipe", 2019, section 2.3)."""
    return (stages - 1) / (micro + stages - 1)


def bubble_fractions(job_s: float, own_s: np.ndarray, waited_s: np.ndarray) -> np.ndarray:
    """Per rank, the fraction of the job's forward (``job_s``, seconds: the slowest rank's)
    that the rank was idle: not working (its own forward ``own_s`` less the time
    ``waited_s`` it waited for its input, the ``bubble`` phase) — the fill wait before its
    first micro-batch, the gaps between them and the drain after its last. Clipped to
    [0, 1] (timer noise)."""
    busy = np.asarray(own_s, dtype=float) - np.asarray(waited_s, dtype=float)
    return np.clip((job_s - busy) / job_s, 0.0, 1.0) if job_s > 0 else np.zeros_like(busy)


def bench_pipeline(cfg: Config, world: MPI.Comm, p: Any, reducer: Any, out: Any,
                   started: dt.datetime, repeats: int) -> Path | None:
    """The pipelined forward of the whole model, ``repeats`` times after one warm-up:
    per rank its stage, per-phase seconds per forward, its own forward time and idle
    (bubble) fraction; the job's forward (slowest rank per repeat), the time per layer,
    the point-to-point bandwidth between stages; written to ``/bench/pipeline``."""
    from ..parallel.comm import gather_rows

    rank, grid = world.Get_rank(), p.grid
    xp, sync = p.backend.xp, p.backend.timer()  # CuPy: CUDA events
    m, dtype = cfg.model, np.dtype(cfg.dtype)
    stages, stage = grid.axis_size("pipeline"), grid.coord("pipeline")
    count, start = p.rows
    mine = p.batch.rows(start, count)
    micro = len(micro_batches(count, cfg.parallel.microbatches))
    my_layers = stage_layers(m.layers, stages, stage)
    emb, shards = load_shards(cfg, p, world, my_layers)
    layers = dict(zip(my_layers, shards, strict=True))
    ids, mask = xp.asarray(mine.ids), xp.asarray(mine.mask)
    types = None if mine.types is None else xp.asarray(mine.types)
    options, eps = attention_options(cfg, p), m.layer_norm_eps
    p2p = make_p2p(cfg, p)
    phases = PHASES + PIPELINE_PHASES
    timer = PhaseTimer(p.backend.timer(), phases)
    seq = p.batch.shape[1]
    if rank == 0:
        print(f"bench: pipeline {stages} stages x {grid.axis_size('tensor')} head ranks x"
              f" {grid.axis_size('data')} replicas, {m.layers} layers, {micro} micro-batches,"
              f" batch {p.batch.shape[0]} x seq {seq}, {cfg.dtype}", flush=True)

    def forward(phase: Phase = no_timing) -> Any:
        return stage_forward(ids, mask, types, emb, layers, reducer, eps, stage, stages, p2p,
                             cfg.parallel.microbatches, phase, None, options,
                             cfg.parallel.overlap)

    forward()  # warm-up, untimed
    own = timed(world, sync, lambda: forward(timer), repeats, warmup=0)
    job = slowest(world, own)
    per_phase = np.zeros(len(phases))
    for (_, name), sec in timer.seconds.items():
        per_phase[phases.index(name)] += sec
    per_phase /= repeats  # seconds per forward
    all_phases = gather_rows(world, per_phase[None])
    own_mean = gather_rows(world, np.array([own.mean()]))
    stage_of = gather_rows(world, np.array([stage], dtype=np.int64))
    memory = gather_rows(world, np.array([p.backend.memory_high_water()], dtype=np.int64))
    message = -(-count // micro) * seq * m.hidden * dtype.itemsize  # bytes per micro-batch
    sent = 0 if stage == stages - 1 else micro * message
    sent_all = gather_rows(world, np.array([sent], dtype=np.int64))
    if rank != 0:
        return epilogue.finish(world, out, cfg, p, started, "bench", None)

    bubble = phases.index("bubble")
    fractions = bubble_fractions(float(job.mean()), own_mean, all_phases[:, bubble])
    p2p_s = all_phases[:, phases.index("p2p")]
    senders = sent_all > 0
    bandwidth = float(sent_all[senders].sum() / p2p_s[senders].sum()) if np.any(
        senders & (p2p_s > 0)) else 0.0
    result = PipelineBenchResult(
        stages=stages, microbatches=micro, layers=m.layers, seconds=job, stage=stage_of,
        phases=all_phases, phase_names=phases, forward_per_rank=own_mean,
        bubble_fraction=fractions, ideal=ideal_bubble(stages, micro),
        message_bytes=message, p2p_bandwidth=bandwidth, memory=memory,
        checksum_mode=reducer.mode)
    path = out.path

    epilogue.finish(world, out, cfg, p, started, "bench",
                    lambda fh: write_pipeline_bench(fh, result))
    t = float(np.median(job))
    print(f"  forward         {t * 1e3:8.1f} ms  (spread {np.ptp(job) * 1e3:.1f} ms),"
          f" {t / m.layers * 1e3:.2f} ms per layer")
    for s in range(stages):
        on = stage_of == s
        print(f"  stage {s:<9} bubble {fractions[on].mean():5.3f}, waited"
              f" {all_phases[on, bubble].mean() * 1e3:.1f} ms, p2p"
              f" {p2p_s[on].mean() * 1e3:.1f} ms")
    print(f"  pipeline        bubble {fractions.mean():.3f} measured vs"
          f" {result.ideal:.3f} ideal (P-1)/(M+P-1), P={stages} M={micro}; p2p"
          f" {bandwidth / 1e9:.2f} GB/s")
    print(f"wrote {path}")
    return path
