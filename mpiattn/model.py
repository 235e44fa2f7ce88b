"""BERT encoder on one rank's shard of heads, array-module generic, MPI-free.

Megatron tensor parallelism: Q/K/V and the first MLP linear are split by columns, the
output projection and the second MLP linear by rows; after each row-parallel product the
partial sums go through ``reduce`` (an Allreduce(SUM) across the head group when run under
MPI, the identity in one process). ``Y = sum_r Y_r + b`` is exact multi-head attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from .attention import KeyMask, Options, heads_attention
from .backend import erf, get_array_module
from .shard import partition

SITES = ("attention", "mlp")  # where a layer reduces partial sums


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
class Embeddings:
    word: Any  # (vocab, hidden)
    position: Any  # (max_positions, hidden)
    token_type: Any  # (type_vocab, hidden)
    ln_g: Any
    ln_b: Any


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
    """Accumulates seconds per (layer, phase) with a clock that syncs the device."""

    def __init__(self, clock: Callable[[], float], phases: tuple[str, ...]) -> None:
        self.clock = clock
        self.phases = phases
        self.seconds: dict[tuple[int, str], float] = {}
        self.layer = 0

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            key = (self.layer, phase)
            self.seconds[key] = self.seconds.get(key, 0.0) + self.clock() - start


def layer_norm(x: Any, g: Any, b: Any, eps: float) -> Any:
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = xp.mean(centred * centred, axis=-1, keepdims=True)
    centred /= xp.sqrt(var + eps)
    centred *= g
    centred += b
    return centred


def gelu(x: Any, out: Any = None) -> Any:
    """Exact GELU, x * Phi(x), as BERT uses it; ``out`` (not ``x``) saves the temporaries."""
    xp = get_array_module(x)
    t = xp.multiply(x, x.dtype.type(1.0 / math.sqrt(2.0)), out=out)
    erf(t, out=t)
    t += 1.0
    t *= x
    t *= 0.5
    return t


def embed(ids: Any, emb: Embeddings, eps: float, types: Any = None) -> Any:
    """Word + position + token-type embeddings, then LayerNorm: (B, S) -> (B, S, H).

    ``types``: (B, S) integer segment ids in [0, type_vocab) (validated by the reader), or
    None for all 0 (one broadcast row, no (B, S, H) gather).
    """
    seq = ids.shape[1]
    segment = emb.token_type[0] if types is None else emb.token_type[types]
    x = emb.word[ids] + emb.position[:seq] + segment
    return layer_norm(x, emb.ln_g, emb.ln_b, eps)


def attention_partial(
    x2: Any, p: LayerShard, mask: KeyMask, reduce: Reduce, batch: int, seq: int,
    phase: Phase = no_timing, options: Options | None = None, slot: int = 0,
) -> Any:
    """This rank's heads' share of multi-head attention: (B*S, H) -> partial (B*S, H).

    Column-parallel QKV (one fused GEMM), local attention, row-parallel output projection
    written straight into the reduction's buffer.
    """
    xp = get_array_module(x2)
    rows, hidden = x2.shape
    options = options or Options()
    with phase("qkv"):
        qkv = options.scratch(f"qkv{slot}", (rows, p.w_qkv.shape[1]), x2.dtype, xp)
        xp.matmul(x2, p.w_qkv, out=qkv)  # (B*S, 3*h*d)
        qkv += p.b_qkv
    with phase("attention"):
        o = options.scratch(f"o{slot}", (rows, p.heads * p.head_dim), x2.dtype, xp)
        heads_attention(qkv, o, batch, seq, p.heads, p.head_dim, mask, options)
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
        a += p.b_1
        a = gelu(a, out=options.scratch(f"gelu{slot}", shape, h1.dtype, xp))
        partial = reduce.buffer(h1.shape[0], h1.shape[1], h1.dtype, slot)
        xp.matmul(a, p.w_2, out=partial)
    return partial


def attention_block(
    x2: Any, p: LayerShard, mask: KeyMask, reduce: Reduce, layer: int, batch: int, seq: int,
    phase: Phase = no_timing, options: Options | None = None,
) -> Any:
    """Multi-head attention of the whole model from this rank's heads: (B*S, H) -> (B*S, H)."""
    partial = attention_partial(x2, p, mask, reduce, batch, seq, phase, options)
    with phase("allreduce"):
        return reduce(partial, site="attention", layer=layer) + p.b_o


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
) -> tuple[Any, Any]:
    """One encoder layer on this rank's heads: (B, S, H) -> (attention output, hidden).

    ``chunks > 1`` splits the batch into that many groups of sequences and overlaps the
    reduction of one group with the computation of the next; the numbers are the same.
    """
    xp = get_array_module(x)
    batch, seq, hidden = x.shape
    rows = batch * seq
    x2 = x.reshape(rows, hidden)
    chunks = min(chunks, batch)
    if chunks <= 1:
        attn = attention_block(x2, p, mask, reduce, layer, batch, seq, phase, options)
    else:
        spans = []
        for i in range(chunks):
            count, first = partition(batch, chunks, i)
            spans.append((first * seq, (first + count) * seq))

        def attn_part(slot: int, start: int, stop: int) -> Any:
            n = (stop - start) // seq
            return attention_partial(x2[start:stop], p, mask.rows(start // seq, n), reduce, n,
                                     seq, phase, options, slot)

        attn = _chunked(reduce, "attention", layer, spans, attn_part,
                        xp.empty((rows, hidden), x.dtype), phase)
        attn += p.b_o
    with phase("norm"):
        h1 = layer_norm(attn + x2, p.ln1_g, p.ln1_b, eps)
    if chunks <= 1:
        partial = mlp_partial(h1, p, reduce, phase, options=options)
        with phase("allreduce"):
            mlp = reduce(partial, site="mlp", layer=layer) + p.b_2
    else:
        mlp = _chunked(reduce, "mlp", layer, spans,
                       lambda slot, start, stop: mlp_partial(h1[start:stop], p, reduce, phase,
                                                             slot, options),
                       xp.empty((rows, hidden), x.dtype), phase)
        mlp += p.b_2
    with phase("norm"):
        mlp += h1
        out = layer_norm(mlp, p.ln2_g, p.ln2_b, eps)
    return attn.reshape(batch, seq, hidden), out.reshape(batch, seq, hidden)


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
) -> Any:
    """Embeddings and all layers: ids, key_mask, types (B, S) -> last hidden (B, S, H).

    ``on_layer(i, attention, hidden)`` sees every layer's output; ``types`` are the token
    type (segment) ids, None for all 0 (see ``embed``).
    """
    x = embed(ids, emb, eps, types)
    mask = KeyMask.from_mask(key_mask)
    for i, p in enumerate(layers):
        if hasattr(phase, "layer"):  # PhaseTimer and its wrappers attribute time to layers
            phase.layer = i
        attn, x = layer_forward(x, p, mask, reduce, i, eps, phase, options, chunks)
        if on_layer is not None:
            on_layer(i, attn, x)
    return x
