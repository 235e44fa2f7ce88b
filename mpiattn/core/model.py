"""BERT encoder on one rank's shard of heads, array-module generic, MPI-free.

The layer has three functions side by side: ``layer_forward`` (what run and bench time:
fused, in place, work arrays reused, optional overlap of reductions), ``layer_forward_cached``
(what training runs: the same math, keeping a ``LayerCache``) and ``layer_backward``.

Megatron tensor parallelism: Q/K/V and the first MLP linear are split by columns, the
output projection and the second MLP linear by rows; after each row-parallel product the
partial sums go through ``reduce`` (an Allreduce(SUM) across the head group when run under
MPI, the identity in one process). ``Y = sum_r Y_r + b`` is exact multi-head attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from . import rotary
from .attention import KeyMask, Options, attention_backward, attention_cached, heads_attention
from .backend import get_array_module
from .ops import (
    GeluCache,
    LayerNormCache,
    LinearCache,
    add_layer_norm,
    embed,
    gelu,
    gelu_backward,
    gelu_cached,
    layer_norm,
    layer_norm_backward,
    layer_norm_cached,
    linear_backward,
    linear_cached,
    relative_buckets,
)
from .shard import partition
from .timing import Timer

SITES = ("attention", "mlp")  # where a layer reduces partial sums
BACKWARD_SITES = ("attention.bwd", "mlp.bwd")  # where layer_backward reduces gradients


@dataclass
class LayerShard:
    """One rank's slice of one encoder layer (weights stored (in, out) for x @ W)."""

    w_qkv: Any  # (hidden, 3*w): [Q | K | V] columns of this rank's heads, w = heads*head_dim
    b_qkv: Any  # (3*w,)
    w_o: Any  # (w, hidden): rows of the output projection for these heads
    b_o: Any  # (hidden,) replicated, added once after the reduction
    ln1_g: Any
    ln1_b: Any
    w_1: Any  # (hidden, f): MLP columns tied to these heads
    b_1: Any  # (f,)
    w_2: Any  # (f, hidden)
    b_2: Any  # (hidden,) replicated
    ln2_g: Any
    ln2_b: Any
    head_dim: int

    @property
    def heads(self) -> int:
        return self.w_o.shape[0] // self.head_dim


@dataclass
class RotaryLayerShard(LayerShard):
    """A rotary family's layer shard. ModernBERT: pre-LayerNorm (``ln1`` before attention,
    None in layer 0, which has none; ``ln2`` before the MLP), RoPE on Q and K, GeGLU
    (``w_1`` (hidden, 2f) holds this rank's f activated columns then their f linear
    columns, ``b_1`` (2f,)), and in local layers a sliding window. NomicBERT
    (``prenorm`` False): BERT's post-LayerNorm layer with RoPE and SwiGLU (``act``
    "silu"). Absent biases are zeros (adding them is exact)."""

    rope_theta: float = 10_000.0  # RoPE base of this layer (global or local)
    window: int | None = None  # local layers: keys within +-window of the query; None: all
    final_g: Any = None  # the model's final LayerNorm, applied after the last layer only
    final_b: Any = None
    prenorm: bool = True  # False: LayerNorm after each residual sum, as BERT
    act: str = "gelu"  # the gate's activation: "gelu" (GeGLU) or "silu" (SwiGLU)


@dataclass
class Embeddings:
    """The embedding tables (E = hidden, or ELECTRA's embedding_size)."""

    word: Any  # (vocab, E)
    position: Any  # (max_positions, E); RoBERTa family: (padding_idx + 1 + max_positions, E)
    token_type: Any  # (type_vocab, E); DistilBERT: one zero row
    ln_g: Any  # (E,)
    ln_b: Any  # (E,)
    project_w: Any = None  # ELECTRA: (E, hidden) after the LayerNorm, or None
    project_b: Any = None  # (hidden,) or None
    padding_idx: Any = None  # RoBERTa family: token n of a row reads position row
    # padding_idx + 1 + n (n counts real tokens), padding reads row padding_idx; None: BERT
    relative_bias: Any = None  # MPNet: (32 buckets, this rank's heads) columns of the
    # relative position bias added to every layer's scores; None: none


def with_relative_bias(options: Options | None, emb: Embeddings | None, seq: int) -> Any:
    """``options`` carrying MPNet's (local heads, S, S) position bias for sequences of
    ``seq`` tokens (``ops.relative_buckets``), computed once for every layer; the same
    options when the model has none."""
    if emb is None or getattr(emb, "relative_bias", None) is None:
        return options
    options = options or Options()
    if options.sequence is not None:
        raise ValueError("MPNet's relative position bias is not built with parallel.sequence")
    xp = get_array_module(emb.relative_bias)
    bias = emb.relative_bias[relative_buckets(seq, xp)]  # (S, S, h)
    return dataclasses.replace(options, position_bias=xp.ascontiguousarray(
        bias.transpose(2, 0, 1)))


class Reduce(Protocol):
    """Sum partial results over the head group; the one communication of a layer."""

    def buffer(self, rows: int, cols: int, dtype: Any, slot: int = 0) -> Any:
        """A writable (rows, cols) array to compute the partial into (reused between calls)."""

    def __call__(self, partial: Any, *, site: str, layer: int) -> Any:
        """The summed (rows, cols) result; valid until the next call."""

    def start(self, partial: Any, *, site: str, layer: int, slot: int = 0) -> Any:
        """Begin summing (nonblocking); ``finish(handle)`` returns the result."""

    def finish(self, handle: Any) -> Any: ...


class LocalReduce:
    """The single-process reduction: there is nothing to sum."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def buffer(self, rows: int, cols: int, dtype: Any, slot: int = 0) -> Any:
        return self.xp.empty((rows, cols), dtype=dtype)

    def __call__(self, partial: Any, *, site: str, layer: int) -> Any:
        return partial

    def start(self, partial: Any, *, site: str, layer: int, slot: int = 0) -> Any:
        return partial

    def finish(self, handle: Any) -> Any:
        return handle


Phase = Callable[[str], Any]  # phase("qkv") -> context manager that times the block


def no_timing(_: str) -> Any:
    return nullcontext()


class PhaseTimer:
    """Accumulates seconds per (layer, phase), timed by a ``timing.Timer`` (CUDA events on
    CuPy, ``perf_counter`` on NumPy; a plain callable ``clock`` is a host clock).

    Phases nest: a phase timed inside another (the sequence group's transfers inside
    ``attention``) is taken out of the outer one, so every second counts once. Intervals
    are kept as pairs of marks and turned into seconds when ``seconds`` is read: on CuPy
    one synchronise for all of them, never a host clock around queued kernels.
    ``intervals``: (layer, phase) -> intervals timed."""

    def __init__(self, clock: Timer | Callable[[], float], phases: tuple[str, ...]) -> None:
        self.timer = clock if isinstance(clock, Timer) else Timer(clock=clock)
        self.phases = phases
        self._seconds: dict[tuple[int, str], float] = {}
        self.intervals: dict[tuple[int, str], int] = {}
        self.layer = 0
        # (key, start mark, end mark, index of the enclosing interval or -1), unresolved
        self._pending: list[tuple[tuple[int, str], Any, Any, int]] = []
        self._open: list[int] = []  # indices in ``_pending`` of the phases still open

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        key = (self.layer, phase)
        parent = self._open[-1] if self._open else -1
        index = len(self._pending)
        self._pending.append((key, self.timer.mark(), None, parent))
        self._open.append(index)
        try:
            yield
        finally:
            self._open.pop()
            self._pending[index] = (key, self._pending[index][1], self.timer.mark(), parent)
            self.intervals[key] = self.intervals.get(key, 0) + 1

    @property
    def seconds(self) -> dict[tuple[int, str], float]:
        """(layer, phase) -> seconds, inner phases taken out of outer ones. Resolves the
        closed intervals (one synchronise on CuPy); phases still open are left pending."""
        if self._open:  # read inside a phase (nothing does): resolve the closed ones later
            return dict(self._seconds)
        pending, self._pending = self._pending, []
        spans = self.timer.elapsed([(start, end) for _, start, end, _ in pending])
        inner = [0.0] * len(pending)
        for (_, _, _, parent), span in zip(pending, spans, strict=True):
            if parent >= 0:
                inner[parent] += span
        for (key, _, _, _), span, taken in zip(pending, spans, inner, strict=True):
            self._seconds[key] = self._seconds.get(key, 0.0) + span - taken
        return dict(self._seconds)


def attention_partial(
    x2: Any, p: LayerShard, mask: KeyMask, reduce: Reduce, batch: int, seq: int,
    phase: Phase = no_timing, options: Options | None = None, slot: int = 0,
    probe: Any = None, layer: int = 0,
) -> Any:
    """This rank's heads' share of multi-head attention: (B*S, H) -> partial (B*S, H).

    Column-parallel QKV (one fused GEMM), local attention, row-parallel output projection
    written straight into the reduction's buffer. Without RoPE or sequence parallelism
    the QKV bias goes to ``heads_attention``, which adds it as the fused kernel reads the
    product (else to the product first, timed as ``attention``). ``probe``: a
    ``headstats.Probe`` that receives this rank's heads' statistics and maps (timed as
    ``attention``), or None.
    With ``options.sequence`` (sequence parallelism) the rows are this rank's tokens and
    attention reaches every key through the sequence group (``seqattn``; ``layer`` labels
    its transfers).
    """
    xp = get_array_module(x2)
    rows, hidden = x2.shape
    options = options or Options()
    with phase("qkv"):
        qkv = options.scratch(f"qkv{slot}", (rows, p.w_qkv.shape[1]), x2.dtype, xp)
        xp.matmul(x2, p.w_qkv, out=qkv)  # (B*S, 3*h*d)
        rotates = isinstance(p, RotaryLayerShard)
        late_bias = not rotates and options.sequence is None  # heads_attention adds it
        if not late_bias:
            qkv += p.b_qkv
        if rotates:  # RoPE at this rank's tokens' positions
            first = options.sequence.split.start if options.sequence is not None else 0
            rotary.rotate(qkv, batch, rows // batch, p.heads, p.head_dim, p.rope_theta, first)
    if isinstance(p, RotaryLayerShard) and p.window is not None:
        options = dataclasses.replace(options, window=p.window)
    with phase("attention"):
        o = options.scratch(f"o{slot}", (rows, p.heads * p.head_dim), x2.dtype, xp)
        if options.sequence is not None:
            options.sequence.forward(qkv, o, batch, p.heads, p.head_dim, mask, options, layer)
        else:
            heads_attention(qkv, o, batch, seq, p.heads, p.head_dim, mask, options, probe,
                            p.b_qkv if late_bias else None)
    with phase("out_proj"):
        partial = reduce.buffer(rows, hidden, x2.dtype, slot)
        xp.matmul(o, p.w_o, out=partial)
    return partial


def mlp_partial(h1: Any, p: LayerShard, reduce: Reduce, phase: Phase = no_timing,
                slot: int = 0, options: Options | None = None) -> Any:
    """This rank's MLP columns: GELU(h1 W1 + b1) W2 as a partial sum (B*S, H)."""
    xp = get_array_module(h1)
    options = options or Options()
    shape = (h1.shape[0], p.w_1.shape[1])
    with phase("mlp"):
        a = options.scratch(f"a{slot}", shape, h1.dtype, xp)
        xp.matmul(h1, p.w_1, out=a)
        if isinstance(p, RotaryLayerShard):  # act(activated + b) * (linear + b)
            a += p.b_1
            a = rotary.glu(a, p.act)
            partial = reduce.buffer(h1.shape[0], h1.shape[1], h1.dtype, slot)
            xp.matmul(a, p.w_2, out=partial)
            return partial
        a = gelu(a, out=options.scratch(f"gelu{slot}", shape, h1.dtype, xp), bias=p.b_1)
        partial = reduce.buffer(h1.shape[0], h1.shape[1], h1.dtype, slot)
        xp.matmul(a, p.w_2, out=partial)
    return partial


def attention_block(
    x2: Any, p: LayerShard, mask: KeyMask, reduce: Reduce, layer: int, batch: int, seq: int,
    phase: Phase = no_timing, options: Options | None = None, probe: Any = None,
) -> Any:
    """Multi-head attention of the whole model from this rank's heads, less the output
    bias: (B*S, H) -> (B*S, H), valid until the reduction's next call."""
    partial = attention_partial(x2, p, mask, reduce, batch, seq, phase, options, probe=probe,
                                layer=layer)
    with phase("allreduce"):
        return reduce(partial, site="attention", layer=layer)


def _chunked(reduce: Reduce, site: str, layer: int, spans: list[tuple[int, int]],
             partial_of: Callable[[int, int, int], Any], out: Any, phase: Phase) -> Any:
    """Compute the partial of each row span and start its reduction at once, so the sum of
    span i travels while span i+1 is computed; then collect the sums in order."""
    handles = []
    for slot, (start, stop) in enumerate(spans):
        partial = partial_of(slot, start, stop)
        with phase("allreduce"):
            handles.append(reduce.start(partial, site=site, layer=layer, slot=slot))
    with phase("allreduce"):
        for (start, stop), handle in zip(spans, handles, strict=True):
            out[start:stop] = reduce.finish(handle)
    return out


def layer_forward(
    x: Any, p: LayerShard, mask: KeyMask, reduce: Reduce, layer: int, eps: float,
    phase: Phase = no_timing, options: Options | None = None, chunks: int = 1,
    probe: Any = None,
) -> tuple[Any, Any]:
    """One encoder layer on this rank's heads: (B, S, H) -> (attention output, hidden).

    ``chunks > 1`` splits the batch into that many groups of sequences and overlaps the
    reduction of one group with the computation of the next; the numbers agree to
    rounding (BLAS may round a product of fewer rows differently: ~5e-7 in float32).
    ``probe``: this layer's ``headstats.Probe`` (per-head statistics, maps), or None.
    """
    if isinstance(p, RotaryLayerShard) and p.prenorm:
        return prenorm_layer_forward(x, p, mask, reduce, layer, eps, phase, options, probe)
    xp = get_array_module(x)
    batch, seq, hidden = x.shape
    rows = batch * seq
    x2 = x.reshape(rows, hidden)
    chunks = min(chunks, batch)
    if chunks <= 1:
        attn = attention_block(x2, p, mask, reduce, layer, batch, seq, phase, options, probe)
    else:
        spans = []
        for i in range(chunks):
            count, first = partition(batch, chunks, i)
            spans.append((first * seq, (first + count) * seq))

        def attn_part(slot: int, start: int, stop: int) -> Any:
            n = (stop - start) // seq
            return attention_partial(x2[start:stop], p, mask.rows(start // seq, n), reduce, n,
                                     seq, phase, options, slot,
                                     None if probe is None else probe.rows(start // seq),
                                     layer)

        attn = _chunked(reduce, "attention", layer, spans, attn_part,
                        xp.empty((rows, hidden), x.dtype), phase)
    with phase("norm"):  # the bias goes in with the residual; attn_out keeps attn + bias
        attn_out = xp.empty((rows, hidden), x.dtype)
        h1 = add_layer_norm(attn, x2, p.ln1_g, p.ln1_b, eps, bias=p.b_o, total=attn_out,
                            out=options.scratch("h1", (rows, hidden), x.dtype, xp)
                            if options is not None else None)
    if chunks <= 1:
        partial = mlp_partial(h1, p, reduce, phase, options=options)
        with phase("allreduce"):
            mlp = reduce(partial, site="mlp", layer=layer)
    else:
        mlp = _chunked(reduce, "mlp", layer, spans,
                       lambda slot, start, stop: mlp_partial(h1[start:stop], p, reduce, phase,
                                                             slot, options),
                       xp.empty((rows, hidden), x.dtype), phase)
    with phase("norm"):
        out = add_layer_norm(mlp, h1, p.ln2_g, p.ln2_b, eps, bias=p.b_2)
    return attn_out.reshape(batch, seq, hidden), out.reshape(batch, seq, hidden)


def prenorm_layer_forward(
    x: Any, p: RotaryLayerShard, mask: KeyMask, reduce: Reduce, layer: int, eps: float,
    phase: Phase = no_timing, options: Options | None = None, probe: Any = None,
) -> tuple[Any, Any]:
    """One pre-LayerNorm layer (ModernBERT) on this rank's heads: (B, S, H) ->
    (attention output, hidden). r = x + Attn(LN1(x)); out = r + MLP(LN2(r)); then the
    final LayerNorm when this is the last layer. Two reductions, as in BERT's layer; the
    batch is not chunked (``chunks`` applies to the post-LayerNorm layer)."""
    batch, seq, hidden = x.shape
    rows = batch * seq
    x2 = x.reshape(rows, hidden)
    with phase("norm"):
        h = x2 if p.ln1_g is None else layer_norm(x2, p.ln1_g, p.ln1_b, eps)
    attn = attention_block(h, p, mask, reduce, layer, batch, seq, phase, options, probe)
    with phase("norm"):
        attn_out = attn + p.b_o  # a copy: the reduction's buffer is reused
        r = x2 + attn_out
        h2 = layer_norm(r, p.ln2_g, p.ln2_b, eps)
    partial = mlp_partial(h2, p, reduce, phase, options=options)
    with phase("allreduce"):
        mlp = reduce(partial, site="mlp", layer=layer)
    with phase("norm"):
        out = mlp + p.b_2
        out += r
        if p.final_g is not None:
            out = layer_norm(out, p.final_g, p.final_b, eps)
    return attn_out.reshape(batch, seq, hidden), out.reshape(batch, seq, hidden)


def mean_pool(hidden: Any, key_mask: Any) -> Any:
    """Mean over real tokens, then L2-normalised: the sentence-transformers embedding."""
    xp = get_array_module(hidden)
    weights = key_mask.astype(hidden.dtype)[:, :, None]
    pooled = (hidden * weights).sum(axis=1) / xp.maximum(weights.sum(axis=1), 1e-9)
    norm = xp.sqrt((pooled * pooled).sum(axis=-1, keepdims=True))
    return pooled / xp.maximum(norm, 1e-12)


def encoder_forward(
    ids: Any, key_mask: Any, emb: Embeddings, layers: list[LayerShard], reduce: Reduce,
    eps: float, phase: Phase = no_timing, on_layer: Callable[[int, Any, Any], None] | None = None,
    options: Options | None = None, chunks: int = 1, types: Any = None,
    stats: Any = None,
) -> Any:
    """Embeddings and all layers: ids, key_mask, types (B, S) -> last hidden (B, S, H).

    ``on_layer(i, attention, hidden)`` sees every layer's output; ``types`` are the token
    type (segment) ids, None for all 0 (see ``embed``); ``stats``: a
    ``headstats.HeadStats`` collecting this rank's heads' statistics, or None. With
    ``options.sequence``, ids and types are this rank's tokens (B, S_i) and key_mask covers
    whole sequences (B, S); the result is (B, S_i, H).
    """
    sequence = options.sequence if options is not None else None
    x = embed(ids, emb, eps, types, 0 if sequence is None else sequence.split.start, key_mask)
    options = with_relative_bias(options, emb, ids.shape[1])
    mask = KeyMask.from_mask(key_mask)
    for i, p in enumerate(layers):
        if hasattr(phase, "layer"):  # PhaseTimer and its wrappers attribute time to layers
            phase.layer = i
        attn, x = layer_forward(x, p, mask, reduce, i, eps, phase, options, chunks,
                                None if stats is None else stats.at(i))
        if on_layer is not None:
            on_layer(i, attn, x)
    return x


# --- training: the caching forward and the backward of one layer ----------------------


@dataclass
class LayerCache:
    """What ``layer_backward`` needs from ``layer_forward_cached``."""

    qkv: LinearCache  # column-parallel fused QKV
    attention: Any  # the attention algorithm's cache (attention.PlainCache/BlockedCache)
    out_proj: LinearCache  # row-parallel
    ln1: LayerNormCache
    mlp_in: LinearCache  # column-parallel
    gelu: GeluCache
    mlp_out: LinearCache  # row-parallel
    ln2: LayerNormCache
    shape: tuple[int, int, int]  # (B, S, H)
    layer: int
    head_dim: int
    sequence: Any = None  # the seqattn.SequenceAttention that made ``attention``, if any


def layer_forward_cached(x: Any, p: LayerShard, bias: Any, reduce: Reduce, layer: int,
                         eps: float, impl: str = "plain", block: int = 0,
                         sequence: Any = None) -> tuple[Any, LayerCache]:
    """(B, S, H) -> (B, S, H), the math of ``layer_forward`` with a cache.

    ``bias``: (B, 1, 1, S) additive key mask (``attention.mask_bias``); ``impl``/``block``:
    the attention algorithm (``attention.ALGORITHMS``). ``sequence``: a
    ``seqattn.SequenceAttention`` when x holds this rank's tokens (B, S_i, H) of sequences
    whose whole key mask is ``bias`` (B, 1, 1, S).
    """
    batch, seq, hidden = x.shape
    x2 = x.reshape(batch * seq, hidden)
    qkv, c_qkv = linear_cached(x2, p.w_qkv, p.b_qkv)  # column-parallel
    if sequence is None:
        o, c_att = attention_cached(qkv, bias, batch, seq, p.heads, p.head_dim, impl, block)
    else:
        o, c_att = sequence.forward_cached(qkv, bias, batch, p.heads, p.head_dim, impl, block,
                                           layer)
    partial, c_o = linear_cached(o, p.w_o)  # row-parallel
    attn = reduce(partial, site="attention", layer=layer) + p.b_o
    h1, c_ln1 = layer_norm_cached(attn + x2, p.ln1_g, p.ln1_b, eps)
    a, c_1 = linear_cached(h1, p.w_1, p.b_1)  # column-parallel
    g, c_gelu = gelu_cached(a)
    partial, c_2 = linear_cached(g, p.w_2)  # row-parallel
    mlp = reduce(partial, site="mlp", layer=layer) + p.b_2
    out, c_ln2 = layer_norm_cached(mlp + h1, p.ln2_g, p.ln2_b, eps)
    cache = LayerCache(c_qkv, c_att, c_o, c_ln1, c_1, c_gelu, c_2, c_ln2, x.shape, layer,
                       p.head_dim, sequence)
    return out.reshape(batch, seq, hidden), cache


def layer_backward(dout: Any, c: LayerCache, reduce: Reduce) -> tuple[Any, LayerShard]:
    """(dx, gradients of this rank's LayerShard); two reductions, at the column-parallel
    inputs (the conjugates of the forward ones: sites ``mlp.bwd`` and ``attention.bwd``)."""
    batch, seq, hidden = c.shape
    dout = dout.reshape(batch * seq, hidden)
    dm, dln2_g, dln2_b = layer_norm_backward(dout, c.ln2)  # d(mlp + h1)
    db_2 = dm.sum(axis=0)
    dg, dw_2, _ = linear_backward(dm, c.mlp_out)  # leaving the row-parallel region: no reduce
    da = gelu_backward(dg, c.gelu)
    dh1_part, dw_1, db_1 = linear_backward(da, c.mlp_in)
    dh1 = reduce(dh1_part, site="mlp.bwd", layer=c.layer) + dm  # entering column-parallel
    dr, dln1_g, dln1_b = layer_norm_backward(dh1, c.ln1)  # d(attn + x2)
    db_o = dr.sum(axis=0)
    do, dw_o, _ = linear_backward(dr, c.out_proj)
    if c.sequence is None:
        dqkv = attention_backward(do, c.attention)
    else:
        dqkv = c.sequence.backward(do, c.attention, do.shape[1] // c.head_dim, c.head_dim,
                                   c.layer)
    dx_part, dw_qkv, db_qkv = linear_backward(dqkv, c.qkv)
    # The key bias adds q.b_k to every score of a query row; softmax ignores such a shift, so
    # its gradient is exactly zero. Computed, it is rounding noise that Adam would blow up
    # to steps of size lr (and that differs between layouts): write the exact zero.
    width = db_qkv.shape[0] // 3
    db_qkv[width: 2 * width] = 0
    dx = reduce(dx_part, site="attention.bwd", layer=c.layer) + dr
    grads = LayerShard(w_qkv=dw_qkv, b_qkv=db_qkv, w_o=dw_o, b_o=db_o, ln1_g=dln1_g,
                       ln1_b=dln1_b, w_1=dw_1, b_1=db_1, w_2=dw_2, b_2=db_2, ln2_g=dln2_g,
                       ln2_b=dln2_b, head_dim=c.head_dim)
    return dx.reshape(batch, seq, hidden), grads


# --- a layer's shards <-> the whole layer ----------------------------------------------


def join_shards(pieces: list[LayerShard]) -> LayerShard:
    """The whole layer from every head rank's shard, in head-rank order (host arrays)."""
    import numpy as np

    def qkv(name: str, axis: int) -> Any:
        parts = [np.split(np.asarray(getattr(p, name)), 3, axis=axis) for p in pieces]
        return np.concatenate([part[i] for i in range(3) for part in parts], axis=axis)

    def cat(name: str, axis: int) -> Any:
        return np.concatenate([np.asarray(getattr(p, name)) for p in pieces], axis=axis)

    first = pieces[0]
    return LayerShard(
        w_qkv=qkv("w_qkv", 1), b_qkv=qkv("b_qkv", 0), w_o=cat("w_o", 0), b_o=first.b_o,
        ln1_g=first.ln1_g, ln1_b=first.ln1_b, w_1=cat("w_1", 1), b_1=cat("b_1", 0),
        w_2=cat("w_2", 0), b_2=first.b_2, ln2_g=first.ln2_g, ln2_b=first.ln2_b,
        head_dim=first.head_dim,
    )


def split_shard(full: LayerShard, cols: slice, ffn_cols: slice) -> LayerShard:
    """One head rank's shard of a whole layer: ``cols`` of Q/K/V, ``ffn_cols`` of the MLP
    (``HeadShard.cols`` and ``HeadShard.ffn_cols``). Copies, so shards own their memory."""
    hidden = full.w_o.shape[1]

    def qkv(a: Any) -> Any:
        parts = [a[..., i * hidden:(i + 1) * hidden][..., cols] for i in range(3)]
        xp = get_array_module(a)
        return xp.ascontiguousarray(xp.concatenate(parts, axis=-1))

    def own(a: Any) -> Any:  # C order: BLAS rounds the same way on every path
        return get_array_module(a).array(a, copy=True, order="C")

    return LayerShard(
        w_qkv=qkv(full.w_qkv), b_qkv=qkv(full.b_qkv), w_o=own(full.w_o[cols]),
        b_o=own(full.b_o), ln1_g=own(full.ln1_g), ln1_b=own(full.ln1_b),
        w_1=own(full.w_1[:, ffn_cols]), b_1=own(full.b_1[ffn_cols]),
        w_2=own(full.w_2[ffn_cols]), b_2=own(full.b_2), ln2_g=own(full.ln2_g),
        ln2_b=own(full.ln2_b), head_dim=full.head_dim,
    )
