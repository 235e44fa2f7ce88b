"""The main job, ``mpiattn run``: sharded forward pass of the encoder, written to HDF5.

    mpiexec -n 4 mpiattn run                       # embedded BERT-base default
    mpiexec -n 3 mpiattn run jobs/configs/minilm.toml -o minilm.h5

Decided once, near the top: the topology, the backend, this rank's heads. Below that the
model code runs unchanged on any number of ranks, and only rank 0 prints or writes.
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, h5io, jobkit
from .attention import Options
from .backend import (
    Backend,
    blas_info,
    erf,
    limit_blas_threads,
    oversubscription,
    select,
    to_host,
)
from .config import Config, check_world, coerce, validate
from .data import Batch, load_batch
from .errors import ConfigError, InputError, UserError
from .model import SITES, PhaseTimer, encoder_forward, mean_pool
from .shard import HeadShard, counts, head_shard, partition
from .weights import checkpoint_shape, open_source, resolve_weights

PHASES = ("qkv", "attention", "out_proj", "allreduce", "norm", "mlp")


def apply_checkpoint_shape(cfg: Config) -> None:
    """Take model.* from the checkpoint's config.json; an explicit different value is an error."""
    if not cfg.model.weights:
        return
    path = resolve_weights(cfg.model.weights)
    shape = checkpoint_shape(path)
    for key, raw in shape.items():
        dotted = f"model.{key}"
        current = getattr(cfg.model, key)
        try:
            value = coerce(dotted, raw, type(current))
        except ConfigError as err:
            raise InputError(f"'{path.parent / 'config.json'}': {err}") from None
        if dotted in cfg.explicit and current != value:
            raise ConfigError(
                f"{dotted} = {current} but the checkpoint has {value}: remove {dotted}"
                " from the config or load a matching checkpoint"
            )
        setattr(cfg.model, key, value)
    validate(cfg)  # e.g. input.seq_len against the checkpoint's max_positions


@dataclass
class Plan:
    """Everything decided before the first FLOP."""

    cfg: Config
    grid: Any
    backend: Backend
    shard: HeadShard
    head_counts: list[int]
    batch: Batch  # the whole batch
    rows: tuple[int, int]  # (count, start) of this replica's sequences
    threads: int
    limiter: Any = field(repr=False, default=None)


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


def place(cfg: Config, world: Any, tensor: int, batch: Batch) -> Plan:
    """Process grid, backend, BLAS threads and this rank's heads and rows (run and train)."""
    from .grid import GridShape, make_grid

    grid = make_grid(world, GridShape.of(world.Get_size(), tensor))
    backend = select(cfg.backend, grid.local_rank)
    threads, limiter = limit_blas_threads(grid.local_size) if not backend.is_gpu else (0, None)
    warning = oversubscription(grid.local_size, threads) if threads else None
    if warning and world.Get_rank() == 0:
        print(warning, file=sys.stderr, flush=True)
    m = cfg.model
    head_counts = counts(m.heads, tensor)
    if cfg.parallel.balance == "measured" and tensor > 1:
        head_counts = calibrated_counts(cfg, grid, backend, batch)
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, tensor, grid.coord("tensor"),
                       head_counts)
    rows = partition(batch.shape[0], grid.axis_size("data"), grid.coord("data"))
    return Plan(cfg, grid, backend, shard, head_counts, batch, rows, threads, limiter)


def slowdown(cfg: Config, rank: int) -> float:
    """How many times slower ``fault.slow`` makes this rank (1.0: not at all)."""
    factor = 1.0
    for n, entry in enumerate(cfg.fault.slow):
        ok = (isinstance(entry, dict) and set(entry) == {"rank", "factor"}
              and isinstance(entry["rank"], int) and isinstance(entry["factor"], int | float)
              and entry["factor"] >= 1)
        if not ok:
            raise ConfigError(f"fault.slow[{n}] must be a table like {{rank = 1, factor = 3.0}}"
                              " with factor >= 1")
        if entry["rank"] == rank:
            factor *= float(entry["factor"])
    return factor


def calibrated_counts(cfg: Config, grid: Any, backend: Backend, batch: Batch) -> list[int]:
    """Heads per head rank from measured rates, averaged over replicas (same on all)."""
    from mpi4py import MPI

    from .balance import head_rate, measured_counts

    m = cfg.model
    rows = min(batch.shape[0] * batch.shape[1], 2048)
    rate = head_rate(backend.xp, rows, m.hidden, m.hidden // m.heads, max(1, m.ffn // m.heads),
                     np.dtype(cfg.dtype), slowdown=slowdown(cfg, grid.rank))
    rates = np.array(grid.comm("tensor").allgather(rate))
    grid.comm("data").Allreduce(MPI.IN_PLACE, rates, op=MPI.SUM)  # every replica, same split
    return measured_counts(m.heads, list(rates))


def crash_points(cfg: Config, rank: int) -> dict[int, str]:
    """layer -> "raise" | "kill" | "hang" for this rank, from ``fault.crash`` (tests)."""
    points = {}
    for n, entry in enumerate(cfg.fault.crash):
        ok = isinstance(entry, dict) and set(entry) <= {"rank", "layer", "how"} and all(
            isinstance(entry.get(k), int) for k in ("rank", "layer")
        ) and entry.get("how", "raise") in ("raise", "kill", "hang")
        if not ok:
            raise ConfigError(f"fault.crash[{n}] must be a table like {{rank = 2, layer = 1,"
                              ' how = "raise"}} (how: raise, kill or hang)')
        if entry["rank"] == rank:
            points[entry["layer"]] = entry.get("how", "raise")
    return points


class FaultyPhases:
    """The phase timer, plus configured faults: a crash inside a layer's MLP (mid-layer)
    and a slowdown that stretches every compute phase (an emulated slower rank)."""

    COMPUTE = ("qkv", "attention", "out_proj", "mlp", "norm")

    def __init__(self, timer: PhaseTimer, points: dict[int, str], rank: int,
                 factor: float = 1.0) -> None:
        self.timer, self.points, self.rank, self.factor = timer, points, rank, factor

    @property
    def layer(self) -> int:
        return self.timer.layer

    @layer.setter
    def layer(self, value: int) -> None:
        self.timer.layer = value

    def __call__(self, name: str) -> Any:
        how = self.points.get(self.layer) if name == "mlp" else None
        if how == "kill":
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise":
            raise RuntimeError(f"injected crash on rank {self.rank} in layer {self.layer}")
        while how == "hang":  # a rank stuck outside MPI: the others' watchdog ends the job
            time.sleep(3600)
        if self.factor > 1.0 and name in self.COMPUTE:
            return self._stretched(name)
        return self.timer(name)

    @contextmanager
    def _stretched(self, name: str) -> Iterator[None]:
        with self.timer(name):
            start = time.perf_counter()
            yield
            time.sleep((self.factor - 1.0) * (time.perf_counter() - start))


def attention_options(cfg: Config, p: Plan) -> Options:
    """Worker threads over heads take the rank's BLAS threads (NumPy only)."""
    return Options(cfg.attention.impl, cfg.attention.block, max(1, p.threads))


def make_reducer(cfg: Config, p: Plan, comm: Any = None,
                 group_ranks: list[int] | None = None) -> Any:
    """The checked Allreduce over ``comm`` (default: this rank's head group)."""
    from .checksum import parse_faults
    from .comm import CheckedAllreduce, cuda_aware_mpi

    aware = {"true": True, "false": False}.get(cfg.comm.cuda_aware)
    if aware is None:
        aware = p.backend.is_gpu and cuda_aware_mpi()
    return CheckedAllreduce(
        comm=p.grid.comm("tensor") if comm is None else comm, backend=p.backend,
        mode=cfg.checksum.mode, wire=cfg.checksum.wire,
        on_mismatch=cfg.checksum.on_mismatch, retries=cfg.checksum.retries,
        hash_every=cfg.checksum.hash_every, cuda_aware=aware,
        faults=parse_faults(cfg.fault.inject, SITES), world_rank=p.grid.rank,
        group_ranks=p.grid.group_ranks("tensor") if group_ranks is None else group_ranks,
    )


def setup(cfg: Config, world: Any, out_path: str, force: bool) -> tuple:
    """(plan, reducer, output reservation on rank 0) after the collective pre-flight."""
    (tensor, batch), out = jobkit.preflight(
        world, lambda: check_inputs(cfg, world.Get_size(), world.Get_rank()),
        output=(out_path, force))
    jobkit.set_timeout(cfg.comm.timeout)
    p = place(cfg, world, tensor, batch)
    return p, make_reducer(cfg, p), out


def load_shards(cfg: Config, p: Plan, world: Any, indices: range) -> tuple[Any, list]:
    """Embeddings and this rank's shard of the given layers, on the rank's device."""
    from .comm import agree_on_error

    error: UserError | None = None
    try:
        source = open_source(cfg.seed, cfg.model, np.dtype(cfg.dtype))
        emb = source.embeddings()
        layers = [source.layer(i, p.shard) for i in indices]
    except (UserError, ValueError) as err:
        error = err if isinstance(err, UserError) else InputError(str(err))
    error = agree_on_error(world, error)
    if error is not None:
        raise error
    if not p.backend.is_gpu:
        return emb, layers
    dev = p.backend.xp.asarray
    emb = type(emb)(*(dev(a) for a in vars(emb).values()))
    layers = [type(lp)(**{k: v if k == "head_dim" else dev(v) for k, v in vars(lp).items()})
              for lp in layers]
    return emb, layers


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


def write_provenance(f: Any, cfg: Config, p: Plan, started: dt.datetime, command: str,
                     host_info: list) -> None:
    """Root attributes and /ranks: what ran, where, with which libraries (every file)."""
    from mpi4py import MPI

    f.attrs.update({
        "mpiattn_version": __version__, "format_version": h5io.FORMAT_VERSION,
        "command": command, "config": cfg.to_toml(), "world_size": p.grid.size,
        "tensor_parallel": p.grid.axis_size("tensor"), "data_parallel": p.grid.axis_size("data"),
        "head_partition": np.array(p.head_counts), "backend": p.backend.name,
        "mpi_library": MPI.Get_library_version().replace("\x00", "").strip(),
        "blas": str(blas_info()),
        "blas_threads_per_rank": p.threads, "start_time": started.isoformat(),
    })
    impl, block = attention_options(cfg, p).resolve(p.batch.shape[1])
    f.attrs["attention"] = impl if impl == "plain" else f"{impl} (block {block})"
    ranks = f.create_group("ranks")
    ranks.create_dataset("host", data=[h for h, _ in host_info])
    ranks.create_dataset("device", data=[d for _, d in host_info])


def write_run(f: Any, cfg: Config, p: Plan, outputs: dict, pooled: np.ndarray,
              seconds: np.ndarray, totals: np.ndarray, host_info: list, records: list,
              started: dt.datetime) -> None:
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
        inp.create_dataset("text", data=p.batch.text)
    if pooled is not None and p.batch.text is not None:
        h5io.write_array(f.require_group("output"), "pooled", pooled, ("batch", "hidden"),
                         comp, digest=True)
    for (layer, name), array in sorted(outputs.items()):
        g = f.require_group(h5io.layer_group(layer))
        h5io.write_array(g, name, array, ("batch", "seq", "hidden"), comp, digest=True)
    written_in_parallel = [d for d in ("output/pooled", "layers") if d in f and not outputs]
    for top in written_in_parallel:  # label and digest what the replicas wrote (mpio)
        h5io.label_and_digest(f[top])
    if "output/pooled" in f:
        f["output/pooled"].attrs["description"] = (
            "mean over real tokens of the last layer, L2-normalised")
    t = f.create_group("timings")
    h5io.write_array(t, "seconds", seconds, ("rank", "layer", "phase"), phases=list(PHASES),
                     units="s")
    for i, name in enumerate(("forward", "setup", "total")):
        h5io.write_array(t, name, totals[:, i], ("rank",), units="s")
    h5io.write_array(f["ranks"], "peak_memory", totals[:, 3].astype(np.int64), ("rank",),
                     units="B", description="peak RSS (CPU) or CuPy pool total (GPU)")
    if records:
        write_records(f, records)
    f.attrs["end_time"] = dt.datetime.now(dt.timezone.utc).isoformat()
    f.attrs["status"] = "complete"


RECORD_DTYPE = np.dtype([
    ("replica", "i4"), ("layer", "i4"), ("site", "S16"), ("residual", "f8"), ("bound", "f8"),
    ("ratio", "f8"), ("passed", "u1"), ("retries", "i4"), ("digest", "u8"), ("chunk", "i4"),
])


def write_records(f: Any, records: list) -> None:
    table = np.array([
        (replica, r.layer, r.site.encode(), r.residual, r.bound, r.ratio, r.passed, r.retries,
         r.digest, r.chunk) for replica, r in records
    ], dtype=RECORD_DTYPE)
    g = f.require_group("checksum")
    h5io.write_array(g, "collectives", table,
                     description="one row per validated Allreduce; ratio = residual/bound")


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
