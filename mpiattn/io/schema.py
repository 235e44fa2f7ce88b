"""The HDF5 layout of the files mpiattn writes: what goes where, with which dimensions
and units. The mechanics (atomic publishing, digests, chunking, dimension scales) are
``h5io``'s.

Dimension names (format 2; README, "HDF5 file"): one name is one length in a file, so
axes of different lengths have different names (``step`` of the history, ``eval_step`` of
the held-out evaluations, ``session_step`` of the timed steps). Units are UDUNITS-2
strings (``s``, ``bytes``, ``bytes/s``, ``1/s``, ``1``); what a dimensionless number
counts (FLOP, nats, token positions) is in its ``long_name``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Config
from ..core.attention import Options
from ..core.backend import blas_info
from ..core.headstats import HeadResults
from ..version import __version__
from . import h5io
from .collectives import RECORD_DTYPE, SITE_BYTES, site_codes, site_names  # noqa: F401 (re-exported)

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from ..commands.placement import Placement


PHASES = ("qkv", "attention", "out_proj", "allreduce", "norm", "mlp")  # run and bench


INPUTS: dict[str, str] = {}  # label -> SHA-256 of every input the job read (``jobkit``)


def record_inputs(digests: dict[str, str]) -> None:
    """Remember the agreed digests of the job's inputs (the resolved config and command
    line excluded), written by ``write_provenance`` as the root attribute ``input_digests``
    (JSON text: label -> SHA-256 hex; ``mpiattn verify --inputs`` lists it)."""
    INPUTS.clear()
    INPUTS.update({k: v for k, v in digests.items() if not k.startswith("the ")})


def write_provenance(f: Any, cfg: Config, p: Placement, started: dt.datetime, command: str,
                     host_info: list) -> None:
    """Root attributes and /ranks: what ran, where, with which libraries (every file)."""
    from mpi4py import MPI

    f.attrs.update({
        "mpiattn_version": __version__, "format_version": h5io.FORMAT_VERSION,
        "command": command, "config": cfg.to_toml(), "world_size": p.grid.size,
        "tensor_parallel": p.grid.axis_size("tensor"), "data_parallel": p.grid.axis_size("data"),
        "pipeline_parallel": p.grid.axis_size("pipeline"),
        "sequence_parallel": p.grid.axis_size("sequence"),
        "head_partition": np.array(p.head_counts), "backend": p.backend.name,
        "cuda_aware": ("yes" if p.cuda_aware else "no (pinned host staging)")
        if p.backend.is_gpu else "n/a (host arrays)",
        "timing": p.backend.timer().method,  # "cuda events" on CuPy, else the host clock
        "mpi_library": MPI.Get_library_version().replace("\x00", "").strip(),
        "blas": str(blas_info()),
        "blas_threads_per_rank": p.threads, "start_time": started.isoformat(),
    })
    if INPUTS:
        import json

        f.attrs["input_digests"] = json.dumps(INPUTS, sort_keys=True)
    impl, block = Options.configured(cfg.attention.impl, cfg.attention.block,
                                     p.threads).resolve(p.batch.shape[1])
    f.attrs["attention"] = impl if impl == "plain" else f"{impl} (block {block})"
    parts = p.grid.axis_size("sequence")
    if parts > 1:
        from ..core.seqattn import SequenceSplit, resolve

        if resolve(cfg.attention.sequence, min(p.head_counts), parts) == "ulysses":
            f.attrs["attention"] += ", sequence parallel: ulysses"
        else:  # the ring runs the blocked online softmax on each slice (make_sequence)
            widest = SequenceSplit(p.batch.shape[1], parts, 0).widest
            f.attrs["attention"] = (f"blocked (block {cfg.attention.block or min(512, widest)}),"
                                    " sequence parallel: ring")
    h5io.dimension(f, "rank", np.arange(p.grid.size), long_name="rank in MPI_COMM_WORLD")
    ranks = f.create_group("ranks")
    h5io.write_array(ranks, "host", [h for h, _ in host_info], ("rank",))
    h5io.write_array(ranks, "device", [d for _, d in host_info], ("rank",))


def write_run(f: Any, cfg: Config, p: Placement, outputs: dict, pooled: np.ndarray,
              seconds: np.ndarray, totals: np.ndarray, host_info: list, records: list,
              started: dt.datetime, phases: tuple[str, ...] = PHASES,
              heads: HeadResults | None = None) -> None:
    comp = cfg.output.compression
    write_provenance(f, cfg, p, started, "run", host_info)
    inp = f.create_group("input")
    h5io.write_array(inp, "tokens", p.batch.ids, ("batch", "seq"), comp, digest=True)
    h5io.write_array(inp, "attention_mask", p.batch.mask.astype(np.uint8), ("batch", "seq"),
                     comp, digest=True)
    if p.batch.types is not None:  # only when the input had them (absent: all 0)
        h5io.write_array(inp, "token_type_ids", p.batch.types, ("batch", "seq"), comp,
                         digest=True)
    if p.batch.text is not None:
        h5io.write_array(inp, "text", list(p.batch.text), ("batch",)).attrs[
            h5io.DIGEST_ATTR] = h5io.text_sha256(p.batch.text)
    if pooled is not None and p.batch.text is not None:
        h5io.write_array(f.require_group("output"), "pooled", pooled, ("batch", "hidden_unit"),
                         comp, digest=True)
    for (layer, name), array in sorted(outputs.items()):
        g = f.require_group(h5io.layer_group(layer))
        h5io.write_array(g, name, array, ("batch", "seq", "hidden_unit"), comp, digest=True)
    written_in_parallel = [d for d in ("output/pooled", "layers") if d in f and not outputs]
    for top in written_in_parallel:  # label and digest what the replicas wrote (mpio)
        h5io.label_and_digest(f[top])
    if "output/pooled" in f:
        from .stmodules import sentence_pipeline

        pipe = sentence_pipeline(cfg.model.weights, cfg.model.hidden)
        f["output/pooled"].attrs.update({
            "description": "the last layer through the model's sentence-transformers modules",
            "modules": pipe.describe(), "modules_source": pipe.source})
    t = f.create_group("timings")
    write_phase_seconds(t, seconds, ("rank", "layer", "phase"), phases)
    for i, name in enumerate(("forward", "setup", "total")):
        h5io.write_array(t, name, totals[:, i], ("rank",), units="s")
    h5io.write_array(f["ranks"], "peak_memory", totals[:, 3].astype(np.int64), ("rank",),
                     units="bytes", description="peak RSS (CPU) or CuPy pool total (GPU)")
    if records:
        write_records(f, records)
    if heads is not None:
        write_heads(f, heads, comp)
    f.attrs["end_time"] = dt.datetime.now(dt.UTC).isoformat()
    f.attrs["status"] = "complete"


def write_phase_seconds(g: Any, seconds: np.ndarray, dims: tuple[str, ...],
                        phases: tuple[str, ...] | list[str], **attrs: Any) -> None:
    """``seconds`` per phase in ``g``, the last axis a ``phase`` coordinate of the names
    (and, for readers of format 1, the same names in the attribute ``phases``)."""
    h5io.write_array(g, "seconds", seconds, dims, coords={"phase": list(phases)},
                     phases=list(phases), units="s", **attrs)


HEADS_DEFINITION = (
    "Clark et al. 2019, 'What Does BERT Look At?': for query token i of a head, with p_ij"
    " its attention probability on key j (0 on padding keys), entropy H_i = -sum_j p_ij"
    " ln p_ij and distance D_i = sum_j p_ij |i - j| (token positions); each (layer, head)"
    " value is the mean over the real query tokens of every sequence of the run")


def write_heads(f: Any, r: HeadResults, compression: str = "none") -> None:
    """``/heads``: entropy and distance (layer, head) float64 means (``output.head_stats``),
    and the attention probabilities of the chosen sequences (``output.attention_maps``)."""
    g = f.create_group("heads")
    g.attrs["definition"] = HEADS_DEFINITION
    if r.entropy is not None and r.distance is not None:
        g.attrs["query_tokens"] = r.query_tokens
        h5io.write_array(g, "entropy", r.entropy, ("layer", "head"), digest=True,
                         units="1", long_name="mean attention entropy in nats",
                         description="mean attention entropy over real query tokens:"
                         " -sum_j p_ij ln p_ij (natural logarithm: nats)")
        h5io.write_array(g, "distance", r.distance, ("layer", "head"), digest=True,
                         units="1", long_name="mean attention distance in token positions",
                         description="mean attention distance over real query tokens:"
                         " sum_j p_ij |i - j| (token positions)")
    if r.maps is not None:
        rows = np.array(r.sequences, dtype=np.int64)
        h5io.write_array(g, "sequences", rows, ("sequence",), digest=True,
                         coords={"sequence": rows},
                         description="row of /input/tokens of each map")
        h5io.write_array(g, "maps", r.maps, ("sequence", "layer", "head", "query", "key"),
                         compression, digest=True, units="1",
                         description="attention probabilities p_ij (rows sum to 1; 0 on"
                         " padding keys; padding query rows attend to the real keys)")


def write_records(f: Any, records: list) -> None:
    table = np.zeros(len(records), dtype=RECORD_DTYPE)
    for field, getter in (("replica", lambda q, r: q), ("layer", lambda q, r: r.layer),
                          ("residual", lambda q, r: r.residual),
                          ("bound", lambda q, r: r.bound), ("ratio", lambda q, r: r.ratio),
                          ("passed", lambda q, r: r.passed),
                          ("retries", lambda q, r: r.retries),
                          ("digest", lambda q, r: r.digest), ("chunk", lambda q, r: r.chunk)):
        table[field] = [getter(q, r) for q, r in records]
    table["site"] = site_codes([r.site for _, r in records])
    g = f.require_group("checksum")
    h5io.write_array(g, "collectives", table, ("record",),
                     description="one row per validated Allreduce; ratio = residual/bound")


# --- bench files --------------------------------------------------------------------------


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
    fh.attrs["end_time"] = dt.datetime.now(dt.UTC).isoformat()
    fh.attrs["status"] = "complete"


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
    fh.attrs["end_time"] = dt.datetime.now(dt.UTC).isoformat()
    fh.attrs["status"] = "complete"


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
    fh.attrs["end_time"] = dt.datetime.now(dt.UTC).isoformat()
    fh.attrs["status"] = "complete"


# --- training files -----------------------------------------------------------------------

TRAIN_PHASES = ("forward", "backward", "allreduce", "optimizer", "checkpoint")


def write_train(f: Any, history: Any, attrs: dict, seconds: np.ndarray, totals: np.ndarray,
                records: list, first_step: int, status: str) -> None:
    """``/train`` (per-step history, ``attrs``), per-rank per-step timings, records;
    ``status`` "complete" or "interrupted" (a stopped run's output so far)."""
    g = f.create_group("train")
    history.write(g)
    g.attrs.update(attrs)
    tg = f.create_group("timings")
    h5io.dimension(tg, "session_step", first_step + np.arange(seconds.shape[1]),
                   long_name="optimizer step timed by this session (from first_step on)")
    write_phase_seconds(tg, seconds, ("rank", "session_step", "phase"), TRAIN_PHASES,
                        first_step=first_step)
    h5io.write_array(tg, "total", totals, ("rank",), units="s")
    if records:
        write_records(f, records)
    f.attrs["end_time"] = dt.datetime.now(dt.UTC).isoformat()
    f.attrs["status"] = status
