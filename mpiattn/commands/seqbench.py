"""``mpiattn bench`` with ``parallel.sequence = Q > 1``: the layer on token slices.

    OMP_NUM_THREADS=1 mpiexec -n 4 mpiattn bench --set parallel.sequence=4 \\
        --set attention.sequence=ring --sweep 4096,16384 -o seqbench.h5

For every sweep length S (ascending; ``input.seq_len`` without ``--sweep``) each rank holds
its slice of the tokens (``seqattn.SequenceSplit``) and a fresh ``SequenceAttention``
(``placement.make_sequence``) and times, ``--warmup`` untimed then ``--repeats`` timed:

- the layer (``model.layer_forward``) and, inside the same run, the attention block (from
  the start to the layer's first ``norm`` phase), per rank and as the job's time (the
  slowest rank per repeat, median), in model FLOP/s of the whole sequence;
- the seconds spent inside the sequence group's checked transfers (the Alltoall calls;
  a ring shift's ``start`` and ``finish``: the part not hidden, digests included) and
  the bytes each rank sent;
- the peak RSS of the point: the kernel's high-water mark (VmHWM) is reset
  (``/proc/self/clear_refs``) after the previous point's arrays are freed, and read after
  this point; where it cannot be reset the cumulative high-water is recorded, which only
  grows with the ascending lengths (the file says which: ``memory_method``);
- the ring's overlap: (a) the attention phase of the timed layers (the ring with real
  transfers), (b) the same ``SequenceAttention.forward`` with the transfers replaced by
  local copies (``LocalRing``), (c) the Q - 1 shifts alone, no compute;
  hidden = 1 - (a - b) / c clipped to [0, 1]. A checked shift hashes its payload on both
  sides: that work is counted as transfer and cannot be hidden on a busy core. Ulysses:
  its Alltoall seconds as a share of the layer.

The layer's input is random (B, S_i, H) rows: the embeddings are not part of the bench.

Every interval is a pair of the backend's ``Timer`` marks (``core/timing.py``: CUDA events
on CuPy, ``perf_counter`` on NumPy), turned into seconds after the layer in one
synchronise, as ``bench``'s repeats (``benchkit.timed``): no host clock around queued work.
"""

from __future__ import annotations

import datetime as dt
import gc
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..core.attention import KeyMask
from ..core.backend import get_array_module
from ..core.costs import layer_flops
from ..core.model import PhaseTimer, layer_forward
from ..core.timing import Timer
from ..io.formats.bench import SequenceBenchResult, write_sequence_bench
from ..io.formats.common import PHASES
from . import epilogue
from .benchkit import slowest
from .placement import attention_options, load_shards, make_sequence

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


class TimedTransfer:
    """A sequence group's transfer with a stopwatch: the intervals of its calls (an
    Alltoall; a ring shift's ``start`` and ``finish``) as pairs of ``clock`` marks (CUDA
    events on CuPy), and the bytes this rank sent. ``seconds`` resolves the pairs."""

    def __init__(self, inner: Any, clock: Timer) -> None:
        self.inner = inner
        self.clock = clock
        self.spans: list[tuple[Any, Any]] = []
        self.sent = 0

    @property
    def records(self) -> list:
        return self.inner.records

    def reset(self) -> None:
        self.spans, self.sent = [], 0

    def __call__(self, blocks: Any, *, site: str, layer: int) -> Any:
        t = self.clock.mark()
        out = self.inner(blocks, site=site, layer=layer)
        self.spans.append((t, self.clock.mark()))
        n = blocks.shape[0]  # block j goes to rank j; this rank's own stays
        self.sent += blocks.nbytes * (n - 1) // n
        return out

    def start(self, payload: Any, *, site: str, layer: int, channel: int = 0) -> Any:
        t = self.clock.mark()
        shift = self.inner.start(payload, site=site, layer=layer, channel=channel)
        self.spans.append((t, self.clock.mark()))
        self.sent += payload.nbytes
        return shift

    def poll(self, shift: Any) -> None:  # inside the compute: not counted as transfer
        self.inner.poll(shift)

    def finish(self, shift: Any) -> Any:
        t = self.clock.mark()
        out = self.inner.finish(shift)
        self.spans.append((t, self.clock.mark()))
        return out


class LocalRing:
    """The ring's interface with no communication: ``start`` copies the payload,
    ``finish`` hands the copy back. The ring's compute (every step attends to a slice of
    the same shape) with its transfers replaced by local copies."""

    @property
    def records(self) -> list:
        return []

    def start(self, payload: Any, *, site: str, layer: int, channel: int = 0) -> Any:
        return payload.copy()  # on the payload's device

    def finish(self, shift: Any) -> Any:
        return shift


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0:
    ``echo 5 > /proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: VmHWM of /proc/self/status (what ``reset_peak`` resets), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def hidden_fraction(ring_s: float, local_s: float, shifts_s: float) -> float:
    """The share of the ring's transfer time hidden behind compute: 1 - (a - b) / c, with
    a the ring with real transfers, b the same compute with local copies, c the transfers
    alone; clipped to [0, 1] (timer noise); NaN without a transfer time."""
    if shifts_s <= 0:
        return float("nan")
    return float(np.clip(1.0 - (ring_s - local_s) / shifts_s, 0.0, 1.0))


def check_sweep(cfg: Config, sweep: list[int]) -> list[int]:
    """The lengths to time, ascending (``input.seq_len`` without a sweep); ConfigError
    when one has fewer tokens than sequence ranks. Same on every rank (no collective)."""
    from ..errors import ConfigError

    lengths = sorted(set(sweep or [cfg.input.seq_len]))
    parts = cfg.parallel.sequence
    short = [s for s in lengths if s < parts]
    if short:
        raise ConfigError(f"--sweep length {short[0]} gives parallel.sequence = {parts} ranks"
                          " fewer tokens than ranks: each rank needs a token")
    return lengths


def bench_sequence(cfg: Config, world: MPI.Comm, p: Any, reducer: Any, out: Any,
                   started: dt.datetime, repeats: int, sweep: list[int],
                   warmup: int = 1) -> Path | None:
    """The sequence-parallel layer at every sweep length (see the module's docstring),
    written to ``/bench/sequence``."""
    from ..parallel.comm import gather_rows

    rank, grid = world.Get_rank(), p.grid
    backend, xp = p.backend, p.backend.xp
    m, dtype = cfg.model, np.dtype(cfg.dtype)
    b = p.rows[0]  # this replica's sequences
    batch = p.batch.shape[0]
    lengths = check_sweep(cfg, sweep)
    _, (shard,) = load_shards(cfg, p, world, range(1))
    rng = np.random.default_rng(cfg.seed)
    parts = grid.axis_size("sequence")
    algorithm = make_sequence(cfg, p, lengths[0]).algorithm
    if rank == 0:
        print(f"bench: sequence parallel ({algorithm}) {parts} x {grid.axis_size('tensor')}"
              f" head x {grid.axis_size('data')} data ranks, hidden {m.hidden}, heads"
              f" {m.heads}, ffn {m.ffn}, batch {batch}, {cfg.dtype}, seq {lengths},"
              f" {warmup} warm-up + {repeats} timed", flush=True)

    fields = ("layer", "block", "transfer", "sent", "peak", "ring", "local", "shifts",
              "hidden")
    mine = {k: np.full(len(lengths), np.nan) for k in fields}
    phases = np.zeros((len(lengths), len(PHASES)))
    job = {"layer": [], "block": []}
    clock = backend.timer()
    method = "VmHWM reset per point" if not backend.is_gpu else "CuPy pool total"
    for i, seq in enumerate(lengths):
        gc.collect()  # the previous point's arrays are gone before its peak is reset
        if not backend.is_gpu and not reset_peak():
            method = "cumulative high-water (ascending lengths)"
        sequence = make_sequence(cfg, p, seq)
        timing = TimedTransfer(sequence.transfer, clock)
        sequence.transfer = timing
        split = sequence.split
        options = attention_options(cfg, p)
        options.sequence = sequence
        x = xp.asarray(rng.standard_normal((b, split.count, m.hidden), dtype=np.float32)
                       .astype(dtype, copy=False))
        mask = KeyMask([seq] * b)  # full sequences: every counted FLOP is done

        def run(x: Any = x, mask: KeyMask = mask, options: Any = options,
                timing: TimedTransfer = timing) -> tuple[float, float, float, dict]:
            # every interval a pair of clock marks (CuPy: CUDA events), resolved after
            # the layer in one synchronise: no host clock around queued device work
            timer = PhaseTimer(clock, PHASES)
            marks: list[Any] = []

            def phase(name: str) -> Any:
                if name == "norm" and not marks:  # the attention block ends here
                    marks.append(clock.mark())
                return timer(name)

            timing.reset()
            world.Barrier()
            t0 = clock.mark()
            layer_forward(x, shard, mask, reducer, 0, m.layer_norm_eps, phase, options,
                          cfg.parallel.overlap)
            layer_s, block_s, *moved = clock.elapsed([(t0, clock.mark()), (t0, marks[0]),
                                                      *timing.spans])
            return layer_s, block_s, float(sum(moved)), timer.seconds

        for _ in range(warmup):
            run()
        runs = [run() for _ in range(repeats)]
        own = np.array([r[0] for r in runs])
        block = np.array([r[1] for r in runs])
        mine["layer"][i], mine["block"][i] = np.median(own), np.median(block)
        mine["transfer"][i] = np.median([r[2] for r in runs])
        mine["sent"][i] = timing.sent
        for name_s in (r[3] for r in runs):
            for (_, ph), sec in name_s.items():
                phases[i, PHASES.index(ph)] += sec / repeats
        job["layer"].append(float(np.median(slowest(world, own))))
        job["block"].append(float(np.median(slowest(world, block))))
        if sequence.algorithm == "ring":
            mine["ring"][i] = np.median([r[3].get((0, "attention"), 0.0) for r in runs])
            mine["local"][i], mine["shifts"][i] = ring_overlap(
                world, clock, sequence, timing.inner, shard, b, dtype, rng, mask, options)
            mine["hidden"][i] = hidden_fraction(mine["ring"][i], mine["local"][i],
                                                mine["shifts"][i])
        mine["peak"][i] = peak_rss() if not backend.is_gpu else backend.memory_high_water()
        peak_all = world.allreduce(float(mine["peak"][i]), op=_max())
        share = world.allreduce(float(mine["transfer"][i] / mine["layer"][i])) / grid.size
        hidden = world.allreduce(float(mine["hidden"][i])) / grid.size  # NaN: Ulysses
        if rank == 0:
            flops = layer_flops(batch, seq, m.hidden, m.ffn)["layer"]
            what = f", ring hidden {hidden:.2f}" if sequence.algorithm == "ring" else ""
            print(f"  seq {seq:>7}: layer {job['layer'][-1]:9.3f} s, attention block"
                  f" {job['block'][-1]:9.3f} s, {flops / job['layer'][-1] / 1e9:7.2f}"
                  f" GFLOP/s, transfers {100 * share:.1f}% of the layer{what}, peak RSS"
                  f" {peak_all / 2**30:.2f} GiB/rank (max)", flush=True)
        del sequence, timing, options, x, runs

    per_rank = {k: gather_rows(world, v[None]) for k, v in mine.items()}
    all_phases = gather_rows(world, phases[None])
    if rank != 0:
        return epilogue.finish(world, out, cfg, p, started, "bench", None)
    flops = {name: np.array([layer_flops(batch, s, m.hidden, m.ffn)[key] for s in lengths])
             for name, key in (("layer", "layer"), ("block", "attention_block"))}
    result = SequenceBenchResult(
        algorithm=algorithm, parts=parts, seq_len=np.array(lengths, dtype=np.int64),
        layer_seconds=np.array(job["layer"]), block_seconds=np.array(job["block"]),
        layer_flops=flops["layer"], block_flops=flops["block"],
        rank_layer_seconds=per_rank["layer"], rank_block_seconds=per_rank["block"],
        rank_flops_per_second=flops["layer"][None] / grid.size / per_rank["layer"],
        transfer_seconds=per_rank["transfer"],
        transfer_bytes=per_rank["sent"].astype(np.int64),
        peak_rss=per_rank["peak"].astype(np.int64), memory_method=method,
        phases=all_phases, ring_seconds=per_rank["ring"], local_seconds=per_rank["local"],
        shift_seconds=per_rank["shifts"], hidden=per_rank["hidden"], warmup=warmup,
        repeats=repeats, checksum_mode=reducer.mode)
    path = out.path

    epilogue.finish(world, out, cfg, p, started, "bench",
                    lambda fh: write_sequence_bench(fh, result))
    print(f"  peak RSS: {method}")
    print(f"wrote {path}")
    return path


def _max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def ring_overlap(world: MPI.Comm, clock: Timer, sequence: Any, ring: Any, shard: Any, b: int,
                 dtype: Any, rng: Any, mask: KeyMask, options: Any
                 ) -> tuple[float, float]:
    """(b, c) of the ring's overlap on this rank: seconds of ``SequenceAttention.forward``
    with ``LocalRing`` in place of the ring (same compute, local copies), and of the Q - 1
    checked shifts of a K/V slice alone (``ring``, no compute). All ranks at once."""
    from ..core.seqattn import SequenceAttention

    xp = get_array_module(shard.w_qkv)
    split = sequence.split
    heads, head_dim = shard.heads, shard.head_dim
    qkv = xp.asarray(rng.standard_normal((b * split.count, 3 * heads * head_dim),
                                         dtype=np.float32).astype(dtype, copy=False))
    o = xp.empty((b * split.count, heads * head_dim), dtype=dtype)
    local = SequenceAttention("ring", split, LocalRing(), sequence.block)
    world.Barrier()
    t0 = clock.mark()
    local.forward(qkv, o, b, heads, head_dim, mask, options, 0)
    local_end = clock.mark()
    payload = xp.zeros((b, split.widest, 2, heads, head_dim), dtype=dtype)
    world.Barrier()
    t1 = clock.mark()
    for _ in range(split.parts - 1):
        ring.finish(ring.start(payload, site="ring.kv", layer=0))
    local_s, shifts_s = clock.elapsed([(t0, local_end), (t1, clock.mark())])
    del qkv, o
    return local_s, shifts_s

