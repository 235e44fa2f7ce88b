"""The bench file (``mpiattn bench``): its writers (one layer, the pipelined forward, the
sequence-parallel sweep), its reader (``BenchFile``) and what ``verify`` checks it holds.

Layout (docs, "Benchmarks"): ``/bench/gemm``, ``/bench/<kernel>`` (seconds per repeat,
median, FLOP/s, fraction of the GEMM limit), ``/bench/phases/seconds`` (rank, phase),
``/bench/allreduce`` in the nccl-tests columns, ``/bench/sweep``, ``/bench/pipeline``,
``/bench/sequence``; provenance from ``formats.common``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from .. import h5io, h5safe
from .common import PHASES, finish, write_phase_seconds
from .reading import Columns, File, _frame, _guarded, _texts, integer, scalar

if TYPE_CHECKING:
    import pandas


@dataclass
class BenchResult:
    """What ``mpiattn bench`` measured (see ``bench``), as it goes to ``/bench``."""

    peaks: np.ndarray  # (rank,) FLOP/s at the layer's GEMM shapes
    summary: dict  # name -> (median s, FLOP/s, fraction of the GEMM limit)
    seconds: dict  # name -> (repeat,) seconds
    flops: dict  # name -> model FLOPs
    phases: np.ndarray  # (rank, phase) seconds of one layer
    layer_per_rank: np.ndarray  # (rank,) s
    imbalance: float
    memory: np.ndarray  # (rank,) peak bytes
    allreduce: dict  # column -> (size,) array, nccl-tests layout
    allreduce_ranks: int
    checksum_overhead: float
    checksum_mode: str
    sweep: list  # (seq_len, seconds, FLOP/s) rows


def write_bench(fh: Any, r: BenchResult) -> None:
    g = fh.create_group("bench")
    h5io.write_array(g, "gemm/flops_per_second", r.peaks, ("rank",), units="1/s",
                     long_name="floating-point operations per second",
                     description="best matmul rate at the layer's GEMM shapes, all ranks busy")
    for name, (t, rate, frac) in r.summary.items():
        sub = g.create_group(name)
        h5io.write_array(sub, "seconds", r.seconds[name], ("repeat",), units="s")
        sub.attrs.update({"median_s": t, "spread_s": float(np.ptp(r.seconds[name])),
                          "model_flops": r.flops[name], "flops_per_second": rate,
                          "fraction_of_peak": frac})
    write_phase_seconds(g.create_group("phases"), r.phases, ("rank", "phase"), PHASES)
    h5io.write_array(g, "layer_per_rank", r.layer_per_rank, ("rank",), units="s",
                     imbalance=r.imbalance)
    h5io.write_array(g, "memory/peak_bytes", r.memory, ("rank",), units="bytes",
                     description="peak RSS (CPU) or CuPy pool total (GPU)")
    ar = g.create_group("allreduce")  # "bytes" first: the coordinate of the others
    for key in sorted(r.allreduce, key=lambda k: k != "bytes"):
        h5io.write_array(ar, key, r.allreduce[key], ("bytes",),
                         units="bytes" if key == "bytes" else
                         ("s" if "seconds" in key or key == "spread" else "bytes/s"),
                         **({"long_name": "message size"} if key == "bytes" else {}))
    ar.attrs["ranks"] = r.allreduce_ranks
    ar.attrs["convention"] = "busbw = bytes/time * 2(n-1)/n (nccl-tests)"
    g.attrs["checksum_overhead"] = r.checksum_overhead
    g.attrs["checksum_mode"] = r.checksum_mode
    if r.sweep:
        fields = ["seq_len", "seconds", "flops_per_second"]
        h5io.write_array(g, "sweep", np.array(r.sweep), ("point", "field"),
                         coords={"field": fields}, fields=fields,
                         field_units=["1", "s", "1/s"])  # tokens, seconds, FLOP per second
    finish(fh)


@dataclass
class PipelineBenchResult:
    """What ``mpiattn bench`` measured of a pipelined forward (``bench.bench_pipeline``),
    as it goes to ``/bench/pipeline`` and ``/bench/phases``."""

    stages: int  # P
    microbatches: int  # M
    layers: int  # of the whole model
    seconds: np.ndarray  # (repeat,) s: the slowest rank's forward
    stage: np.ndarray  # (rank,) pipeline stage
    phases: np.ndarray  # (rank, phase) s per forward
    phase_names: tuple[str, ...]
    forward_per_rank: np.ndarray  # (rank,) s: mean own forward
    bubble_fraction: np.ndarray  # (rank,) idle fraction of the job's forward
    ideal: float  # (P-1)/(M+P-1)
    message_bytes: int  # per micro-batch between two stages
    p2p_bandwidth: float  # bytes/s: sent bytes over time in the p2p phase
    memory: np.ndarray  # (rank,) peak bytes
    checksum_mode: str


def write_pipeline_bench(fh: Any, r: PipelineBenchResult) -> None:
    """``/bench/pipeline`` (forward seconds per repeat; per rank: stage, forward, bubble
    fraction), ``/bench/phases/seconds`` (rank, phase; ``p2p`` and ``bubble`` its own
    phases) and peak memory."""
    g = fh.create_group("bench")
    pg = g.create_group("pipeline")
    t = float(np.median(r.seconds))
    h5io.write_array(pg, "forward_seconds", r.seconds, ("repeat",), units="s",
                     description="the whole pipelined forward, slowest rank per repeat")
    h5io.write_array(pg, "stage", r.stage, ("rank",), long_name="pipeline stage")
    h5io.write_array(pg, "forward_per_rank", r.forward_per_rank, ("rank",), units="s",
                     description="mean time from the barrier to this rank's last message")
    h5io.write_array(pg, "bubble_fraction", r.bubble_fraction, ("rank",), units="1",
                     description="idle share of the job's forward: 1 - (own forward -"
                     " waiting for input) / slowest forward (GPipe's bubble)")
    pg.attrs.update({
        "stages": r.stages, "microbatches": r.microbatches, "layers": r.layers,
        "median_s": t, "spread_s": float(np.ptp(r.seconds)),
        "time_per_layer_s": t / r.layers,
        "bubble_fraction": float(np.mean(r.bubble_fraction)),
        "ideal_bubble_fraction": r.ideal,
        "ideal_formula": "(P-1)/(M+P-1) (Huang et al., GPipe, 2019)",
        "message_bytes": r.message_bytes, "p2p_bytes_per_second": r.p2p_bandwidth})
    write_phase_seconds(g.create_group("phases"), r.phases, ("rank", "phase"), r.phase_names,
                        description="seconds per forward, summed over the stage's layers")
    h5io.write_array(g, "memory/peak_bytes", r.memory, ("rank",), units="bytes",
                     description="peak RSS (CPU) or CuPy pool total (GPU)")
    g.attrs["checksum_mode"] = r.checksum_mode
    finish(fh)


@dataclass
class SequenceBenchResult:
    """What ``mpiattn bench`` measured with ``parallel.sequence = Q > 1``
    (``seqbench.bench_sequence``), as it goes to ``/bench/sequence``. Per-rank arrays are
    (rank, seq_len); NaN in the ring's overlap columns with Ulysses."""

    algorithm: str  # "ring" | "ulysses"
    parts: int  # Q
    seq_len: np.ndarray  # (seq_len,) tokens per sequence, ascending
    layer_seconds: np.ndarray  # (seq_len,) the job's: slowest rank per repeat, median
    block_seconds: np.ndarray  # (seq_len,) the attention block, the same way
    layer_flops: np.ndarray  # (seq_len,) model FLOPs of the layer, whole batch and sequence
    block_flops: np.ndarray  # (seq_len,) of the attention block
    rank_layer_seconds: np.ndarray  # median over repeats of the rank's own layer
    rank_block_seconds: np.ndarray
    rank_flops_per_second: np.ndarray  # the rank's equal share of the model FLOPs per s
    transfer_seconds: np.ndarray  # inside the sequence transfers per layer
    transfer_bytes: np.ndarray  # sent by the rank per layer
    peak_rss: np.ndarray  # bytes, per point (``memory_method``)
    memory_method: str
    phases: np.ndarray  # (rank, seq_len, phase) s per layer
    ring_seconds: np.ndarray  # (a) the ring forward with real transfers
    local_seconds: np.ndarray  # (b) the same with local copies
    shift_seconds: np.ndarray  # (c) the shifts alone
    hidden: np.ndarray  # 1 - (a - b) / c clipped to [0, 1]
    warmup: int
    repeats: int
    checksum_mode: str


SEQUENCE_HIDDEN = ("1 - (a - b) / c clipped to [0, 1]: a the ring forward with real checked"
                   " transfers (the layer's attention phase), b the same forward with the"
                   " transfers replaced by local copies, c the Q - 1 checked shifts alone")


def write_sequence_bench(fh: Any, r: SequenceBenchResult) -> None:
    """``/bench/sequence``: per sweep length (dimension ``seq_len``) the job's layer and
    attention-block seconds and FLOP/s; per rank and length the rank's seconds, FLOP/s,
    sequence-transfer seconds and bytes, peak RSS, phases and (ring) the overlap."""
    g = fh.create_group("bench")
    sg = g.create_group("sequence")
    h5io.dimension(sg, "seq_len", r.seq_len, units="1",
                   long_name="tokens per sequence (sweep point)")
    seq, per = ("seq_len",), ("rank", "seq_len")
    job = "the slowest rank per repeat, median over repeats"
    h5io.write_array(sg, "layer_seconds", r.layer_seconds, seq, units="s",
                     description=f"one encoder layer: {job}")
    h5io.write_array(sg, "attention_block_seconds", r.block_seconds, seq, units="s",
                     description=f"the attention block inside the timed layer: {job}")
    for name, flops, t in (("layer", r.layer_flops, r.layer_seconds),
                           ("attention_block", r.block_flops, r.block_seconds)):
        h5io.write_array(sg, f"{name}_flops_per_second", flops / t, seq, units="1/s",
                         long_name="model floating-point operations per second",
                         model_flops=flops)
    h5io.write_array(sg, "rank_layer_seconds", r.rank_layer_seconds, per, units="s",
                     description="this rank's own layer, median over repeats")
    h5io.write_array(sg, "rank_attention_block_seconds", r.rank_block_seconds, per,
                     units="s", description="this rank's own attention block, median")
    h5io.write_array(sg, "rank_flops_per_second", r.rank_flops_per_second, per, units="1/s",
                     long_name="model floating-point operations per second",
                     description="the layer's model FLOPs / world size / own layer seconds")
    h5io.write_array(sg, "transfer_seconds", r.transfer_seconds, per, units="s",
                     description="per layer, inside the sequence group's checked transfers"
                     " (Alltoall calls; ring shift start + finish: the part not hidden),"
                     " digests included; median over repeats")
    h5io.write_array(sg, "transfer_bytes", r.transfer_bytes, per, units="bytes",
                     description="sent by this rank per layer (own Alltoall block excluded)")
    h5io.write_array(sg, "peak_rss", r.peak_rss, per, units="bytes",
                     description=f"peak memory of the point: {r.memory_method}",
                     method=r.memory_method)
    write_phase_seconds(sg, r.phases, ("rank", "seq_len", "phase"), PHASES,
                        description="seconds per layer, mean over the timed repeats")
    if r.algorithm == "ring":
        og = sg.create_group("overlap")
        for name, a, what in (
                ("ring_seconds", r.ring_seconds, "(a) the ring forward with real transfers"),
                ("local_seconds", r.local_seconds, "(b) the same forward, local copies"),
                ("shift_seconds", r.shift_seconds, "(c) the Q - 1 checked shifts alone")):
            h5io.write_array(og, name, a, per, units="s", description=what)
        h5io.write_array(og, "hidden_fraction", r.hidden, per, units="1",
                         description=SEQUENCE_HIDDEN)
    sg.attrs.update({"algorithm": r.algorithm, "parts": r.parts, "warmup": r.warmup,
                     "repeats": r.repeats, "memory_method": r.memory_method})
    g.attrs["checksum_mode"] = r.checksum_mode
    finish(fh)


NCCL_COLUMNS = ("size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong")
NCCL_UNITS = {"size": "B", "count": "elements", "time": "us", "algbw": "GB/s",
              "busbw": "GB/s", "spread": "us", "copy_time": "us", "copy_bw": "GB/s"}
NCCL_TYPES = {"float32": "float", "float64": "double", "float16": "half", "int32": "int32",
              "int64": "int64", "bfloat16": "bfloat16"}


class BenchFile(File):
    """A file of ``mpiattn bench``: the layer against the limits measured in the same run."""

    kind = "bench"
    _timings_name = "bench/phases/seconds"

    @_guarded
    def allreduce(self, raw: bool = False) -> Columns | pandas.DataFrame | None:
        """/bench/allreduce per message size in the nccl-tests out-of-place columns:
        size [B], count [elements], type, redop, root, time [us] (median over repeats of the
        slowest rank), algbw = size/time [GB/s], busbw = algbw x 2(n-1)/n [GB/s] over the n
        ranks of a head group, #wrong ("N/A": results not checked); then mpiattn's own:
        spread [us] (max - min over repeats), copy_time [us] and copy_bw [GB/s] (a local
        memory copy of the same size). None when the file has no sweep."""
        cols = self._allreduce()
        if cols is None:
            return None
        return _frame(cols, None, NCCL_UNITS, raw, "bench/allreduce")

    def _allreduce(self) -> Columns | None:
        if "bench/allreduce/bytes" not in self.h5 or "bench/allreduce/seconds" not in self.h5:
            return None
        group = self.h5["bench/allreduce"]
        size = self._numbers("bench/allreduce/bytes")
        seconds = self._numbers("bench/allreduce/seconds")
        assert size is not None and seconds is not None
        if size.shape != seconds.shape:
            raise InputError(f"/bench/allreduce/bytes has shape {size.shape} but seconds"
                             f" {seconds.shape}")
        ranks = np.full(size.shape, integer(scalar(h5safe.attr(group, "ranks", 1), "ranks"),
                                            "attribute 'ranks' of /bench/allreduce", 1))
        per_size = self._numbers("bench/allreduce/ranks")  # older files: one per size
        if per_size is not None:
            if per_size.size not in (1, size.size) or np.any(per_size < 1) or np.any(
                    per_size != np.round(per_size)):
                raise InputError(f"/bench/allreduce/ranks holds {h5safe.short(per_size)}: expected"
                                 " one rank count >= 1 per size")
            ranks = np.broadcast_to(per_size, size.shape).astype(np.int64)
        dtype = h5safe.text(h5safe.attr(group, "dtype", "float32"),
                            "attribute 'dtype' of /bench/allreduce")  # bench sends float32
        itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
        with np.errstate(divide="ignore", invalid="ignore"):
            algbw = np.where(seconds > 0, size / seconds / 1e9, np.nan)
        n = len(size)
        cols: Columns = {
            "size": size.astype(np.int64), "count": (size // itemsize).astype(np.int64),
            "type": np.array([NCCL_TYPES.get(dtype, dtype)] * n, dtype=object),
            "redop": np.array(["sum"] * n, dtype=object), "root": np.full(n, -1),
            "time": seconds * 1e6, "algbw": algbw, "busbw": algbw * 2.0 * (ranks - 1) / ranks,
            "#wrong": np.array(["N/A"] * n, dtype=object),
        }
        for name, column, scale in (("spread", "spread", 1e6), ("copy_seconds", "copy_time", 1e6),
                                    ("copy_bandwidth", "copy_bw", 1e-9)):
            value = self._numbers(f"bench/allreduce/{name}")
            if value is not None and value.shape == size.shape:
                cols[column] = value * scale
        cols["ranks"] = ranks
        return cols

    @_guarded
    def kernels(self, raw: bool = False) -> Columns | pandas.DataFrame:
        """The timed pieces (attention_block, layer, layer_train), one row each: median_s
        and spread_s over repeats (slowest rank), model_flops, flops_per_second [FLOP/s]
        and fraction_of_peak (of the summed per-rank GEMM limit)."""
        import h5py

        fields = ("median_s", "spread_s", "model_flops", "flops_per_second", "fraction_of_peak")
        names: list[str] = []
        values: dict[str, list[float]] = {k: [] for k in fields}
        group = self.h5.get("bench")
        for name in group if isinstance(group, h5py.Group) else ():
            sub = group[name]
            if (not isinstance(sub, h5py.Group) or "median_s" not in sub.attrs
                    or name == "pipeline"):  # the pipelined forward: ``pipeline()``
                continue
            names.append(name)
            for k in fields:
                v = scalar(h5safe.attr(sub, k, float("nan")), f"attribute '{k}' of /bench/{name}")
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise InputError(f"attribute '{k}' of /bench/{name} is {h5safe.short(v)},"
                                     " not a number")
                values[k].append(float(v))
        cols: Columns = {"name": np.array(names, dtype=object),
                         **{k: np.array(v, dtype=float) for k, v in values.items()}}
        return _frame(cols, "name", {"median_s": "s", "spread_s": "s", "model_flops": "FLOP",
                                     "flops_per_second": "FLOP/s", "fraction_of_peak": "1"},
                      raw, "bench")

    @_guarded
    def sweep(self, raw: bool = False) -> Columns | pandas.DataFrame | None:
        """/bench/sweep over sequence lengths: seq_len, seconds (one layer), flops_per_second;
        None when the bench ran without one."""
        table = self._numbers("bench/sweep", (2,))
        if table is None:
            return None
        fields = h5safe.attr(self.h5["bench/sweep"], "fields")
        names = (_texts(fields, "attribute 'fields' of /bench/sweep") if fields is not None
                 else [f"field{i}" for i in range(table.shape[1])])
        if len(names) != table.shape[1]:
            raise InputError(f"/bench/sweep has {table.shape[1]} columns but 'fields' names"
                             f" {len(names)}")
        return _frame({k: table[:, i] for i, k in enumerate(names)}, None,
                      {"seconds": "s", "flops_per_second": "FLOP/s"}, raw, "bench/sweep")

    @_guarded
    def sequence(self, raw: bool = False) -> Columns | pandas.DataFrame | None:
        """/bench/sequence per sweep length (index ``seq_len``): layer_s and
        attention_block_s (the job's: slowest rank per repeat, median), layer_flops_per_second
        [FLOP/s], transfer_s (the slowest rank's seconds inside the sequence transfers per
        layer), transfer_share (mean over ranks of transfer / own layer seconds),
        transfer_bytes [B] (most sent by a rank per layer), peak_rss [B] (the largest rank's
        peak of that length; ``sequence_attrs()['memory_method']`` says how), and for the
        ring hidden_fraction (mean over ranks) with its parts ring_s, local_s, shift_s
        (means over ranks). None when the bench ran without parallel.sequence."""
        base = "bench/sequence"
        seq = self._numbers(f"{base}/seq_len")
        if seq is None:
            return None
        n = seq.size

        def column(name: str, per_rank: bool) -> np.ndarray | None:
            value = self._numbers(f"{base}/{name}", (2,) if per_rank else (1,))
            if value is None:
                return None
            if value.shape[-1] != n:
                raise InputError(f"/{base}/{name} has shape {value.shape}: expected {n}"
                                 " sweep lengths on its last axis")
            return value

        cols: Columns = {"seq_len": seq.astype(np.int64)}
        for key, name in (("layer_s", "layer_seconds"),
                          ("attention_block_s", "attention_block_seconds"),
                          ("layer_flops_per_second", "layer_flops_per_second")):
            value = column(name, False)
            if value is not None:
                cols[key] = value
        transfer, own = column("transfer_seconds", True), column("rank_layer_seconds", True)
        if transfer is not None:
            cols["transfer_s"] = transfer.max(axis=0)
            if own is not None and own.shape == transfer.shape:
                with np.errstate(divide="ignore", invalid="ignore"):
                    cols["transfer_share"] = np.where(own > 0, transfer / own, np.nan).mean(0)
        for key, name in (("transfer_bytes", "transfer_bytes"), ("peak_rss", "peak_rss")):
            value = column(name, True)
            if value is not None:
                cols[key] = value.max(axis=0)
        for key, name in (("hidden_fraction", "hidden_fraction"), ("ring_s", "ring_seconds"),
                          ("local_s", "local_seconds"), ("shift_s", "shift_seconds")):
            value = column(f"overlap/{name}", True)
            if value is not None:
                cols[key] = value.mean(axis=0)
        return _frame(cols, "seq_len", {"layer_s": "s", "attention_block_s": "s",
                                        "layer_flops_per_second": "FLOP/s", "transfer_s": "s",
                                        "transfer_share": "1", "transfer_bytes": "B",
                                        "peak_rss": "B", "hidden_fraction": "1", "ring_s": "s",
                                        "local_s": "s", "shift_s": "s"}, raw, base)

    @_guarded
    def sequence_attrs(self) -> dict[str, Any]:
        """/bench/sequence's attributes: algorithm, parts (Q), warmup, repeats,
        memory_method; empty without one."""
        group = self.h5.get("bench/sequence")
        return self._attrs(group) if group is not None else {}

    def pipeline(self) -> dict[str, float]:
        """The pipelined forward's scalars (``/bench/pipeline``'s attributes: stages,
        microbatches, layers, median_s, time_per_layer_s [s], bubble_fraction and
        ideal_bubble_fraction (P-1)/(M+P-1), message_bytes [B], p2p_bytes_per_second
        [B/s]); empty for a one-layer bench."""
        group = self.h5.get("bench/pipeline")
        if group is None:
            return {}
        out = {}
        for key in ("stages", "microbatches", "layers", "median_s", "time_per_layer_s",
                    "bubble_fraction", "ideal_bubble_fraction", "message_bytes",
                    "p2p_bytes_per_second"):
            if key in group.attrs:
                v = scalar(h5safe.attr(group, key), f"attribute '{key}' of /bench/pipeline")
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[key] = float(v)
        return out

    @property
    @_guarded
    def results(self) -> dict[str, Any]:
        """The scalar results: checksum_mode, checksum_overhead (layer time with checksums
        on over off), imbalance (max/mean layer time over ranks), allreduce_ranks."""
        out: dict[str, Any] = {}
        for obj, key, name in (("bench", "checksum_mode", "checksum_mode"),
                               ("bench", "checksum_overhead", "checksum_overhead"),
                               ("bench/layer_per_rank", "imbalance", "imbalance"),
                               ("bench/allreduce", "ranks", "allreduce_ranks")):
            if obj in self.h5 and key in self.h5[obj].attrs:
                out[name] = scalar(h5safe.attr(self.h5[obj], key), f"attribute '{key}' of /{obj}")
        return out


def promised(f: Any, config: dict | None) -> list[str]:
    """A bench file holds its measurements (``/bench``)."""
    return [] if "bench" in f else ["group /bench is missing (a bench file's measurements)"]
