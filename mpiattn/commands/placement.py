"""The config finished once (``finish_config``, in every command's pre-flight), then
where a job's ranks stand and what each holds: the part of the job kit after the
pre-flight, shared by run, bench, train and the text run.

    finished = finish_config(cfg, size, "run", RUN_SITES)  # local, in the pre-flight
    plan = place(cfg, world, finished, batch)    # collective: grid, backend, heads, rows
    reducer = make_reducer(cfg, plan)            # the checked Allreduce of the head group
    emb, layers = load_shards(cfg, plan, world, range(cfg.model.layers))
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Config, coerce, validate
from ..core.attention import Options
from ..core.backend import Backend, limit_blas_threads, oversubscription, select
from ..core.checksum import Fault
from ..core.model import SITES
from ..core.pipeline import SITE as PIPELINE_SITE
from ..core.seqattn import BACKWARD_SITES as SEQUENCE_BACKWARD_SITES
from ..core.seqattn import RING_BACKWARD_SITES, RING_SITES, ULYSSES_BACKWARD_SITES, ULYSSES_SITES
from ..core.seqattn import SITES as SEQUENCE_SITES
from ..core.shard import HeadShard, counts, head_shard, partition
from ..errors import ConfigError, InputError
from ..inputs.data import Batch
from ..io.families import family_of
from ..io.weights import checkpoint_shape, model_folder, open_source
from ..parallel.faults import slowdown

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI

    from ..parallel.grid import ProcessGrid

# where fault.inject may flip a bit in run and bench
RUN_SITES = (*SITES, PIPELINE_SITE, *SEQUENCE_SITES)


def apply_checkpoint_shape(cfg: Config) -> None:
    """Take model.* from the checkpoint's config.json; an explicit different value is an error."""
    if not cfg.model.weights:
        return
    folder = model_folder(cfg.model.weights)
    shape = checkpoint_shape(folder)
    for key, raw in shape.items():
        dotted = f"model.{key}"
        current = getattr(cfg.model, key)
        try:
            value = coerce(dotted, raw, type(current))
        except ConfigError as err:
            raise InputError(f"'{folder / 'config.json'}': {err}") from None
        if dotted in cfg.explicit and current != value:
            raise ConfigError(
                f"{dotted} = {current} but the checkpoint has {value}: remove {dotted}"
                " from the config or load a matching checkpoint"
            )
        setattr(cfg.model, key, value)
    validate(cfg)  # e.g. input.seq_len against the checkpoint's max_positions
    check_layer_count(cfg)
    family = family_of(folder)
    if family.relative_bias and (cfg.parallel.sequence > 1 or cfg.attention.impl == "blocked"):
        key = "parallel.sequence > 1" if cfg.parallel.sequence > 1 else \
            'attention.impl = "blocked"'
        raise ConfigError(f"{key} is not built for {family.name}'s relative position bias:"
                          " use head, data and pipeline parallelism with plain attention")


def check_layer_count(cfg: Config) -> None:
    """The weights file holds the last layer config.json's layer count names: a huge
    ``num_hidden_layers`` (or one more than saved) is one line here, before anything is
    sized by it (a count of 10^12 used to run out of memory, exit 1, after the
    pre-flight). Checked by name in the safetensors header; a training checkpoint's
    layers are its own."""
    from ..io.formats.checkpoint import is_checkpoint
    from ..io.weights import SafetensorsWeights, resolve_weights

    path = resolve_weights(cfg.model.weights)
    if path.suffix != ".safetensors" and is_checkpoint(path):
        return
    source = SafetensorsWeights(path, cfg.model, np.dtype(cfg.dtype))
    last = cfg.model.layers - 1
    name = next(iter(source.family.layer_names(last, source.prefix).values()))
    if name not in source.keys:
        raise InputError(f"model.layers = {cfg.model.layers} (num_hidden_layers of"
                         f" '{path.parent / 'config.json'}', if it has one), but '{path}'"
                         f" holds no tensor '{name}' of layer {last}: the layer count and"
                         " the weights do not belong together")


@dataclass(frozen=True)
class Finished:
    """The config's derived values, computed once in the pre-flight (``finish_config``) and
    carried by the ``Placement``: nothing after the pre-flight parses the config again."""

    tensor: int  # ranks per head group
    faults: tuple[Fault, ...]  # fault.inject, parsed against the command's sites


def finish_config(cfg: Config, world_size: int, command: str,
                  sites: tuple[str, ...]) -> Finished:
    """Local, no collective (the pre-flight agrees on the outcome): ``model.*`` from the
    checkpoint's folder (``apply_checkpoint_shape``), the head-group size, the memory the
    replicated tables need, and the fault tables (``fault.crash``, ``fault.slow``, and
    ``fault.inject`` against ``sites``, the sites of ``command``). Raises UserError."""
    from ..config import check_world
    from ..core.checksum import parse_faults
    from ..parallel.faults import crash_points

    apply_checkpoint_shape(cfg)
    tensor, _ = check_world(cfg, world_size)
    check_memory(cfg, tensor)
    crash_points(cfg, 0)  # validates every fault.crash entry (any rank's)
    slowdown(cfg, 0)  # validates every fault.slow entry
    return Finished(tensor, tuple(parse_faults(cfg.fault.inject, sites, command)))


TRAINABLE = ("BERT", "DistilBERT", "RoBERTa", "XLM-RoBERTa", "CamemBERT")  # families whose
# names, embeddings and MLM head training has


def check_trainable(cfg: Config) -> None:
    """``mpiattn train`` fine-tunes BERT (and DistilBERT, exported as the BERT it equals)
    and the RoBERTa family; another family's folder is one line before any work
    (ConfigError)."""
    if not cfg.model.weights:
        return
    from ..io.families import read_config

    folder = model_folder(cfg.model.weights)
    family = family_of(folder)
    if family.name not in TRAINABLE:
        raise ConfigError(f"model.weights = '{cfg.model.weights}' is a {family.name} model:"
                          f" mpiattn train fine-tunes {', '.join(TRAINABLE[:-1])} and"
                          f" {TRAINABLE[-1]} models (run encodes every supported family)")
    config = read_config(folder) or {}
    if not config.get("tie_word_embeddings", True):  # its decoder is a tensor of its
        raise ConfigError(  # own, which the tied MLM head trained here would never read
            f"'{folder / 'config.json'}': tie_word_embeddings = false: mpiattn train"
            " fine-tunes a masked-language-model decoder tied to the word embeddings, not"
            " this model's own decoder; set it to true to train with a tied decoder")


def check_memory(cfg: Config, tensor: int = 1) -> None:
    """Refuse a model whose replicated tables (embeddings) alone exceed this node's memory,
    or whose per-rank share of the layers' weights (``tensor`` head ranks,
    ``parallel.pipeline`` stages) or one seeded or token batch's states (input ids and a
    (batch, seq, hidden) array) alone do: a MemoryError mid-job (after minutes of
    building 10^12 layers, or at a batch of 10^12 sequences) on some ranks is worse than
    one line now. Lower bounds of the need: what passes may still not fit."""
    import os

    m, size = cfg.model, np.dtype(cfg.dtype).itemsize
    need = (m.vocab + m.max_positions + m.type_vocab) * m.hidden * size
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise ConfigError(f"the embedding tables need {need / 2**30:.1f} GiB on every rank;"
                          f" this node has {have / 2**30:.1f} GiB: lower model.vocab,"
                          " model.hidden or model.max_positions")
    stages = max(cfg.parallel.pipeline, 1)
    layers = -(-m.layers // stages) * (4 * m.hidden * m.hidden + 2 * m.hidden * m.ffn) \
        * size // max(tensor, 1)
    if layers > have:
        raise ConfigError(f"the weights of {m.layers} layers need {layers / 2**30:.1f} GiB on"
                          f" each rank of {tensor} head rank(s) x {stages} pipeline stage(s);"
                          f" this node has {have / 2**30:.1f} GiB: lower model.layers or"
                          " model.hidden, or use more ranks (parallel.tensor, parallel.pipeline)")
    if not cfg.input.text:
        batch = cfg.input.batch * cfg.input.seq_len * (8 + m.hidden * size)
        if batch > have:
            raise ConfigError(f"a batch of input.batch = {cfg.input.batch} sequences of"
                              f" {cfg.input.seq_len} tokens needs {batch / 2**30:.1f} GiB for"
                              f" its ids and one state; this node has {have / 2**30:.1f} GiB:"
                              " lower input.batch or input.seq_len")


@dataclass
class Placement:
    """Everything decided before the first FLOP."""

    cfg: Config
    grid: ProcessGrid
    backend: Backend
    shard: HeadShard
    head_counts: list[int]
    batch: Batch  # the whole batch
    rows: tuple[int, int]  # (count, start) of this replica's sequences
    threads: int
    limiter: Any = field(repr=False, default=None)
    cuda_aware: bool = False  # device buffers go to MPI as they are (CuPy ranks only)
    faults: tuple[Fault, ...] = ()  # fault.inject, parsed once (``Finished``)


def place(cfg: Config, world: MPI.Comm, finished: Finished, batch: Batch) -> Placement:
    """Collective: process grid, backend, BLAS threads and this rank's heads and rows."""
    from ..parallel.grid import GridShape, make_grid

    tensor = finished.tensor
    grid = make_grid(world, GridShape.of(world.Get_size(), tensor, cfg.parallel.pipeline,
                                         cfg.parallel.sequence))
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
    return Placement(cfg, grid, backend, shard, head_counts, batch, rows, threads, limiter,
                     cuda_aware(cfg, backend), finished.faults)


def cuda_aware(cfg: Config, backend: Backend) -> bool:
    """Whether this rank hands device buffers to MPI: ``comm.cuda_aware`` when "true" or
    "false"; with "auto", a CuPy rank whose MPI library says it takes them. Always False
    on NumPy ranks (host buffers)."""
    from ..parallel.comm import cuda_aware_mpi

    if not backend.is_gpu:
        return False
    aware = {"true": True, "false": False}.get(cfg.comm.cuda_aware)
    return cuda_aware_mpi() if aware is None else aware


def calibrated_counts(cfg: Config, grid: ProcessGrid, backend: Backend, batch: Batch) -> list[int]:
    """Heads per head rank from measured rates, averaged over replicas and token slices
    (the same on every rank)."""
    from mpi4py import MPI

    from ..core.balance import head_rate, measured_counts

    m = cfg.model
    rows = min(batch.shape[0] * batch.shape[1], 2048)
    rate = head_rate(backend.xp, rows, m.hidden, m.hidden // m.heads, max(1, m.ffn // m.heads),
                     np.dtype(cfg.dtype), slowdown=slowdown(cfg, grid.rank))
    rates = np.array(grid.comm("tensor").allgather(rate))
    # every replica and token slice: the same split (a sequence group's ranks must hold the
    # same heads, or their Alltoall and ring buffers would not match)
    summed = grid.comm_over(("data", "sequence"))
    summed.Allreduce(MPI.IN_PLACE, rates, op=MPI.SUM)
    if all(summed is not comm for comm in grid.comms.values()):  # made for this sum
        summed.Free()
    return measured_counts(m.heads, list(rates))


def attention_options(cfg: Config, p: Placement) -> Options:
    """The attention options of this rank's plan (``Options.configured``)."""
    return Options.configured(cfg.attention.impl, cfg.attention.block, p.threads)


def make_reducer(cfg: Config, p: Placement, comm: MPI.Comm | None = None,
                 group_ranks: list[int] | None = None) -> Any:
    """The checked Allreduce over ``comm`` (default: this rank's head group)."""
    from ..parallel.comm import CheckedAllreduce

    return CheckedAllreduce(
        comm=p.grid.comm("tensor") if comm is None else comm, backend=p.backend,
        mode=cfg.checksum.mode, wire=cfg.checksum.wire,
        on_mismatch=cfg.checksum.on_mismatch, retries=cfg.checksum.retries,
        hash_every=cfg.checksum.hash_every, cuda_aware=p.cuda_aware,
        faults=list(p.faults), world_rank=p.grid.rank,
        group_ranks=p.grid.group_ranks("tensor") if group_ranks is None else group_ranks,
    )


def load_shards(cfg: Config, p: Placement, world: MPI.Comm, indices: range,
                vocab_rows: np.ndarray | None = None) -> tuple[Any, list]:
    """Embeddings and this rank's shard of the given layers, on the rank's device.
    ``vocab_rows``: the only token ids this rank embeds (sorted, unique; see
    ``weights.Source.embeddings``), or None for the whole word table."""
    from .jobkit import agreed

    def read() -> tuple[Any, list]:
        try:
            source = open_source(cfg.seed, cfg.model, np.dtype(cfg.dtype))
            emb = source.embeddings(vocab_rows)
            emb.relative_bias = source.relative_bias(p.shard)  # MPNet: this rank's heads
            return emb, [source.layer(i, p.shard) for i in indices]
        except ValueError as err:  # e.g. a tensor's bytes that do not fit its shape
            raise InputError(str(err)) from None

    emb, layers = agreed(world, read, during="loading weights")
    if not p.backend.is_gpu:
        return emb, layers
    dev = p.backend.xp.asarray
    emb = type(emb)(**{k: v if v is None or isinstance(v, int) else dev(v)
                       for k, v in vars(emb).items()})
    layers = [type(lp)(**{k: dev(v) if isinstance(v, np.ndarray) else v
                          for k, v in vars(lp).items()}) for lp in layers]
    return emb, layers


def make_p2p(cfg: Config, p: Placement) -> Any:
    """The checked point-to-point transfers between this rank's pipeline stages."""
    from ..parallel.transfers import CheckedP2P, FaultPlan, RetryPolicy

    return CheckedP2P(p.grid.comm("pipeline"),
                      RetryPolicy(cfg.checksum.on_mismatch, cfg.checksum.retries),
                      FaultPlan(list(p.faults), p.grid.rank),
                      group_ranks=p.grid.group_ranks("pipeline"), abort_on_failure=True,
                      cuda_aware=p.cuda_aware)


def check_sequence(cfg: Config, tensor: int, seq: int, command: str = "run") -> None:
    """What ``parallel.sequence = Q`` needs, checked before any collective (ConfigError, one
    line): a token per rank, a head per rank for Ulysses (``seqattn.resolve``; the fewest
    heads any head rank holds), a fault site the chosen algorithm uses; refused where it is
    not built (text input, per-head statistics and maps). With ``command = "train"`` also
    the model family (``check_trainable``)."""
    from ..core.seqattn import resolve

    if command == "train":  # train's pre-flight passes here: its families are checked too
        check_trainable(cfg)
    parts = cfg.parallel.sequence
    sites = {e.get("site") for e in cfg.fault.inject if isinstance(e, dict)}
    used = sites & set(SEQUENCE_SITES + SEQUENCE_BACKWARD_SITES)
    if parts == 1:
        if used:
            raise ConfigError(f"fault.inject site '{sorted(used)[0]}' moves tokens between"
                              " sequence slices, and parallel.sequence = 1 has none: raise"
                              " parallel.sequence")
        return
    if cfg.input.text:
        raise ConfigError("parallel.sequence > 1 is built for token input (seeded or"
                          " input.tokens), not for streamed text (input.text): its batches"
                          " have every length; use parallel.tensor and data parallelism")
    if cfg.output.head_stats or cfg.output.attention_maps:
        raise ConfigError("output.head_stats and output.attention_maps are not built with"
                          " parallel.sequence > 1: turn them off or set parallel.sequence = 1")
    if seq < parts:
        raise ConfigError(f"parallel.sequence = {parts} ranks for sequences of {seq} tokens:"
                          f" each rank needs a token (parallel.sequence <= {seq})")
    try:
        algorithm = resolve(cfg.attention.sequence, min(counts(cfg.model.heads, tensor)), parts)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    wrong = used - set({"ulysses": ULYSSES_SITES + ULYSSES_BACKWARD_SITES,
                        "ring": RING_SITES + RING_BACKWARD_SITES}[algorithm])
    if wrong:
        raise ConfigError(f"fault.inject site '{sorted(wrong)[0]}' is not used by"
                          f" attention.sequence = \"{algorithm}\" in this {command}")


def make_sequence(cfg: Config, p: Placement, seq: int) -> Any:
    """This rank's ``seqattn.SequenceAttention`` over its sequence group for sequences of
    ``seq`` tokens, with its checked transfer (``transfers.CheckedAlltoall`` for Ulysses,
    ``transfers.CheckedRing`` for the ring); None with ``parallel.sequence = 1``."""
    from ..core.seqattn import SequenceAttention, SequenceSplit, resolve
    from ..parallel.transfers import CheckedAlltoall, CheckedRing, FaultPlan, RetryPolicy

    grid = p.grid
    parts = grid.axis_size("sequence")
    if parts == 1:
        return None
    algorithm = resolve(cfg.attention.sequence, min(p.head_counts), parts)
    kind = CheckedAlltoall if algorithm == "ulysses" else CheckedRing
    transfer = kind(grid.comm("sequence"),
                    RetryPolicy(cfg.checksum.on_mismatch, cfg.checksum.retries),
                    FaultPlan(list(p.faults), grid.rank),
                    group_ranks=grid.group_ranks("sequence"), cuda_aware=p.cuda_aware)
    split = SequenceSplit(seq, parts, grid.coord("sequence"))
    return SequenceAttention(algorithm, split, transfer,
                             cfg.attention.block or min(512, split.widest))
