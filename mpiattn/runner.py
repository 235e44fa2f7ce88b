"""The main job, ``mpiattn run``: sharded forward pass of the encoder, written to HDF5.

    mpiexec -n 4 mpiattn run                       # embedded BERT-base default
    mpiexec -n 3 mpiattn run jobs/configs/minilm.toml -o minilm.h5

Decided once, near the top (the job kit: ``jobkit`` agrees, ``placement`` places): the
process grid, the backend, this rank's heads. Below that the model code runs unchanged on
any number of ranks, and only rank 0 prints or writes (the file layout is ``layout``'s).
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, h5io, jobkit
from .backend import erf, to_host
from .config import Config, check_world
from .data import Batch, load_batch
from .errors import ConfigError
from .faults import FaultyPhases, crash_points, slowdown
from .layout import PHASES, write_run
from .model import SITES, PhaseTimer, encoder_forward, mean_pool
from .placement import (
    Plan,
    apply_checkpoint_shape,
    attention_options,
    load_shards,
    make_reducer,
    place,
)


def check_inputs(cfg: Config, world_size: int, rank: int) -> tuple[tuple[int, Batch], dict]:
    """Every local check of a run, with no collective: ((tensor, batch), input digests).

    Raises UserError (or ValueError) for the pre-flight to agree on.
    """
    from .checksum import parse_faults

    apply_checkpoint_shape(cfg)
    tensor, _ = check_world(cfg, world_size)
    batch = load_batch(cfg)
    replicas = world_size // tensor
    if replicas > batch.shape[0]:
        raise ConfigError(f"{replicas} data-parallel replicas for {batch.shape[0]} sequences:"
                          " raise parallel.tensor or give more input")
    crash_points(cfg, rank)  # validates fault.crash, fault.slow and fault.inject
    slowdown(cfg, rank)
    parse_faults(cfg.fault.inject, SITES)
    return (tensor, batch), jobkit.input_digests(cfg)


def setup(cfg: Config, world: Any, out_path: str, force: bool) -> tuple:
    """(plan, reducer, output reservation on rank 0) after the collective pre-flight."""
    (tensor, batch), out = jobkit.preflight(
        world, lambda: check_inputs(cfg, world.Get_size(), world.Get_rank()),
        output=(out_path, force))
    jobkit.set_timeout(cfg.comm.timeout)
    p = place(cfg, world, tensor, batch)
    return p, make_reducer(cfg, p), out


def run(cfg: Config, world: Any, out_path: str, force: bool) -> Path | None:
    """The whole job on every rank; returns the output path on rank 0."""
    started = dt.datetime.now(dt.timezone.utc)
    wall0 = time.perf_counter()
    p, reducer, out = setup(cfg, world, out_path, force)
    try:
        return _run(cfg, world, p, reducer, out, started, wall0)
    finally:
        if out is not None:
            out.discard()


def _run(cfg: Config, world: Any, p: Plan, reducer: Any, out: Any, started: dt.datetime,
         wall0: float) -> Path | None:
    from .comm import check_finite, gather_rows

    rank = world.Get_rank()
    crashes, slow = crash_points(cfg, rank), slowdown(cfg, rank)
    grid, backend, xp = p.grid, p.backend, p.backend.xp
    count, start = p.rows
    mine = p.batch.rows(start, count)

    t0 = time.perf_counter()
    erf(xp.zeros(1, dtype=np.dtype(cfg.dtype)))  # loads the erf kernel outside the timings
    emb, layers = load_shards(cfg, p, world, range(cfg.model.layers))
    ids, mask = xp.asarray(mine.ids), xp.asarray(mine.mask)
    types = None if mine.types is None else xp.asarray(mine.types)
    setup_s = time.perf_counter() - t0

    # --- forward ------------------------------------------------------------------------
    keep = {"all": range(cfg.model.layers), "last": [cfg.model.layers - 1], "none": []}[
        cfg.output.layers]
    leader = grid.coord("tensor") == 0  # one copy of each replica's results leaves the group
    outputs: dict[tuple[int, str], np.ndarray] = {}
    timer = PhaseTimer(backend.timer(), PHASES)

    def on_layer(i: int, attn: Any, hidden: Any) -> None:
        if cfg.check.finite != "off":
            check_finite(world, attn, i, "attention")
            check_finite(world, hidden, i, "mlp")
        if cfg.checksum.mode == "abft" and cfg.checksum.hash_every == "layer":
            reducer.check_agreement(hidden, site="hidden", layer=i)
        if leader and i in keep:
            outputs[(i, "attention")] = to_host(attn)
            outputs[(i, "hidden")] = to_host(hidden)

    world.Barrier()
    t_fwd = time.perf_counter()
    hidden = encoder_forward(ids, mask, emb, layers, reducer, cfg.model.layer_norm_eps,
                             FaultyPhases(timer, crashes, rank, slow) if crashes or slow > 1
                             else timer, on_layer,
                             attention_options(cfg, p), cfg.parallel.overlap, types)
    if cfg.checksum.mode == "abft" and cfg.checksum.hash_every == "end":
        reducer.check_agreement(hidden, site="hidden", layer=cfg.model.layers - 1)
    pooled = to_host(mean_pool(hidden, mask))
    backend.sync()
    forward_s = time.perf_counter() - t_fwd

    # --- gather to rank 0 ---------------------------------------------------------------
    seconds = np.zeros((cfg.model.layers, len(PHASES)))
    for (layer, phase), s in timer.seconds.items():
        seconds[layer, PHASES.index(phase)] += s
    all_seconds = gather_rows(world, seconds[None])
    per_rank = np.array([[forward_s, setup_s, time.perf_counter() - wall0,
                          backend.memory_high_water()]])
    all_totals = gather_rows(world, per_rank)
    host_info = world.gather((socket.gethostname(), backend.device))
    gathered: dict[tuple[int, str], np.ndarray] = {}
    pooled_all, records = None, []
    parallel = grid.axis_size("data") > 1 and h5io.has_parallel_hdf5()
    if leader and parallel:  # every replica writes its own rows into one file (mpio)
        tmp = grid.comm("data").bcast(str(out.create()) if rank == 0 else None)
        rows = {f"{h5io.layer_group(i)}/{name}": a for (i, name), a in outputs.items()}
        if p.batch.text is not None:
            rows["output/pooled"] = pooled
        h5io.write_rows_parallel(tmp, grid.comm("data"), p.rows[1], p.batch.shape[0], rows)
    elif leader:  # replica leaders send their batch rows to rank 0, in replica order
        for key in sorted(outputs):
            gathered[key] = gather_rows(grid.comm("data"), outputs[key])
        pooled_all = gather_rows(grid.comm("data"), pooled)
    if leader:
        records = grid.comm("data").gather([(grid.coord("data"), r) for r in reducer.records])


    def write() -> Path:
        writing = h5io.atomic_update(out) if parallel else h5io.atomic_file(out)
        with writing as f:
            f.attrs["write_mode"] = (f"mpio, {grid.axis_size('data')} writers" if parallel
                                     else "gathered to rank 0")
            write_run(f, cfg, p, gathered, pooled_all, all_seconds, all_totals, host_info,
                      [item for part in records for item in part], started)
        print_summary(cfg, p, all_seconds, all_totals, out.path)
        return out.path

    return jobkit.conclude(world, write if rank == 0 else None)


def print_summary(cfg: Config, p: Plan, seconds: np.ndarray, totals: np.ndarray,
                  path: Path) -> None:
    m = cfg.model
    b, s = p.batch.shape
    print(f"mpiattn {__version__}: {m.layers} layers, {m.heads} heads, hidden {m.hidden},"
          f" ffn {m.ffn}; batch {b} x seq {s}, {cfg.dtype}, {p.backend.name}")
    data, tensor = p.grid.axis_size("data"), p.grid.axis_size("tensor")
    print(f"ranks {p.grid.size} = {data} data x {tensor} head;"
          f" heads per rank {p.head_counts}; BLAS threads/rank {p.threads or '-'}")
    phase_total = seconds.sum(axis=1).mean(axis=0)  # mean over ranks, per phase
    share = phase_total / max(phase_total.sum(), 1e-12)
    parts = ", ".join(f"{name} {100 * x:.0f}%" for name, x in zip(PHASES, share, strict=True))
    print(f"forward {totals[:, 0].max():.3f} s (max over ranks), setup"
          f" {totals[:, 1].max():.3f} s, wall {totals[:, 2].max():.3f} s, peak memory"
          f" {totals[:, 3].max() / 2**30:.2f} GiB/rank")
    print(f"time per phase: {parts}")
    print(f"wrote {path}")
