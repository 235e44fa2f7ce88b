"""``mpiattn train``: masked-language-model training of the head-sharded encoder.

    mpiexec -n 2 mpiattn train jobs/configs/train-small.toml -o train.h5
    mpiexec -n 4 mpiattn train CONFIG.toml --set parallel.tensor=2 --resume ckpt.h5

World = data x tensor, as ``mpiattn run``: each head group holds the whole model, sharded
by heads; the replicas split every global batch by rows. Per step: forward (two checked
Allreduces per layer over the head group), backward (two more, at the column-parallel
inputs), one checked Allreduce of the gradients over the data group in a few flat
buckets, the global gradient norm (sharded squares summed over the head group), and the
optimizer on this rank's shard.

Work that would otherwise repeat on every rank is split (docs/training-scale.md): the word
table, the tied decoder and the softmax over the vocabulary by words over the head group
(``parallel.vocab``, ``core.vocab``: three more checked sums a step), and the optimizer
state over the replicas (``parallel.zero``, ``ZeroShard``: each replica updates its block
of the parameters, then the blocks are gathered by a checked Allgather).

With ``parallel.pipeline = P`` (world = data x pipeline x tensor) each stage holds its
layers (stage 0 the embeddings, the last the MLM head and a copy of the tied word
embedding) and runs the 1F1B schedule over ``parallel.microbatches`` micro-batches
(``pipeline.stage_events``): activations and their gradients move as checked
point-to-point messages, the tied embedding's gradient is summed over the two ends (per
row block with the vocabulary split: the ends of one head rank hold the same rows), loss
and gradient norm over the stages.

Data (``corpus``), checkpoints and their resume (``checkpoints``), the Hugging Face
naming (``hf``) live in their own modules; this one holds the step and the loop.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..core import mlm, seqattn
from ..core import vocab as vocab_parallel
from ..core.attention import Options
from ..core.model import BACKWARD_SITES, SITES, Embeddings, LayerShard, join_shards
from ..core.optim import Optimizer, clip_factor, global_norm, lr_at, squared_norms
from ..core.pipeline import BWD_SITE, micro_batches, stage_events, stage_layers
from ..core.pipeline import SITE as FWD_SITE
from ..core.shard import HeadShard, head_shard
from ..core.timing import Timer
from ..errors import ConfigError, InputError
from ..inputs.corpus import (
    Corpus,
    MaskedBatch,
    default_tokenizer,
    eval_batch,
    train_batch,
    unigram_entropy,
)
from ..inputs.data import Batch as InputBatch
from ..io.formats.checkpoint import (
    History,
    check_shapes,
    checkpoint_due,
    checkpoint_path,
    job_identity,
    latest_checkpoint,
    model_shapes,
    read_checkpoint,
    write_checkpoint,
)
from ..io.formats.train import TRAIN_PHASES
from ..io.hf import from_hf, to_hf
from ..version import __version__
from .progress import Progress

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI

    from ..parallel.grid import ProcessGrid

PHASES = TRAIN_PHASES
BUCKET_COLS, BUCKET_ROWS = 1024, 1024  # gradient buckets of at most 1 Mi elements
GRAD_SITE = "grad"  # the gradient buckets over the data group (layer: bucket index)
SUM_SITES = ("loss", "grad_norm", "eval")  # one-number sums (layer 0)
TIED_SITE = "grad.tied"  # the tied word embedding's gradient, first + last stage (layer 0)
STAGE_SITES = (FWD_SITE, BWD_SITE, TIED_SITE)  # with parallel.pipeline > 1
SEQUENCE_SITES = seqattn.SITES + seqattn.BACKWARD_SITES  # with parallel.sequence > 1
ZERO_SITE = "zero"  # the replicas' updated parameter shards, gathered (ZeRO-1; layer 0)
ZERO_STATE_SITE = "zero.state"  # the optimizer state gathered for a checkpoint (layer: kind)
VOCAB_SITES = vocab_parallel.SITES  # with the vocabulary split over the head group (layer 0)
TRAIN_SITES = (*SITES, *BACKWARD_SITES, GRAD_SITE, *SUM_SITES, *STAGE_SITES,
               *SEQUENCE_SITES, *VOCAB_SITES, ZERO_SITE)  # fault.inject
_HEAD = 13  # seeded stream tag of the MLM head (weights use 0..2, the corpus 10..12)


# --- parameters -------------------------------------------------------------------------


def init_params(cfg: Config, shard: HeadShard, vocab: int,
                layers: range | None = None) -> mlm.Params:
    """Seeded weights (or model.weights) for this rank's shard, and the MLM head: the
    checkpoint's when it has one, else a new one.

    A new head on a pretrained model is BERT's initialisation (dense N(0, 0.02^2), LayerNorm
    1 and 0, bias 0; Devlin et al. 2019, ``initializer_range``). On seeded weights its
    LayerNorm gain starts at 1/sqrt(hidden): the seeded word embeddings have unit variance,
    so the tied decoder then starts with logits of unit scale. ``layers``: which layers to
    build (a pipeline stage's; default all), each seeded by its model index.
    """
    from ..io.weights import open_source

    model = dataclasses.replace(cfg.model, vocab=vocab)
    source = open_source(cfg.seed, model, np.dtype(cfg.dtype))
    emb = source.embeddings()
    if emb.padding_idx is not None:  # RoBERTa family: token n of a whole window (training
        # has no padding) reads row padding_idx + 1 + n, so the table from there trains as
        # BERT's; the rows before it are kept as they are (``untrained_tensors``)
        emb = dataclasses.replace(emb, padding_idx=None, position=np.ascontiguousarray(
            emb.position[emb.padding_idx + 1:]))
    indices = range(model.layers) if layers is None else layers
    built = [source.layer(i, shard) for i in indices]
    head = source.head()
    if head is None:
        h, dtype = model.hidden, np.dtype(cfg.dtype)
        rng = np.random.default_rng([cfg.seed, _HEAD])
        dense = rng.standard_normal((h, h), dtype=np.float32)
        dense = dense * np.float32(0.02) if model.weights else dense / np.float32(np.sqrt(h))
        gain = 1.0 if model.weights else 1 / np.sqrt(h)
        head = mlm.MLMHead(dense.astype(dtype), np.zeros(h, dtype), np.full(h, gain, dtype),
                           np.zeros(h, dtype), np.zeros(vocab, dtype))
    return mlm.Params(emb, built, head, indices.start)


def stage_params(whole: mlm.Params, stage: int, stages: int, total: int) -> mlm.Params:
    """Pipeline stage ``stage``'s part of ``whole`` (all ``total`` layers, or already just
    the stage's): its layers (``pipeline.stage_layers``), the embeddings on stage 0, the
    MLM head and a copy of the tied word embedding on the last stage (Megatron-LM's
    embedding group). With one stage: ``whole``."""
    if stages == 1:
        return whole
    layers, first = whole.layers, whole.first
    if len(layers) == total:  # the whole model's layers: take the stage's
        span = stage_layers(total, stages, stage)
        layers, first = layers[span.start: span.stop], span.start
    emb = whole.emb if stage == 0 else None
    if stage == stages - 1:
        emb = Embeddings(whole.emb.word.copy(), None, None, None, None)
    return mlm.Params(emb, layers, whole.head if stage == stages - 1 else None, first)


def rebuild(template: mlm.Params, arrays: list[Any]) -> mlm.Params:
    """A Params with the structure of ``template`` and the tensors of ``arrays`` (in the
    order of ``mlm.named``)."""
    it = iter(arrays)
    emb = None
    if template.emb is not None:
        emb = Embeddings(*(None if getattr(template.emb, f.name) is None else next(it)
                           for f in dataclasses.fields(Embeddings)))
    layers = []
    for p in template.layers:
        values = {f.name: next(it) for f in dataclasses.fields(LayerShard) if f.name != "head_dim"}
        layers.append(LayerShard(**values, head_dim=p.head_dim))
    head = None
    if template.head is not None:
        head = mlm.MLMHead(*(next(it) for _ in dataclasses.fields(mlm.MLMHead)))
    return mlm.Params(emb, layers, head, template.first, template.vocab)


def vocab_split(cfg: Config, vocab: int, tensor: int, head_rank: int) -> Any:
    """The word rows this head rank holds (``core.vocab.VocabSplit``), or None when the
    word table is whole on every rank: ``parallel.vocab = false``, one head rank, or fewer
    words than head ranks. The same rows on every pipeline stage and sequence slice of
    the head rank: the first stage's word table and the last stage's tied decoder hold
    the same row block, and each sequence slice computes the loss of its own tokens."""
    if not cfg.parallel.vocab or tensor < 2 or vocab < tensor:
        return None
    return vocab_parallel.VocabSplit(vocab, tensor, head_rank)


def split_vocab(params: mlm.Params, split: Any) -> mlm.Params:
    """``params`` (or gradients, or optimizer state) with the whole word table and decoder
    bias cut to ``split``'s rows (copies; a pipeline stage cuts the parts it holds: the
    first stage's table, the last stage's tied copy and bias); unchanged when ``split``
    is None."""
    if split is None or params.vocab is not None:
        return params
    emb, head = params.emb, params.head
    if emb is not None:
        emb = dataclasses.replace(emb, word=emb.word[split.rows].copy())
    if head is not None:
        head = dataclasses.replace(head, bias=head.bias[split.rows].copy())
    return mlm.Params(emb, params.layers, head, params.first, split)


def vocab_rows(p: mlm.Params) -> tuple[Any, Any] | None:
    """This head rank's (word rows or None, decoder bias rows or None) of a split
    ``p`` (None where the stage lacks the part); None when the vocabulary is whole."""
    if not p.vocab_split:
        return None
    return (None if p.emb is None else p.emb.word, None if p.head is None else p.head.bias)


def join_vocab(p: mlm.Params, pieces: list[tuple[Any, Any]]) -> mlm.Params:
    """Whole-vocabulary parameters from every head rank's (word rows, bias) in rank order
    (``vocab_rows``; ``p``: rank 0's, a pipeline stage's part); ``p`` itself when the
    vocabulary is not split."""
    if not p.vocab_split:
        return p
    emb, head = p.emb, p.head
    if emb is not None:
        emb = dataclasses.replace(emb, word=np.concatenate([w for w, _ in pieces]))
    if head is not None:
        head = dataclasses.replace(head, bias=np.concatenate([b for _, b in pieces]))
    return mlm.Params(emb, p.layers, head, p.first)


# --- the communication a step needs ---------------------------------------------------


@dataclass
class Groups:
    """The two reductions: over the head group (activations, their gradients, norms) and
    over the data group (parameter gradients, losses). Checked Allreduces under MPI,
    ``ThreadGroup`` members in tests, ``LocalReduce`` for one process.

    With pipeline stages (``stages`` > 1) also: ``p2p`` (a ``transfers.CheckedP2P`` over
    the pipeline communicator, rank = stage), ``pipe`` (a sum over the stages: loss and
    gradient norm) and ``tied`` (a sum over the first and last stage of this head rank,
    the tied word embedding's gradient, its row block with ``vocab``; None on the other
    stages)."""

    heads: Any
    data: Any
    tensor: int = 1
    head_rank: int = 0
    replicas: int = 1
    replica: int = 0
    stages: int = 1
    stage: int = 0
    microbatches: int = 1
    p2p: Any = None
    pipe: Any = None
    tied: Any = None
    sequence: Any = None  # seqattn.SequenceAttention with parallel.sequence > 1
    vocab: Any = None  # core.vocab.VocabSplit: the word rows this head rank holds, or None
    gather: Any = None  # gather(block, site=, layer=) -> (replicas, *block.shape) over the
    # data group (a checked Allgather): with it, ZeRO-1 (the optimizer state sharded)

    @property
    def summed(self) -> bool:
        """Are parameter gradients and losses summed over other ranks (``data``: the
        replicas and, with sequence parallelism, the sequence group's token slices)?"""
        return self.replicas > 1 or self.sequence is not None


def _sum(reduce: Any, values: list[float], site: str, xp: Any = np) -> np.ndarray:
    """Scalars summed through a (1, n) float64 reduction (on the run's device)."""
    from ..core.backend import to_host

    buf = xp.asarray([values], dtype=np.float64)
    return np.array(to_host(reduce(buf, site=site, layer=0)[0]), copy=True)


def bucket_count(elements: int) -> int:
    """How many buckets ``Buckets`` cuts a rank's ``elements`` gradient values into."""
    rows = -(-elements // BUCKET_COLS)
    return -(-rows // BUCKET_ROWS)


def shard_elements(model: Any, vocab: int, shard: HeadShard, words: int | None = None) -> int:
    """Parameters that a rank holding ``shard`` trains (the sizes of ``mlm.named``);
    ``words``: the word rows it holds (default all ``vocab``)."""
    h, w = model.hidden, shard.width
    words = vocab if words is None else words
    f = shard.ffn_cols.stop - shard.ffn_cols.start
    emb = (words + model.max_positions + model.type_vocab + 2) * h
    layer = 4 * h * w + 3 * w + 2 * h * f + f + 6 * h  # qkv, out, mlp, biases, two norms
    return emb + model.layers * layer + h * h + 3 * h + words  # + the MLM head


def fault_span(cfg: Config, world_size: int, tensor: int) -> Callable[[str, int], tuple[int, str]]:
    """What the layer of a ``fault.inject`` site means in training, for each rank (see
    ``faults.check_fault_targets``): a sum over a group of one rank moves nothing; a
    ``grad`` fault's layer is the bucket index; the one-number sums have layer 0."""
    from ..parallel.grid import GridShape

    shape = GridShape.of(world_size, tensor, cfg.parallel.pipeline, cfg.parallel.sequence)
    m = cfg.model

    def span(site: str, rank: int) -> tuple[int, str]:
        if site in SEQUENCE_SITES:  # check_sequence has refused them without a sequence group
            return m.layers, f"the model has {m.layers} layers"
        if site in VOCAB_SITES:
            if vocab_split(cfg, m.vocab, shape.tensor, 0) is None:
                return 0, ("the vocabulary is split over the head group only with"
                           " parallel.tensor >= 2 and parallel.vocab = true:"
                           " raise parallel.tensor")
            stage, last = shape.coords(rank)["pipeline"], shape.pipeline - 1
            if site == vocab_parallel.EMBED_SITE and stage != 0:
                return 0, (f"rank {rank} is on pipeline stage {stage}; the word embedding"
                           " (and its sum) lives on stage 0")
            if site != vocab_parallel.EMBED_SITE and stage != last:
                return 0, (f"rank {rank} is on pipeline stage {stage}; the loss over the"
                           f" vocabulary (and its sums) runs on the last stage, {last}")
            return 1, (f"site '{site}' sums once a step (a micro-batch) and once a held-out"
                       " batch")
        if site == ZERO_SITE:
            if shape.data < 2 or not cfg.parallel.zero or shape.sequence > 1:
                return 0, ("the optimizer state is sharded (ZeRO-1) only over two replicas"
                           " or more with parallel.zero = true, without sequence slices:"
                           " lower parallel.tensor")
            return 1, f"site '{site}' gathers once a step"
        if site in STAGE_SITES:
            if shape.pipeline == 1:
                return 0, ("parallel.pipeline = 1 keeps every layer on one stage, so"
                           " nothing moves between stages: raise parallel.pipeline")
            if site == TIED_SITE:
                return 1, f"site '{site}' sums one tensor a step"
            return m.layers - 1, (f"site '{site}' is labelled by the last layer before a"
                                  " stage boundary")
        if site in (GRAD_SITE, "loss", "eval"):  # summed over the data x sequence group
            if shape.data * shape.sequence == 1:
                return 0, (f"parallel.tensor = {tensor} of {world_size} ranks leaves one"
                           " replica, so nothing is summed there: lower parallel.tensor")
        elif shape.tensor == 1:
            return 0, ("parallel.tensor = 1 puts every head on one rank, so nothing is"
                       " summed there: raise parallel.tensor")
        if site == GRAD_SITE:
            measured = cfg.parallel.balance == "measured"  # heads unknown yet: bound them
            parts, index = (1, 0) if measured else (tensor, shape.coords(rank)["tensor"])
            shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, parts, index)
            split = None if measured else vocab_split(cfg, m.vocab, tensor, index)
            words = None if split is None else split.count
            count = bucket_count(shard_elements(m, m.vocab, shard, words))
            bound = "at most " if measured else ""
            return count, (f"rank {rank} sums its gradients in {bound}{count} bucket(s), and"
                           " a 'grad' fault's layer is the bucket index")
        if site in SUM_SITES:
            return 1, f"site '{site}' sums one number a step"
        return m.layers, f"the model has {m.layers} layers"

    return span


class Buckets:
    """Parameter gradients packed into one flat array, Allreduced as (rows, cols) views of
    at most ``BUCKET_ROWS`` rows each: a few large messages, each checksum-validated."""

    def __init__(self, grads: list[Any], xp: Any) -> None:
        self.sizes = [g.size for g in grads]
        total = sum(self.sizes)
        rows = -(-total // BUCKET_COLS)
        self.flat = xp.zeros(rows * BUCKET_COLS, dtype=grads[0].dtype)
        self.grid = self.flat.reshape(rows, BUCKET_COLS)

    def allreduce(self, grads: list[Any], reduce: Any) -> None:
        offset = 0
        for g in grads:
            self.flat[offset: offset + g.size] = g.reshape(-1)
            offset += g.size
        for n, start in enumerate(range(0, self.grid.shape[0], BUCKET_ROWS)):
            view = self.grid[start: start + BUCKET_ROWS]
            view[...] = reduce(view, site=GRAD_SITE, layer=n)
        offset = 0
        for g in grads:
            g.reshape(-1)[...] = self.flat[offset: offset + g.size]
            offset += g.size


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    seconds: dict[str, float]


@dataclass
class ZeroShard:
    """ZeRO-1 (Rajbhandari et al. 2020, stage 1): the parameters of a head rank live in one
    flat array of ``replicas * chunk`` elements (the order of ``mlm.named``, zero padded);
    replica d updates elements ``[d * chunk, (d + 1) * chunk)`` with the optimizer state of
    those elements only, then every replica's updated block is gathered (checked)."""

    flat: Any  # (replicas * chunk,) every parameter of this head rank, views in ``params``
    chunk: int
    start: int  # this replica's first element
    pieces: list  # (tensor index, first, stop) flat ranges of this replica's block
    offsets: list  # flat offset of every tensor
    shapes: list  # shape of every tensor

    @classmethod
    def build(cls, arrays: list[Any], replicas: int, replica: int, xp: Any
              ) -> tuple[ZeroShard, list[Any]]:
        """The shard and the parameters as views of its flat array (values copied in)."""
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        chunk = -(-total // replicas)
        flat = xp.zeros(chunk * replicas, dtype=arrays[0].dtype)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        views = []
        for a, o in zip(arrays, offsets, strict=True):
            v = flat[o: o + a.size].reshape(a.shape)
            v[...] = a
            views.append(v)
        lo, hi = replica * chunk, min(total, (replica + 1) * chunk)
        pieces = [(i, max(o, lo), min(o + n, hi)) for i, (o, n) in enumerate(
            zip(offsets, sizes, strict=True)) if max(o, lo) < min(o + n, hi)]
        return cls(flat, chunk, lo, pieces, offsets, [a.shape for a in arrays]), views

    def mine(self, flat: Any) -> list[Any]:
        """This replica's pieces of a flat array laid out like ``self.flat``."""
        return [flat[a:b] for _, a, b in self.pieces]

    def block(self) -> Any:
        return self.flat[self.start: self.start + self.chunk]

    def whole(self, flat: Any) -> list[Any]:
        """Every tensor of a flat array laid out like ``self.flat``, in its shape."""
        return [flat[o: o + int(np.prod(sh, dtype=np.int64))].reshape(sh)
                for o, sh in zip(self.offsets, self.shapes, strict=True)]


class Trainer:
    """One rank's training state and step; no MPI here (the groups are passed in).

    ``params`` hold the whole word table; with ``groups.vocab`` the trainer keeps its
    rows only (``split_vocab``). With ``groups.gather`` and two replicas or more (and
    ``parallel.zero``) the optimizer state is sharded over the replicas (``ZeroShard``).
    """

    def __init__(self, cfg: Config, corpus: Corpus, params: mlm.Params, groups: Groups,
                 xp: Any = np, clock: Timer | Callable[[], float] | None = None) -> None:
        self.cfg, self.corpus, self.groups, self.xp = cfg, corpus, groups, xp
        # phase times: CUDA events on CuPy (backend.timer()), a host clock on NumPy
        self.timer = clock if isinstance(clock, Timer) else Timer(clock=clock)
        self.params = split_vocab(params, groups.vocab)
        named = mlm.named(self.params)
        self.names = [n for n, _, _ in named]
        self.sharded = [s for _, _, s in named]
        self.buckets = Buckets(self.arrays(), xp) if groups.summed else None
        self.zero: ZeroShard | None = None
        if (cfg.parallel.zero and groups.gather is not None and groups.replicas > 1
                and groups.sequence is None):
            self.zero, views = ZeroShard.build(self.arrays(), groups.replicas,
                                               groups.replica, xp)
            self.params = rebuild(self.params, views)
            decays = [self.arrays()[i].ndim >= 2 for i, _, _ in self.zero.pieces]
            self.opt = Optimizer(cfg.train, self.zero.mine(self.zero.flat), decays)
        else:
            self.opt = Optimizer(cfg.train, self.arrays())
        self.eps = cfg.model.layer_norm_eps
        # the algorithm attention.impl names, as in run and bench (attention.ALGORITHMS)
        self.impl, self.block = Options(cfg.attention.impl,
                                        cfg.attention.block).resolve(cfg.input.seq_len)

    def arrays(self) -> list[Any]:
        return [a for _, a, _ in mlm.named(self.params)]

    def _update(self, grads: list[Any], lr: float, step: int, factor: float) -> None:
        """The optimizer on this rank's parameters with the summed ``grads``; with ZeRO-1
        on this replica's block only, then the blocks gathered (site ``zero``)."""
        z = self.zero
        if z is None:
            self.opt.step(self.arrays(), grads, lr, step, factor)
            return
        # the summed gradients lie in the buckets' flat array, in the order of z.flat
        self.opt.step(z.mine(z.flat), z.mine(self.buckets.flat), lr, step, factor)
        blocks = self.groups.gather(z.block(), site=ZERO_SITE, layer=0)
        z.flat[...] = self.xp.asarray(blocks).reshape(-1)

    def state_arrays(self, kind: str) -> list[Any]:
        """The optimizer state ``kind`` of every tensor this rank holds, in the order of
        ``mlm.named``. With ZeRO-1 a collective over the data group (every replica calls
        it; the blocks gathered, checked, at site ``zero.state``)."""
        z = self.zero
        if z is None:
            return self.opt.state[kind]
        block = self.xp.zeros(z.chunk, dtype=z.flat.dtype)
        for (_, a, b), piece in zip(z.pieces, self.opt.state[kind], strict=True):
            block[a - z.start: b - z.start] = piece
        blocks = self.groups.gather(block, site=ZERO_STATE_SITE,
                                    layer=self.opt.names.index(kind))
        return z.whole(self.xp.asarray(blocks).reshape(-1))

    def load_state(self, kind: str, whole: mlm.Params) -> None:
        """Set the optimizer state ``kind`` from whole-vocabulary tensors of this rank's
        head shard (a checkpoint's, ``hf.from_hf``), in the structure of ``mlm.Params``."""
        arrays = [a for _, a, _ in mlm.named(split_vocab(whole, self.groups.vocab))]
        z = self.zero
        if z is None:
            for target, value in zip(self.opt.state[kind], arrays, strict=True):
                target[...] = self.xp.asarray(value)
            return
        for (i, a, b), target in zip(z.pieces, self.opt.state[kind], strict=True):
            o = z.offsets[i]
            target[...] = self.xp.asarray(arrays[i].reshape(-1)[a - o: b - o])

    def _local(self, b: MaskedBatch) -> MaskedBatch:
        """This rank's tokens of a replica's batch (sequence parallelism): ids (b, S_i),
        the masked positions inside the slice renumbered into b*S_i; the key mask stays
        whole (every key is attended to). The batch itself without a sequence group."""
        if self.groups.sequence is None:
            return b
        split = self.groups.sequence.split
        seq = b.ids.shape[1]
        row, col = np.divmod(b.positions, seq)
        mine = (col >= split.start) & (col < split.start + split.count)
        positions = row[mine] * split.count + col[mine] - split.start
        return dataclasses.replace(b, ids=np.ascontiguousarray(b.ids[:, split.local]),
                                   positions=positions, targets=b.targets[mine])

    def _device(self, b: MaskedBatch) -> tuple:
        xp = self.xp
        return (xp.asarray(b.ids), xp.asarray(b.key_mask), xp.asarray(b.positions),
                xp.asarray(b.targets))

    def _pipeline(self, batch: MaskedBatch, backward: bool
                  ) -> tuple[float, list[Any], float, float]:
        """This stage's share of the batch over ``microbatches`` micro-batches: the 1F1B
        schedule with its messages (``pipeline.stage_events``) with ``backward``, else
        forwards only.

        Activations (b, S, H) go to the next stage and their gradients come back as
        checked point-to-point messages (sites ``activations`` and ``activations.bwd``,
        labelled by the last layer before the boundary; tags m and M + m). Returns (the
        summed loss of the micro-batches, 0 but on the last stage; the summed gradients in
        ``mlm.named`` order, or [] without ``backward``; seconds forward, seconds backward).
        """

        g, xp, timer = self.groups, self.xp, self.timer
        first, last = g.stage == 0, g.stage == g.stages - 1
        ids, mask = xp.asarray(batch.ids), xp.asarray(batch.key_mask)
        seq, hidden, dtype = batch.ids.shape[1], self.cfg.model.hidden, np.dtype(self.cfg.dtype)
        rows = micro_batches(batch.ids.shape[0], g.microbatches)
        before = self.params.first - 1  # label of the boundary with the previous stage
        after = self.params.first + len(self.params.layers) - 1  # ... with the next one
        inputs: dict[int, Any] = {}  # received activations (F) or their gradients (B)
        outputs: dict[tuple[str, int], Any] = {}  # to send: outputs (F), dL/d inputs (B)
        caches: dict[int, Any] = {}
        grads: list[Any] = []
        loss = 0.0
        spans: list[tuple[str, Any, Any]] = []  # (op, start mark, end mark) per event
        for kind, op, m in stage_events(g.stages, g.stage, len(rows), backward):
            r, t0 = rows[m], timer.mark()
            shape, tag = (r.stop - r.start, seq, hidden), m if op == "F" else len(rows) + m
            site = FWD_SITE if op == "F" else BWD_SITE
            peer, label = ((g.stage - 1, before) if (kind == "recv") == (op == "F")
                           else (g.stage + 1, after))
            if kind == "recv":
                buf = xp.empty(shape, dtype)  # the checked p2p stages it when it must
                inputs[m] = g.p2p.recv(buf, peer, site=site, layer=label, tag=tag)
            elif kind == "send":
                g.p2p.send(outputs.pop((op, m)), peer, site=site, layer=label, tag=tag)
            elif op == "F":
                lo, hi = r.start * seq, r.stop * seq
                sel = (batch.positions >= lo) & (batch.positions < hi)
                pos, tgt = xp.asarray(batch.positions[sel] - lo), xp.asarray(batch.targets[sel])
                out, cache = mlm.stage_forward(self.params, ids[r] if first else inputs.pop(m),
                                               mask[r], pos, tgt, batch.scale, g.heads,
                                               self.eps, self.impl, self.block,
                                               first_stage=first, last_stage=last,
                                               sequence=g.sequence)
                if last:
                    loss += float(out)
                else:
                    outputs[("F", m)] = out
                if backward:
                    caches[m] = cache
            else:
                dx, part = mlm.stage_backward(caches.pop(m), inputs.pop(m, None), g.heads)
                arrays = [a for _, a, _ in mlm.named(part)]
                if grads:
                    for total, a in zip(grads, arrays, strict=True):
                        total += a
                else:  # a copy: nothing of a later micro-batch may write into it
                    grads = [a.copy() for a in arrays]
                if not first:
                    outputs[("B", m)] = dx
            spans.append((op, t0, timer.mark()))
        times = timer.elapsed([(start, end) for _, start, end in spans])  # one sync
        seconds_f = sum(t for t, (op, _, _) in zip(times, spans, strict=True) if op == "F")
        seconds_b = sum(t for t, (op, _, _) in zip(times, spans, strict=True) if op != "F")
        return loss, grads, seconds_f, seconds_b

    def _pipeline_step(self, step: int) -> StepResult:
        """``step`` with pipeline stages: the 1F1B schedule, the tied word embedding's
        gradient summed over the first and last stage, the data group's buckets, the loss
        and the gradient norm (sum of squares over every stage, the tied copy once) summed
        over the stages, the optimizer on this stage's parameters."""
        g, timer = self.groups, self.timer
        seconds = dict.fromkeys(PHASES, 0.0)
        batch = self._local(train_batch(self.corpus, self.cfg, step, g.replicas, g.replica))
        loss, grads, seconds["forward"], seconds["backward"] = self._pipeline(batch, True)
        t2 = timer.mark()
        if g.tied is not None:  # emb.word is the first tensor of both ends' lists
            grads[0][...] = g.tied(grads[0], site=TIED_SITE, layer=0)
        if g.summed:
            self.buckets.allreduce(grads, g.data)
            loss = float(_sum(g.data, [loss], "loss", self.xp)[0])
        t3 = timer.mark()
        once = slice(1, None) if g.stage == g.stages - 1 else slice(None)  # the tied copy
        sharded, plain = squared_norms(grads[once], self.sharded[once])
        local = float(_sum(g.heads, [sharded], "grad_norm", self.xp)[0]) + plain
        total, loss = (float(v) for v in _sum(g.pipe, [local, loss], "grad_norm", self.xp))
        norm = float(np.sqrt(total))
        lr = lr_at(step, self.cfg.train)
        self._update(grads, lr, step, clip_factor(norm, self.cfg.train.clip))
        t4 = timer.mark()
        seconds["allreduce"], seconds["optimizer"] = timer.elapsed([(t2, t3), (t3, t4)])
        return StepResult(loss, lr, norm, seconds)

    def step(self, step: int) -> StepResult:
        g, timer = self.groups, self.timer
        if g.stages > 1:
            return self._pipeline_step(step)
        seconds = dict.fromkeys(PHASES, 0.0)
        batch = self._local(train_batch(self.corpus, self.cfg, step, g.replicas, g.replica))
        ids, mask, pos, tgt = self._device(batch)
        t0 = timer.mark()
        loss, cache = mlm.model_forward(self.params, ids, mask, pos, tgt, batch.scale,
                                        g.heads, self.eps, self.impl, self.block, g.sequence)
        t1 = timer.mark()
        grads = [a for _, a, _ in mlm.named(mlm.model_backward(cache, g.heads))]
        del cache
        t2 = timer.mark()
        if g.summed:
            self.buckets.allreduce(grads, g.data)
            loss = float(_sum(g.data, [loss], "loss", self.xp)[0])
        t3 = timer.mark()
        norm = global_norm(grads, self.sharded,
                           lambda s: float(_sum(g.heads, [s], "grad_norm", self.xp)[0]))
        lr = lr_at(step, self.cfg.train)
        self._update(grads, lr, step, clip_factor(norm, self.cfg.train.clip))
        t4 = timer.mark()
        spans = timer.elapsed([(t0, t1), (t1, t2), (t2, t3), (t3, t4)])  # one sync
        seconds.update(zip(("forward", "backward", "allreduce", "optimizer"), spans, strict=True))
        return StepResult(loss, lr, norm, seconds)

    def evaluate(self, stop: Callable[[], int] | None = None) -> float | None:
        """Mean held-out MLM loss over ``train.eval_batches`` fixed batches; None when
        ``stop()`` (a collective verdict, asked before each batch) says to stop."""
        g, total = self.groups, 0.0
        for index in range(self.cfg.train.eval_batches):
            if stop is not None and stop():
                return None
            batch = self._local(eval_batch(self.corpus, self.cfg, index, g.replicas,
                                           g.replica))
            if g.stages > 1:  # forwards only; the loss on the last stage
                total += self._pipeline(batch, False)[0]
                continue
            ids, mask, pos, tgt = self._device(batch)
            loss, _ = mlm.model_forward(self.params, ids, mask, pos, tgt, batch.scale,
                                        g.heads, self.eps, self.impl, self.block, g.sequence)
            total += loss
        if g.summed:
            total = float(_sum(g.data, [total], "eval", self.xp)[0])
        if g.stages > 1:
            total = float(_sum(g.pipe, [total], "eval", self.xp)[0])
        return total / self.cfg.train.eval_batches


def untrained_tensors(cfg: Config, ck: Any) -> dict[str, np.ndarray]:
    """Tensors of the starting model that training keeps but never changes (the pooler, the
    RoBERTa family's position rows before position 0: ``hf.PASSTHROUGH``): from the
    checkpoint resumed, or from ``model.weights``."""
    from ..io.hf import PASSTHROUGH
    from ..io.weights import open_source

    if ck is not None:
        return {k: ck.params[k] for k in PASSTHROUGH if k in ck.params}
    if not cfg.model.weights:
        return {}
    return open_source(cfg.seed, cfg.model, np.dtype(cfg.dtype)).passthrough()


def eval_due(step: int, t: Any) -> bool:
    """Evaluate after optimizer step ``step`` (0-based)? Every eval_every steps and at the end."""
    done = step + 1
    return done == t.steps or (t.eval_every > 0 and done % t.eval_every == 0)


# --- the MPI job ------------------------------------------------------------------------


def _resumable_output(path: str, resume: str | None) -> bool:
    """An existing output that a resumed run may replace without --force: the partial
    output of an earlier, stopped run (status "interrupted")."""
    import h5py

    if not resume or not Path(path).is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("status") == "interrupted" and f.attrs.get("command") == "train"
    except OSError:
        return False


def export_folder(cfg: Config, out_path: str) -> Path | None:
    """Where the job exports its model (``train.export``), or None."""
    from ..io.export import default_folder

    if cfg.train.export == "auto":
        return default_folder(out_path or "mpiattn-train.h5")
    return Path(cfg.train.export) if cfg.train.export else None


def check_training(cfg: Config, world_size: int, resume: str | None,
                   force: bool, out_path: str = "") -> tuple[tuple, dict]:
    """Every local check of a training job, with no collective: ((the finished config's
    derived values, corpus, checkpoint or None, resume path or None, tokenizer files, job
    identity, notes for rank 0 to print), input digests). ``resume``: None, "auto" (the
    newest checkpoint of this job's identity, ``latest_checkpoint``) or a checkpoint path
    (refused in one line when it is another job's, ``read_checkpoint``)."""
    from ..io.export import check_folder, tokenizer_files
    from ..io.outfile import check_name
    from ..io.weights import describe, model_folder
    from ..parallel.faults import check_fault_targets
    from .jobkit import file_digest, input_digests
    from .placement import check_sequence, finish_config

    if cfg.model.weights and (model_folder(cfg.model.weights) / "mpiattn_vocab.json").exists():
        raise ConfigError(f"model.weights = '{cfg.model.weights}' was trained on a remapped"
                          " vocabulary (its mpiattn_vocab.json): continue its training from"
                          " its checkpoint with --resume (run and export take the folder)")
    finished = finish_config(cfg, world_size, "train", TRAIN_SITES)
    tensor = finished.tensor
    if cfg.output.head_stats or cfg.output.attention_maps:
        raise ConfigError("output.head_stats and output.attention_maps are written by mpiattn"
                          " run only: remove them from the training config")
    check_sequence(cfg, tensor, cfg.input.seq_len, "train")
    corpus = Corpus.load(cfg)
    cfg.model.vocab = corpus.vocab
    check_fault_targets(cfg, world_size, fault_span(cfg, world_size, tensor))
    t, ck = cfg.train, None
    files = {"train.corpus": Path(t.corpus), "train.heldout": Path(t.heldout),
             "tokenizer": default_tokenizer(cfg)}
    digests = input_digests(cfg, files)
    identity = job_identity(cfg, digests)  # what --resume compares, stored in checkpoints
    notes, skipped = [], []
    if resume == "auto":
        found = latest_checkpoint(t, identity, skipped)
        resume = None if found is None else str(found)
        if skipped:
            notes.append(f"--resume auto skipped {len(skipped)} checkpoint(s) of other jobs"
                         " or users:"
                         f" {'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''};"
                         f" {'resuming ' + repr(resume) if resume else 'starting afresh'}")
    if resume:
        ck = read_checkpoint(resume, cfg, identity)
        if ck.identity is None:
            notes.append(f"'{resume}' records no job identity (written by an older mpiattn):"
                         " only its seed, shape and vocabulary were compared with this job's;"
                         " make sure it is this job's checkpoint (its next checkpoints record"
                         " one)")
        if not np.array_equal(ck.token_ids, corpus.token_ids):
            raise InputError(f"'{resume}' was trained on another vocabulary (tokenizer,"
                             " corpus or model.vocab differ)")
        check_shapes(resume, ck, model_shapes(cfg.model, corpus.vocab))
    first = 0 if ck is None else ck.step
    names = {checkpoint_path(t, done) for done in range(first + 1, t.steps + 1)
             if checkpoint_due(done - 1, t)} | {checkpoint_path(t, t.steps)}
    output = Path(out_path).absolute() if out_path else None
    for path in sorted(names):
        check_name(path)
        if output is not None and path.absolute() == output:
            raise ConfigError(f"train.checkpoint '{path}' is also the output (-o): give them"
                              ' different names, e.g. train.checkpoint = "NAME-{step}.h5"')
        if path.exists() and not force and not (resume and path.samefile(resume)):
            other = next((s for s in skipped if s.startswith(path.name + " (")), None)
            if other is not None:
                raise ConfigError(f"train.checkpoint '{path}' exists and is not this job's"
                                  f" ({other.split(' (', 1)[1][:-1]}): --resume auto passed"
                                  " it over; choose another train.checkpoint (or resume with"
                                  " that job's config)")
            raise ConfigError(f"train.checkpoint '{path}' exists: pass --force, resume from it"
                              ' (--resume), or name checkpoints per step ("NAME-{step}.h5")')
    folder = export_folder(cfg, out_path)
    if folder is not None:
        if out_path:
            check_name(out_path)  # the output's own complaint first (its export is named after it)
        check_folder(folder, force)
        taken = {checkpoint_path(t, d).absolute() for d in range(first + 1, t.steps + 1)}
        if output is not None:
            taken.add(output)
        if folder.absolute() in taken:
            raise ConfigError(f"train.export '{folder}' is also the output or a checkpoint:"
                              " give the export folder its own name")
    if resume:
        label = "--resume checkpoint"
        digests[f"{label} '{describe(Path(resume))}'"] = file_digest(Path(resume), label)
    tokenizer = tokenizer_files(files["tokenizer"])
    return (finished, corpus, ck, resume, tokenizer, identity, notes), digests


def _stage_links(cfg: Config, plan: Any) -> tuple[Any, Any, Any]:
    """Collective over the pipeline communicator: (the checked point-to-point messages
    between stages, the checked sum over the stages, the checked sum over the first and
    last stage or None on the others: Megatron-LM's embedding group)."""
    from mpi4py import MPI

    from ..parallel.transfers import CheckedP2P, FaultPlan, RetryPolicy
    from .placement import make_reducer

    grid = plan.grid
    comm, ranks = grid.comm("pipeline"), grid.group_ranks("pipeline")
    stages, stage = grid.axis_size("pipeline"), grid.coord("pipeline")
    p2p = CheckedP2P(comm, RetryPolicy(cfg.checksum.on_mismatch, cfg.checksum.retries),
                     FaultPlan(list(plan.faults), grid.rank),
                     group_ranks=ranks, abort_on_failure=True, cuda_aware=plan.cuda_aware)
    pipe = make_reducer(cfg, plan, comm, ranks)
    end = stage in (0, stages - 1)
    ends = comm.Split(color=0 if end else MPI.UNDEFINED, key=stage)
    tied = make_reducer(cfg, plan, ends, [ranks[0], ranks[-1]]) if end else None
    return p2p, pipe, tied


def _zero_gather(cfg: Config, plan: Any) -> Any:
    """Collective over the data group: the checked Allgather of ZeRO-1's parameter blocks
    (``transfers.CheckedAllgather``: ``(block, site=, layer=) -> (replicas, *block.shape)``
    on the block's device; device buffers straight to CUDA-aware MPI, else pinned staging)."""
    from ..parallel.transfers import CheckedAllgather, FaultPlan, RetryPolicy

    grid = plan.grid
    return CheckedAllgather(grid.comm("data"),
                            RetryPolicy(cfg.checksum.on_mismatch, cfg.checksum.retries),
                            FaultPlan(list(plan.faults), grid.rank),
                            group_ranks=grid.group_ranks("data"), cuda_aware=plan.cuda_aware)


def _flags(world: MPI.Comm, *values: int) -> list[int]:
    """Collective: the maximum over all ranks of each small integer (one tiny Allreduce)."""
    from mpi4py import MPI

    buf = np.array(values, dtype=np.int64)
    world.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return [int(v) for v in buf]


def _transfer_records(grid: ProcessGrid, groups: Groups, first_copy: bool) -> list:
    """This rank's (replica, record) pairs of the checked transfers, each recorded once in
    the job: a head group's sums by its first rank, the stages' messages by their
    receivers, the sums over stages by stage 0 (of head rank 0), the tied ends' sums by
    stage 0 of every head rank, the data group's gradient sums
    and ZeRO-1's gathers by the first copy of the model, the token slices' messages by
    every rank (its own)."""
    replica, head = grid.coord("data"), grid.coord("tensor") == 0
    found = list(groups.heads.records) if head else []
    if groups.p2p is not None and head:  # the messages between stages, received here
        found += groups.p2p.records
        if grid.coord("pipeline") == 0:  # the sums over the stages
            found += groups.pipe.records
    if groups.tied is not None and grid.coord("pipeline") == 0:  # the tied ends' sum of
        # every head rank (its row block with the vocabulary split), by its first stage
        found += groups.tied.records
    if first_copy:
        found += groups.data.records
        if groups.gather is not None:  # the gathered parameter shards (ZeRO-1)
            found += groups.gather.records
    if groups.sequence is not None:  # the messages between token slices, this rank's own
        found += groups.sequence.transfer.records
    return [(replica, r) for r in found]


class Checkpointer:
    """The whole model out of its shards: ``gather`` brings parameters (and optimizer
    state) to rank 0 in Hugging Face names, ``save`` writes a checkpoint there (the outcome
    agreed), ``final_params`` gives the export its parameters (those of the last save when
    it was at the last step). Every method is collective over the world."""

    def __init__(self, cfg: Config, world: MPI.Comm, plan: Any, trainer: Trainer,
                 kept: dict[str, np.ndarray], first_copy: bool, resume: str | None,
                 force: bool, identity: dict[str, str], family: dict[str, Any]) -> None:
        self.cfg, self.world, self.plan, self.trainer = cfg, world, plan, trainer
        self.kept = kept  # tensors training does not change (rank 0's), for the export
        self.first_copy = first_copy  # replica 0 (and sequence slice 0) holds the model
        self.resume, self.force = resume, force
        self.identity = identity  # the job's identity, stored in every checkpoint (--resume)
        self.family = family  # the model family trained (``families.trained_as``)
        self.written: set[Path] = set()  # checkpoints this job wrote: the next may replace
        self.latest: dict[str, np.ndarray] = {}  # the whole parameters last gathered (rank 0)
        self.saved = -1  # the steps done at the last checkpoint (every rank)

    def gather(self, optimizer: bool = True) -> dict[str, dict[str, np.ndarray]]:
        """The whole model (and optimizer state) in HF naming, on rank 0 (replica 0 holds
        it; each stage's head group gathers its shards, then the stages gather to stage 0:
        embeddings from the first, the head from the last); {} elsewhere."""
        from ..core.backend import to_host

        grid, trainer = self.plan.grid, self.trainer
        stage = grid.coord("pipeline")
        full = {}
        kinds = trainer.opt.names if optimizer else []
        states = [(kind, trainer.state_arrays(kind)) for kind in kinds]  # ZeRO: collective
        if not self.first_copy:
            return full
        for key, arrays in [("params", trainer.arrays()), *states]:
            p = rebuild(trainer.params, [to_host(a) for a in arrays])
            pieces = grid.comm("tensor").gather((p.layers, vocab_rows(p)), root=0)
            if grid.coord("tensor") != 0:
                continue
            p = join_vocab(p, [pc[1] for pc in pieces])
            pieces = [pc[0] for pc in pieces]
            layers = [join_shards([pc[i] for pc in pieces]) for i in range(len(p.layers))]
            parts = grid.comm("pipeline").gather((p.emb, layers, p.head), root=0)
            if stage == 0:
                every = [lay for _, lays, _ in parts for lay in lays]
                full[key] = to_hf(parts[0][0], every, parts[-1][2])
                if key == "params":
                    full[key].update(self.kept)
        return full

    def save(self, done: int, corpus: Corpus, history: History,
             tokenizer: dict[str, bytes]) -> Path:
        """Gather the whole model and optimizer state to rank 0, which writes the checkpoint
        of ``done`` steps; the outcome is agreed by every rank."""
        from ..io.outfile import Reservation
        from . import jobkit

        cfg, trainer = self.cfg, self.trainer
        full = self.gather()
        self.latest = full.get("params", {})
        self.saved = done
        path = checkpoint_path(cfg.train, done)

        def write() -> None:
            replace = self.force or path in self.written or bool(
                self.resume and path.exists() and path.samefile(self.resume))
            state = {kind: full[kind] for kind in trainer.opt.names}
            write_checkpoint(Reservation(path, replace), cfg, done, full["params"], state,
                             corpus, history, self.plan.grid.axis_size("tensor"), tokenizer,
                             self.identity, self.family)
            self.written.add(path)

        jobkit.conclude(self.world, write if self.world.Get_rank() == 0 else None,
                        final=False)
        return path

    def final_params(self, done: int) -> dict[str, np.ndarray]:
        """The whole parameters after ``done`` steps on rank 0 ({} elsewhere): the last
        checkpoint's when it was at ``done``, else gathered now (the same verdict on every
        rank)."""
        if self.saved != done:
            self.latest = self.gather(optimizer=False).get("params", {})
        return self.latest


@dataclass
class Model:
    """What a training job holds after its setup (``build``): the placement, the groups of
    ranks the step sums over, the trainer (parameters and optimizer state on this rank),
    the history so far and the step to start from."""

    plan: Any
    groups: Groups
    trainer: Trainer
    history: History
    start: int
    first_copy: bool  # replica 0 and sequence slice 0: the ranks whose shards are the model


def build(cfg: Config, world: MPI.Comm, finished: Any, corpus: Corpus, ck: Any) -> Model:
    """Collective: grid, backend and reducers (``place``), pipeline links, ZeRO-1's gather,
    this rank's shard of the parameters (seeded, ``model.weights`` or the checkpoint) and
    the optimizer state (the checkpoint's, re-sliced to this layout)."""
    from .placement import make_reducer, make_sequence, place

    rank, m = world.Get_rank(), cfg.model
    first = train_batch(corpus, cfg, 0, 1, 0)  # the whole global batch of step 0
    tensor = finished.tensor
    plan = place(cfg, world, finished, InputBatch(first.ids, first.key_mask))
    grid, shard, xp = plan.grid, plan.shard, plan.backend.xp
    summed = ("data", "sequence")  # the ranks whose parameter gradients are summed
    stages, stage = grid.axis_size("pipeline"), grid.coord("pipeline")
    groups = Groups(make_reducer(cfg, plan),
                    make_reducer(cfg, plan, grid.comm_over(summed),
                                 grid.shape.group_over(rank, summed)),
                    tensor, grid.coord("tensor"), grid.axis_size("data"),
                    grid.coord("data"), stages, stage, cfg.parallel.microbatches,
                    sequence=make_sequence(cfg, plan, first.ids.shape[1]),
                    vocab=vocab_split(cfg, corpus.vocab, tensor, grid.coord("tensor")))
    if cfg.parallel.zero and grid.axis_size("data") > 1 and groups.sequence is None:
        groups.gather = _zero_gather(cfg, plan)
    if stages > 1:
        groups.p2p, groups.pipe, groups.tied = _stage_links(cfg, plan)

    def part(whole: mlm.Params) -> mlm.Params:
        return stage_params(whole, stage, stages, m.layers)

    params = part(init_params(cfg, shard, corpus.vocab, stage_layers(m.layers, stages, stage)))
    history, start = History(), 0
    if ck is not None:
        params = part(mlm.Params(*from_hf(ck.params, m.layers, m.hidden // m.heads, shard)))
        history, start = ck.history, ck.step
    params = rebuild(params, [xp.asarray(a) for _, a, _ in mlm.named(params)])
    trainer = Trainer(cfg, corpus, params, groups, xp, plan.backend.timer())
    if ck is not None:
        for kind in trainer.opt.names:
            emb, layers, head = from_hf(ck.state[kind], m.layers, m.hidden // m.heads, shard)
            trainer.load_state(kind, part(mlm.Params(emb, layers, head)))
    first_copy = grid.coord("data") == 0 and grid.coord("sequence") == 0
    return Model(plan, groups, trainer, history, start, first_copy)


def _stop_requested(world: MPI.Comm, requested: int = 0) -> int:
    """Collective: the signal some rank's watchdog caught (SIGTERM, SIGUSR1), 0 if none."""
    from ..parallel import watchdog

    dog = watchdog.current()
    return _flags(world, max(requested, dog.stop_requested if dog else 0))[0]


@dataclass
class Evaluator:
    """The held-out loss: before training (a fresh start) and when ``eval_due``; an
    evaluation a stop request interrupts leaves no half a record."""

    world: MPI.Comm
    trainer: Trainer
    history: History

    def start(self, cfg: Config, start: int) -> None:
        if start == 0 and cfg.train.eval_batches > 0:  # the starting model's own loss
            self._record(-1, self.trainer.evaluate())

    def after(self, step: int) -> int:
        """Evaluate after ``step``; the agreed stop signal if one came meanwhile (0: none)."""
        held = self.trainer.evaluate(stop=lambda: _stop_requested(self.world))
        if held is None:  # a stop request during the evaluation: no half an eval
            return _stop_requested(self.world, signal.SIGTERM)
        self._record(step, held)
        return 0

    def _record(self, step: int, held: float) -> None:
        self.history.eval_step.append(step)
        self.history.eval_loss.append(held)


@dataclass
class Trained:
    """What the loop leaves: steps done, the agreed stop signal (0: finished), seconds per
    timed step and phase, the last checkpoint written (None: none)."""

    done: int
    stopped: int
    seconds: np.ndarray  # (session_step, phase)
    checkpoint: Path | None


def loop(cfg: Config, world: MPI.Comm, model: Model, saver: Checkpointer,
         corpus: Corpus, tokenizer: dict[str, bytes]) -> Trained:
    """Collective: the optimizer steps from ``model.start``: each step, its finite check
    and the stop agreement (one tiny Allreduce), its history row, the evaluation and the
    checkpoint when due (or when stopping), the progress bar."""
    from ..errors import NumericalError
    from ..parallel import watchdog

    t, trainer, history = cfg.train, model.trainer, model.history
    backend, start = model.plan.backend, model.start
    evaluator = Evaluator(world, trainer, history)
    evaluator.start(cfg, start)
    seconds = np.zeros((t.steps - start, len(PHASES)))
    stopped, done, ckpt = 0, start, None
    world.Barrier()
    bar = Progress(t.steps, "step", start=start, verbose=world.Get_rank() == 0, desc="train")
    for step in range(start, t.steps):
        watchdog.at(step=step)
        backend.sync()  # the evaluation's device work is not this step's
        t0 = time.perf_counter()
        r = trainer.step(step)
        tokens = cfg.input.batch * cfg.input.seq_len / (time.perf_counter() - t0)
        dog = watchdog.current()
        bad = not (np.isfinite(r.loss) and np.isfinite(r.grad_norm))
        bad, stopped = _flags(world, int(bad), dog.stop_requested if dog else 0)
        if bad:
            raise NumericalError(
                f"training diverged at step {step}: loss {r.loss:.4g}, gradient norm"
                f" {r.grad_norm:.4g} (inf/NaN); lower train.lr, raise train.warmup or set"
                " train.clip", world)
        history.record(step, r.loss, r.lr, r.grad_norm, tokens)
        if eval_due(step, t) and not stopped:
            stopped = evaluator.after(step)
        done = step + 1
        if checkpoint_due(step, t) or stopped:
            c0 = time.perf_counter()
            ckpt = saver.save(done, corpus, history, tokenizer)
            r.seconds["checkpoint"] = time.perf_counter() - c0
        seconds[step - start] = [r.seconds[p] for p in PHASES]
        bar.update(1, loss=f"{r.loss:.3f}", lr=f"{r.lr:.2e}", tok_s=f"{tokens:.0f}")
        if stopped:
            break
    bar.close()
    if done == t.steps:  # a stop agreed on the last step: the run is complete
        stopped = 0
    return Trained(done, stopped, seconds[: done - start], ckpt)


def train(cfg: Config, world: MPI.Comm, out_path: str, force: bool,
          resume: str | None = None) -> Path | None:
    """The whole training job on every rank; returns the output path on rank 0: the
    pre-flight, ``build``, ``loop`` (with its ``Checkpointer`` and ``Evaluator``), then
    the file and the export (``epilogue``).

    Raises ``Stopped`` on every rank after a signal (SIGTERM, SIGUSR1: Slurm's warning
    before the time limit) was agreed on at a step boundary, the checkpoint written.
    """
    from ..errors import Stopped
    from ..io.families import trained_as
    from ..io.weights import model_folder
    from . import jobkit

    rank, size = world.Get_rank(), world.Get_size()
    started = dt.datetime.now(dt.UTC)
    wall0 = time.perf_counter()
    out_force = force or _resumable_output(out_path, resume)
    (finished, corpus, ck, resume, tokenizer, identity, notes), out = jobkit.preflight(
        world, lambda: check_training(cfg, size, resume, force, out_path),
        output=(out_path, out_force))
    for note in notes if rank == 0 else ():
        print(f"mpiattn: note: {note}", flush=True)
    jobkit.set_timeout(cfg.comm.timeout)
    model = build(cfg, world, finished, corpus, ck)
    family = trained_as(model_folder(cfg.model.weights) if cfg.model.weights else None)
    kept = untrained_tensors(cfg, ck) if rank == 0 else {}
    saver = Checkpointer(cfg, world, model.plan, model.trainer, kept, model.first_copy,
                         resume, force, identity, family)
    try:
        run = loop(cfg, world, model, saver, corpus, tokenizer)
        path = conclude(cfg, world, model, saver, run, out, out_path, started, wall0,
                        corpus, tokenizer, family, resume, force)
    finally:
        if out is not None:
            out.discard()
    if run.stopped:
        t = cfg.train
        raise Stopped(f"stopped by {signal.Signals(run.stopped).name} after {run.done} of"
                      f" {t.steps} steps: checkpoint '{run.checkpoint}', partial output"
                      f" '{out_path}' (status interrupted); continue with --resume"
                      f" {run.checkpoint} (or --resume auto)")
    return path


def conclude(cfg: Config, world: MPI.Comm, model: Model, saver: Checkpointer, run: Trained,
             out: Any, out_path: str, started: dt.datetime, wall0: float, corpus: Corpus,
             tokenizer: dict[str, bytes], family: dict[str, Any], resume: str | None,
             force: bool) -> Path | None:
    """Collective: the training file (history, timings, records; status "interrupted"
    after a stop) through the job epilogue, then (finished runs) the Hugging Face export
    and the summary line on rank 0."""
    from ..io.formats.train import write_train
    from ..parallel.comm import gather_rows
    from . import epilogue

    t, history, start = cfg.train, model.history, model.start
    all_seconds = gather_rows(world, run.seconds[None])
    model.plan.backend.sync()
    totals = gather_rows(world, np.array([time.perf_counter() - wall0]))
    records = epilogue.gather_records(world, _transfer_records(model.plan.grid, model.groups,
                                                               model.first_copy))
    folder = None if run.stopped else export_folder(cfg, out_path)
    latest = saver.final_params(run.done) if folder is not None else {}  # collective

    def write(f: Any) -> None:
        write_train(f, history, {"unigram_entropy": unigram_entropy(corpus),
                                 "vocab": corpus.vocab, "first_step": start,
                                 "resumed_from": resume or ""},
                    all_seconds, totals, records, start,
                    "interrupted" if run.stopped else "complete")

    def export_model(folder: Path) -> str:
        """The Hugging Face folder, after the output: a failed export loses neither."""
        from ..errors import UserError
        from ..io import export

        info = {"trained_by": f"mpiattn {__version__} train", "steps": run.done,
                "held_out_loss": history.eval_loss[-1] if history.eval_loss else None}
        try:
            export.publish(export.build(cfg.model, latest, corpus.token_ids, tokenizer, info,
                                        family), folder, force)
        except UserError as err:
            where = checkpoint_path(t, run.done)
            kept = (f"; the model is in '{where}': mpiattn export {where} DIR"
                    if saver.saved == run.done else "; no checkpoint holds the final model"
                    " (train.checkpoint_every = 0)")
            raise type(err)(f"{err}; the output '{out.path}' is written{kept}") from None
        return f"\nexported {folder} (Hugging Face {export.ARCHITECTURES[family['model_type']]})"

    def after() -> Path:
        if run.stopped:
            return out.path
        exported = export_model(folder) if folder is not None else ""
        ev = ""
        if history.eval_loss:
            before = (f"{history.eval_loss[0]:.4f} before step 0 -> "
                      if history.eval_step[0] == -1 and len(history.eval_loss) > 1 else "")
            ev = f"; held-out loss {before}{history.eval_loss[-1]:.4f}"
        speed = float(np.median(history.tokens_per_second[start:]))
        print(f"trained steps {start}..{t.steps - 1}: loss {history.loss[-1]:.4f}{ev}"
              f" (unigram baseline {unigram_entropy(corpus):.4f} nats), {speed:.0f} tokens/s"
              f" (median), wall {totals.max():.1f} s\nwrote {out.path}{exported}", flush=True)
        return out.path

    return epilogue.finish(world, out, cfg, model.plan, started, "train", write, after=after)
