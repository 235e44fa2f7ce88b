"""The main job, ``mpiattn run``: sharded forward pass of the encoder, written to HDF5.

    mpiexec -n 4 mpiattn run                       # embedded BERT-base default
    mpiexec -n 3 mpiattn run jobs/configs/minilm.toml -o minilm.h5

Decided once, near the top (the job kit: ``jobkit`` agrees, ``placement`` places): the
process grid, the backend, this rank's heads. Below that the model code runs unchanged on
any number of ranks, and only rank 0 prints or writes (the file layout is ``layout``'s).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..core.backend import erf, to_host
from ..core.headstats import HeadResults, HeadStats, assemble, rank_sums
from ..core.model import PhaseTimer, encoder_forward
from ..core.pipeline import PHASES as PIPELINE_PHASES
from ..core.pipeline import stage_forward, stage_layers
from ..core.pooling import default_pipeline
from ..core.seqattn import PHASES as SEQUENCE_PHASES
from ..errors import ConfigError
from ..inputs.data import Batch, load_batch
from ..io import h5io
from ..io.formats.common import PHASES
from ..io.formats.run import RunData, write_run
from ..io.stmodules import sentence_pipeline
from ..parallel.faults import FaultyPhases, check_fault_targets, crash_points, slowdown
from ..version import __version__
from . import epilogue, jobkit
from .placement import (
    RUN_SITES,
    Finished,
    Placement,
    attention_options,
    check_sequence,
    finish_config,
    load_shards,
    make_p2p,
    make_reducer,
    make_sequence,
    place,
)
from .warmup import warm_up

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


def check_inputs(cfg: Config, world_size: int, rank: int,
                 command: str = "run") -> tuple[tuple[Finished, Batch], dict]:
    """Every local check of a run (or a bench: ``command``), with no collective: ((the
    finished config's derived values, batch), input digests).

    Raises UserError (or ValueError) for the pre-flight to agree on.
    """
    finished = finish_config(cfg, world_size, command, RUN_SITES)
    tensor = finished.tensor
    if command == "run":  # refused here, before any work, when the folder's are not built
        sentence_pipeline(cfg.model.weights, cfg.model.hidden)
    elif cfg.input.prompt:
        raise ConfigError(f"input.prompt is put before every line by text runs (mpiattn run)"
                          f" only, not by mpiattn {command}: remove it")
    batch = load_batch(cfg)
    check_sequence(cfg, tensor, batch.shape[1], command)
    replicas = world_size // (tensor * cfg.parallel.pipeline * cfg.parallel.sequence)
    if replicas > batch.shape[0]:
        raise ConfigError(f"{replicas} data-parallel replicas for {batch.shape[0]} sequences:"
                          " raise parallel.tensor or give more input")
    beyond = [i for i in cfg.output.attention_maps if i >= batch.shape[0]]
    if beyond:
        raise ConfigError(f"output.attention_maps asks for sequence(s) {beyond}, but the input"
                          f" has {batch.shape[0]} (indices 0 .. {batch.shape[0] - 1})")
    check_fault_targets(cfg, world_size)
    return (finished, batch), jobkit.input_digests(cfg)


def setup(cfg: Config, world: MPI.Comm, out_path: str, force: bool, command: str = "run",
          extra: Callable[[], None] | None = None) -> tuple:
    """(plan, reducer, output reservation on rank 0) after the collective pre-flight;
    ``extra``: the command's own local checks, agreed with the others."""

    def checks() -> tuple[tuple[Finished, Batch], dict]:
        found = check_inputs(cfg, world.Get_size(), world.Get_rank(), command)
        if extra is not None:
            extra()
        return found

    (finished, batch), out = jobkit.preflight(world, checks, output=(out_path, force))
    jobkit.set_timeout(cfg.comm.timeout)
    p = place(cfg, world, finished, batch)
    return p, make_reducer(cfg, p), out


def run(cfg: Config, world: MPI.Comm, out_path: str, force: bool,
        resume: str | None = None) -> Path | None:
    """The whole job on every rank; returns the output path on rank 0. Text input is
    streamed (``encode``; ``resume`` continues an interrupted one); seeded and HDF5 token
    input run as one batch."""
    if cfg.input.text:
        from .encode import run_text

        return run_text(cfg, world, out_path, force, resume)
    if resume is not None:
        raise ConfigError("--resume continues an interrupted text run (input.text); this"
                          " job runs as one batch: run it again without --resume")
    started = dt.datetime.now(dt.UTC)
    wall0 = time.perf_counter()
    p, reducer, out = setup(cfg, world, out_path, force)
    try:
        return _run(cfg, world, p, reducer, out, started, wall0)
    finally:
        if out is not None:
            out.discard()


def _run(cfg: Config, world: MPI.Comm, p: Placement, reducer: Any, out: Any, started: dt.datetime,
         wall0: float) -> Path | None:
    from ..parallel.comm import check_finite, gather_rows

    rank = world.Get_rank()
    crashes, slow = crash_points(cfg, rank), slowdown(cfg, rank)
    grid, backend, xp = p.grid, p.backend, p.backend.xp
    stages, stage = grid.axis_size("pipeline"), grid.coord("pipeline")
    count, start = p.rows
    mine = p.batch.rows(start, count)

    t0 = time.perf_counter()
    pipe = sentence_pipeline(cfg.model.weights, cfg.model.hidden)  # checked in the pre-flight
    erf(xp.zeros(1, dtype=np.dtype(cfg.dtype)))  # loads the erf kernel outside the timings
    my_layers = stage_layers(cfg.model.layers, stages, stage)
    sequence = make_sequence(cfg, p, p.batch.shape[1])
    tokens = slice(None) if sequence is None else sequence.split.local  # this rank's slice
    # only the word rows of this rank's tokens (a BERT batch uses a few thousand of 30,522)
    vocab_rows = np.unique(mine.ids[:, tokens])
    emb, layers = load_shards(cfg, p, world, my_layers, vocab_rows)
    ids = xp.asarray(np.searchsorted(vocab_rows, mine.ids[:, tokens]))
    mask = xp.asarray(mine.mask)  # the mask: every key
    types = None if mine.types is None else xp.asarray(mine.types[:, tokens])
    options, eps = attention_options(cfg, p), cfg.model.layer_norm_eps
    if stages == 1 and sequence is None and layers and count:  # first calls: setup
        warm_up(layers[0], options, reducer, count, mine.ids.shape[1], cfg.model.hidden,
                np.dtype(cfg.dtype), eps)
    backend.sync()  # the setup's device work counts as setup, not as forward
    setup_s = time.perf_counter() - t0

    # --- forward ------------------------------------------------------------------------
    keep = {"all": range(cfg.model.layers), "last": [cfg.model.layers - 1], "none": []}[
        cfg.output.layers]
    leader = grid.coord("tensor") == 0  # one copy of each replica's results leaves the group
    outputs: dict[tuple[int, str], np.ndarray] = {}
    phases = (PHASES + (PIPELINE_PHASES if stages > 1 else ())
              + (SEQUENCE_PHASES if sequence is not None else ()))
    timer = PhaseTimer(backend.timer(), phases)
    # a stage's layers are its own: only its head group checks them together
    finite_comm = world if stages == 1 else grid.comm("tensor")

    def on_layer(i: int, rows: slice, attn: Any, hidden: Any) -> None:
        if cfg.check.finite != "off":
            check_finite(finite_comm, i, attention=attn, mlp=hidden)  # one read, one Allreduce
        if cfg.checksum.mode == "abft" and cfg.checksum.hash_every == "layer":
            reducer.check_agreement(hidden, site="hidden", layer=i)
        if leader and i in keep:
            for name, a in (("attention", attn), ("hidden", hidden)):
                if rows == slice(None):  # the whole batch at once: keep it as it is
                    outputs[(i, name)] = to_host(a)
                else:  # one micro-batch of it
                    whole = outputs.setdefault((i, name), np.empty((count, *a.shape[1:]),
                                                                   dtype=a.dtype))
                    whole[rows] = to_host(a)

    phase = FaultyPhases(timer, crashes, rank, slow) if crashes or slow > 1 else timer
    stats = None  # per-head statistics and maps of this rank's heads (opt-in: they cost time)
    if cfg.output.head_stats or cfg.output.attention_maps:
        stats = HeadStats(xp, cfg.model.layers, p.shard.start, p.shard.count, first_row=start,
                          stats=cfg.output.head_stats,
                          map_sequences=tuple(cfg.output.attention_maps))
    options.sequence = sequence
    if sequence is not None:  # its transfers, out of the attention phase
        sequence.phase = phase
    p2p = make_p2p(cfg, p) if stages > 1 else None
    world.Barrier()
    t_fwd = timer.timer.mark()  # CuPy: an event; the forward's end is one too
    if stages == 1:
        hidden = encoder_forward(ids, mask, emb, layers, reducer, eps, phase,
                                 lambda i, a, h: on_layer(i, slice(None), a, h), options,
                                 cfg.parallel.overlap, types, stats)
    else:
        finals = stage_forward(ids, mask, types, emb, dict(zip(my_layers, layers, strict=True)),
                               reducer, eps, stage, stages, p2p, cfg.parallel.microbatches,
                               phase, on_layer, options, cfg.parallel.overlap, stats)
        hidden = xp.concatenate([h for _, h in finals]) if finals else None
    pooled = None
    if hidden is not None:  # the last stage
        if cfg.checksum.mode == "abft" and cfg.checksum.hash_every == "end":
            reducer.check_agreement(hidden, site="hidden", layer=cfg.model.layers - 1)
        if sequence is None:
            pooled = to_host(pipe(hidden, mask))
    forward_s = timer.timer.between(t_fwd, timer.timer.mark())
    if sequence is not None and leader:  # the slices of the tokens to the group's first rank
        outputs, pooled = gather_tokens(grid.comm("sequence"), outputs, hidden, mask, pipe)

    # --- gather to rank 0 ---------------------------------------------------------------
    seconds = np.zeros((cfg.model.layers, len(phases)))
    for (layer, name), s in timer.seconds.items():
        seconds[layer, phases.index(name)] += s
    all_seconds = gather_rows(world, seconds[None])
    per_rank = np.array([[forward_s, setup_s, time.perf_counter() - wall0,
                          backend.memory_high_water()]])
    all_totals = gather_rows(world, per_rank)
    heads = gather_heads(world, cfg, stats) if stats is not None else None  # rank 0's
    if leader and stages > 1:  # every stage's layers (and the last one's pooling) to stage 0
        parts = grid.comm("pipeline").gather((outputs, pooled), root=0)
        if stage == 0:
            outputs = {k: v for part, _ in parts for k, v in part.items()}
            pooled = parts[-1][1]
    gathered: dict[tuple[int, str], np.ndarray] = {}
    pooled_all = None
    writer = leader and stage == 0 and grid.coord("sequence") == 0  # one per replica
    parallel = (grid.axis_size("data") > 1 and stages == 1 and grid.axis_size("sequence") == 1
                and h5io.has_parallel_hdf5())
    if writer and parallel:  # every replica writes its own rows into one file (mpio)
        tmp = grid.comm("data").bcast(str(out.create()) if rank == 0 else None)
        rows = {f"{h5io.layer_group(i)}/{name}": a for (i, name), a in outputs.items()}
        if p.batch.text is not None:
            rows["output/pooled"] = pooled
        h5io.write_rows_parallel(tmp, grid.comm("data"), p.rows[1], p.batch.shape[0], rows)
    elif writer:  # replica leaders send their batch rows to rank 0, in replica order
        for key in sorted(outputs):
            gathered[key] = gather_rows(grid.comm("data"), outputs[key])
        pooled_all = gather_rows(grid.comm("data"), pooled)
    # a head group's Allreduce records are alike on all its ranks; every rank's own
    # messages between stages are its own
    # messages between stages and sequence slices are every rank's own
    transfers = ((reducer.records if leader else []) + (p2p.records if p2p is not None else [])
                 + (sequence.transfer.records if sequence is not None else []))
    records = epilogue.gather_records(world, [(grid.coord("data"), r) for r in transfers])

    def write(f: Any) -> None:
        f.attrs["write_mode"] = (f"mpio, {grid.axis_size('data')} writers" if parallel
                                 else "gathered to rank 0")
        write_run(f, cfg, RunData(
            p.batch.ids, p.batch.mask, p.batch.types, p.batch.text, gathered, pooled_all,
            all_seconds, all_totals, records, phases, heads() if heads is not None else None))

    def summary() -> Path:
        print_summary(cfg, p, all_seconds, all_totals, out.path, phases)
        return out.path

    return epilogue.finish(world, out, cfg, p, started, "run", write, after=summary,
                           opener=h5io.atomic_update if parallel else h5io.atomic_file)


def gather_tokens(comm: MPI.Comm, outputs: dict[tuple[int, str], np.ndarray], hidden: Any,
                  key_mask: Any, pipe: Any = None
                  ) -> tuple[dict[tuple[int, str], np.ndarray], np.ndarray | None]:
    """Collective over a sequence group (one gather): every rank's token slices of the kept
    layers and of the last hidden state to the group's rank 0, joined along the sequence in
    rank order; there, the pooled embedding of the whole sequences (None on
    the other ranks and on stages without the last layer); ``pipe``: the
    ``pooling.Pipeline`` (default: mean pooling, Normalize)."""
    last = None if hidden is None else to_host(hidden)
    parts = comm.gather((outputs, last), root=0)
    if comm.Get_rank() != 0:
        return {}, None
    joined = {key: np.concatenate([part[key] for part, _ in parts], axis=1) for key in outputs}
    if last is None:
        return joined, None
    whole = np.concatenate([h for _, h in parts], axis=1)
    pipe = default_pipeline() if pipe is None else pipe
    return joined, to_host(pipe(whole, to_host(key_mask)))


def gather_heads(world: MPI.Comm, cfg: Config, stats: HeadStats
                 ) -> Callable[[], HeadResults] | None:
    """Collective over ``world``, after the forward: every rank's sums (one Gatherv) and
    map pieces (one gather) to rank 0. Rank 0 gets the function that combines them (run
    inside its write, whose failure all ranks agree on); None elsewhere."""
    from ..parallel.comm import gather_rows

    sums = (gather_rows(world, rank_sums(stats, cfg.model.heads)[None]) if stats.stats
            else None)
    pieces = world.gather([(g, layer, stats.first_head, probs)
                           for (g, layer), probs in stats.host_maps().items()])
    if world.Get_rank() != 0:
        return None
    return lambda: assemble(sums, [piece for part in pieces for piece in part],
                            list(cfg.output.attention_maps), cfg.model.layers,
                            cfg.model.heads)


def print_summary(cfg: Config, p: Placement, seconds: np.ndarray, totals: np.ndarray,
                  path: Path, phases: tuple[str, ...] = PHASES) -> None:
    m = cfg.model
    b, s = p.batch.shape
    print(f"mpiattn {__version__}: {m.layers} layers, {m.heads} heads, hidden {m.hidden},"
          f" ffn {m.ffn}; batch {b} x seq {s}, {cfg.dtype}, {p.backend.name}")
    data, tensor = p.grid.axis_size("data"), p.grid.axis_size("tensor")
    stages = p.grid.axis_size("pipeline")
    staged = f" x {stages} stages ({cfg.parallel.microbatches} micro-batches)" if stages > 1 else ""
    sequence = p.grid.axis_size("sequence")
    if sequence > 1:
        from ..core.seqattn import resolve

        algorithm = resolve(cfg.attention.sequence, min(p.head_counts), sequence)
        staged += f" x {sequence} sequence ({algorithm})"
    print(f"ranks {p.grid.size} = {data} data{staged} x {tensor} head;"
          f" heads per rank {p.head_counts}; BLAS threads/rank {p.threads or '-'}")
    phase_total = seconds.sum(axis=1).mean(axis=0)  # mean over ranks, per phase
    share = phase_total / max(phase_total.sum(), 1e-12)
    parts = ", ".join(f"{name} {100 * x:.0f}%" for name, x in zip(phases, share, strict=True))
    print(f"forward {totals[:, 0].max():.3f} s (max over ranks), setup"
          f" {totals[:, 1].max():.3f} s, wall {totals[:, 2].max():.3f} s, peak memory"
          f" {totals[:, 3].max() / 2**30:.2f} GiB/rank")
    print(f"time per phase: {parts}")
    print(f"wrote {path}")
