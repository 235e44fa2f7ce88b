"""Sequence parallelism: attention over tokens that are split across the ranks of a group.

With ``parallel.sequence = Q`` every rank of a sequence group holds a contiguous slice of
the tokens of every sequence (``SequenceSplit``: ``shard.partition``, uneven allowed) for
everything outside attention: embeddings (at their own positions), LayerNorms, the MLP and
the tensor-parallel reductions work on local rows only. Attention needs every key, so two
standard algorithms move data between the slices:

- **Ulysses** (DeepSpeed-Ulysses, Jacobs et al. 2023, ``deepspeed/sequence/layer.py``):
  an Alltoall turns sequence-sharded Q, K, V into head-sharded full-sequence ones, the
  local attention (``attention.heads_attention``, any algorithm) runs on whole sequences
  for this rank's part of the heads, a second Alltoall returns to sequence sharding. Heads
  need not divide by Q: they are split by ``partition`` (12 heads on Q = 5: 3,3,2,2,2) and
  the Alltoall blocks are padded to the largest share, so the bytes moved grow by at most
  that padding; Ulysses needs at least one head per rank (``heads >= Q``).
- **Ring** (Liu et al. 2023, "Ring Attention"; the merge of zhuzilin/ring-flash-attention
  ``utils.py``): every rank keeps its query slice; the K/V slices travel around the ring
  (``ring.start``/``ring.finish``, nonblocking; ``ring.poll`` after every block lets MPI
  move them meanwhile) while the slice at hand is attended to with the blocked online
  softmax (``attention.partial_attention``); partial results (output, log-sum-exp) merge
  by log-sum-exp (``attention.merge``).
  The backward sends K/V around again with the dK/dV accumulator of each slice one hop
  behind, and a last hop brings each accumulator home.

Everything here is MPI-free: the transfers are objects passed in (``transfers.CheckedAlltoall``
and ``transfers.CheckedRing`` under MPI; thread-backed fakes in one-process tests), whose
every block is hashed by its sender and checked by its receiver. With ``phase`` set, the
transfers are timed as the phase ``sequence``. Sites (``fault.inject``):
Ulysses ``alltoall.qkv``, ``alltoall.out`` (forward), ``alltoall.dout``, ``alltoall.dqkv``
(backward); ring ``ring.kv`` (forward), ``ring.kv.bwd``, ``ring.dkv`` (backward).

Arrays: ``qkv`` is the fused (B*S_i, 3*h*d) [Q heads | K heads | V heads] product of the
local tokens, as ``model.attention_partial`` makes it; outputs (B*S_i, h*d).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from .attention import merge, partial_attention, partial_attention_backward
from .backend import get_array_module
from .rotary import overlaps
from .shard import counts, partition

ULYSSES_SITES = ("alltoall.qkv", "alltoall.out")
ULYSSES_BACKWARD_SITES = ("alltoall.dout", "alltoall.dqkv")
RING_SITES = ("ring.kv",)
RING_BACKWARD_SITES = ("ring.kv.bwd", "ring.dkv")
SITES = ULYSSES_SITES + RING_SITES
BACKWARD_SITES = ULYSSES_BACKWARD_SITES + RING_BACKWARD_SITES
ALGORITHMS = ("ulysses", "ring")
PHASES = ("sequence",)  # run's timings: the transfers' own (not hidden) seconds


def resolve(algorithm: str, heads: int, parts: int) -> str:
    """``attention.sequence`` for a head rank holding ``heads`` heads: "auto" is Ulysses when
    every sequence rank gets a head (its two Alltoalls move less than the ring's Q - 1 K/V
    hops), else the ring. ValueError when Ulysses is asked for with fewer heads than ranks."""
    if algorithm == "auto":
        return "ulysses" if heads >= parts else "ring"
    if algorithm == "ulysses" and heads < parts:
        raise ValueError(f"attention.sequence = \"ulysses\" splits each head rank's {heads}"
                         f" head(s) over parallel.sequence = {parts} ranks, and each needs one:"
                         f" use attention.sequence = \"ring\", or parallel.sequence <= {heads}")
    return algorithm


@dataclass(frozen=True)
class SequenceSplit:
    """Which tokens of a ``seq``-token sequence each of ``parts`` ranks holds."""

    seq: int
    parts: int
    index: int  # this rank's place in the sequence group

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(start, count) of every rank's slice, in rank order."""
        return [partition(self.seq, self.parts, j)[::-1] for j in range(self.parts)]

    @property
    def start(self) -> int:
        return self.spans[self.index][0]

    @property
    def count(self) -> int:
        return self.spans[self.index][1]

    @property
    def local(self) -> slice:
        return slice(self.start, self.start + self.count)

    @property
    def widest(self) -> int:
        return max(c for _, c in self.spans)


class Alltoall(Protocol):
    def __call__(self, blocks: Any, *, site: str, layer: int) -> Any:
        """``out[s] = blocks[me]`` of rank s (host arrays, block j goes to rank j)."""


class Ring(Protocol):
    def start(self, payload: Any, *, site: str, layer: int, channel: int = 0) -> Any:
        """Send ``payload`` to the next rank, receive the previous rank's (nonblocking)."""

    def poll(self, shift: Any) -> None:
        """Let the shift progress while the caller computes (never blocks)."""

    def finish(self, shift: Any) -> Any:
        """The array received from the previous rank, checked."""


# --- keys of a slice: the padding mask on them ------------------------------------------

def key_bias(mask: Any, start: int, count: int, batch: int, xp: Any, dtype: Any) -> Any:
    """(B, 1, 1, count) 0/-inf additive bias of keys start..start+count, or None when every
    one is a real token. ``mask``: an ``attention.KeyMask`` over whole sequences."""
    if mask.lengths is not None:
        if min(mask.lengths) >= start + count:
            return None
        keys = xp.arange(start, start + count)[None, :]
        real = keys < mask.device_lengths(xp)  # on the device once per forward
    else:
        real = mask.bias[:, start:start + count] == 0
        if bool(real.all()):
            return None
    bias = xp.where(real, 0, -xp.inf).astype(dtype)
    return bias[:, None, None, :]


# --- the two algorithms ----------------------------------------------------------------

@dataclass
class UlyssesCache:
    attention: Any  # the local attention algorithm's cache, over whole sequences
    batch: int


@dataclass
class RingCache:
    q: Any  # (B, h, S_i, d) unscaled
    kv: Any  # (B, S_max, 2, h, d) this rank's keys and values, padded
    o: Any  # (B, h, S_i, d)
    lse: Any  # (B, h, S_i, 1)
    mask: Any  # attention.KeyMask over whole sequences
    scale: float
    block: int


@dataclass
class SequenceAttention:
    """Attention of one rank of a sequence group (``algorithm`` "ulysses" or "ring").

    ``transfer``: an ``Alltoall`` (Ulysses) or a ``Ring``. ``heads``: this head rank's heads
    (all of them travel through the sequence group). Used by ``model.attention_partial``
    (inference), ``model.layer_forward_cached`` and ``model.layer_backward`` (training).
    """

    algorithm: str
    split: SequenceSplit
    transfer: Any
    block: int = 512  # the ring's query and key block
    phase: Any = None  # a model.Phase that times the transfers as "sequence", or None
    skipped: int = 0  # ring steps not computed: no key of the slice within any local
    # query's sliding window (ModernBERT's local layers); the slice still travels on

    def _timed(self) -> Any:
        return nullcontext() if self.phase is None else self.phase("sequence")

    # -- Ulysses: head-sharded whole sequences <-> sequence-sharded all heads ------------

    def _padded(self, like: Any, heads: int, head_dim: int) -> tuple[list, Any]:
        """Every rank's head share (count, first) and a zeroed Alltoall buffer
        (Q, B, widest slice, c, widest share, d) shaped after ``like`` (B, ., c, ., d)."""
        xp, parts = get_array_module(like), self.split.parts
        shares = [partition(heads, parts, j) for j in range(parts)]
        blocks = xp.zeros((parts, like.shape[0], self.split.widest, like.shape[2],
                           max(counts(heads, parts)), head_dim), dtype=like.dtype)
        return shares, blocks

    def _alltoall(self, blocks: Any, layer: int, site: str) -> Any:
        with self._timed():
            return self.transfer(blocks, site=site, layer=layer)  # on blocks' device

    def _to_heads(self, x: Any, heads: int, head_dim: int, layer: int, site: str) -> Any:
        """(B, S_i, c, h, d) local tokens of every head -> (B, S, c, h_me, d) every token
        of this rank's share of the heads (``partition(h, Q, me)``)."""
        xp, split = get_array_module(x), self.split
        shares, blocks = self._padded(x, heads, head_dim)
        for j, (count, first) in enumerate(shares):
            blocks[j, :, :split.count, :, :count] = x[:, :, :, first:first + count]
        got = self._alltoall(blocks, layer, site)
        mine = shares[split.index][0]
        return xp.concatenate([got[s, :, :c, :, :mine] for s, (_, c) in enumerate(split.spans)],
                              axis=1)

    def _to_tokens(self, y: Any, heads: int, head_dim: int, layer: int, site: str) -> Any:
        """The inverse of ``_to_heads``: (B, S, c, h_me, d) -> (B, S_i, c, h, d)."""
        xp, split = get_array_module(y), self.split
        shares, blocks = self._padded(y, heads, head_dim)
        mine = shares[split.index][0]
        for s, (start, c) in enumerate(split.spans):
            blocks[s, :, :c, :, :mine] = y[:, start:start + c]
        got = self._alltoall(blocks, layer, site)
        out = xp.empty((y.shape[0], split.count, y.shape[2], heads, head_dim), dtype=y.dtype)
        for j, (count, first) in enumerate(shares):
            out[:, :, :, first:first + count] = got[j, :, :split.count, :, :count]
        return out

    # -- inference ----------------------------------------------------------------------

    def forward(self, qkv: Any, out: Any, batch: int, heads: int, head_dim: int, mask: Any,
                options: Any, layer: int) -> str:
        """Attention of the local tokens' queries over every key into ``out`` (B*S_i, h*d);
        ``mask``: an ``attention.KeyMask`` over whole sequences. Returns the local
        algorithm used (Ulysses) or "ring"."""
        from .attention import heads_attention

        seq, local = self.split.seq, self.split.count
        if self.algorithm == "ulysses":
            full = self._to_heads(qkv.reshape(batch, local, 3, heads, head_dim), heads,
                                  head_dim, layer, "alltoall.qkv")
            mine = full.shape[3]
            o = get_array_module(qkv).empty((batch * seq, mine * head_dim), dtype=qkv.dtype)
            impl = heads_attention(full.reshape(batch * seq, 3 * mine * head_dim), o, batch,
                                   seq, mine, head_dim, mask, options)
            back = self._to_tokens(o.reshape(batch, seq, 1, mine, head_dim), heads, head_dim,
                                   layer, "alltoall.out")
            out[...] = back.reshape(out.shape)
            return impl
        o, _ = self._ring_forward(qkv, batch, heads, head_dim, mask, layer,
                                  getattr(options, "window", None))
        out.reshape(batch, local, heads, head_dim)[...] = o.transpose(0, 2, 1, 3)
        return "ring"

    # -- the ring -----------------------------------------------------------------------

    def _poller(self, *shifts: Any) -> Callable[[], None] | None:
        """What the block loops call so the shifts in flight progress (``Ring.poll``)."""
        live = [s for s in shifts if s is not None]
        poll = getattr(self.transfer, "poll", None)
        if not live or poll is None:
            return None

        def progress() -> None:
            for shift in live:
                poll(shift)

        return progress

    def _ring_forward(self, qkv: Any, batch: int, heads: int, head_dim: int, mask: Any,
                      layer: int, window: int | None = None) -> tuple[Any, RingCache]:
        """``window``: a sliding window's half width (keys within +-window of a query), or
        None; a step whose slice has no key within reach of this rank's queries is not
        computed (``skipped``)."""
        xp = get_array_module(qkv)
        split, parts = self.split, self.split.parts
        local = split.count
        fused = qkv.reshape(batch, local, 3, heads, head_dim)
        q = fused[:, :, 0].transpose(0, 2, 1, 3)  # (B, h, S_i, d)
        kv = xp.zeros((batch, split.widest, 2, heads, head_dim), dtype=qkv.dtype)
        kv[:, :local] = fused[:, :, 1:]
        scale = 1.0 / math.sqrt(head_dim)
        qs = q * q.dtype.type(scale)
        o = xp.zeros(q.shape, dtype=q.dtype)
        lse = xp.full((*q.shape[:3], 1), -xp.inf, dtype=q.dtype)
        block = min(self.block, split.widest)
        current = kv
        for step in range(parts):
            shift = None
            if step < parts - 1:  # the next slice travels while this one is attended to
                with self._timed():
                    shift = self.transfer.start(current, site="ring.kv", layer=layer)
            start, count = split.spans[(split.index - step) % parts]
            k, v = (current[:, :count, i].transpose(0, 2, 1, 3) for i in range(2))
            if window is not None and not overlaps(split.start, local, start, count, window):
                self.skipped += 1
            else:
                bias = key_bias(mask, start, count, batch, xp, q.dtype)
                o_step, lse_step = partial_attention(
                    qs, k, v, bias, block, self._poller(shift),
                    None if window is None else (window, split.start, start))
                o, lse = merge(o, lse, o_step, lse_step)
            if shift is not None:
                with self._timed():
                    current = self.transfer.finish(shift)
        return o, RingCache(q, kv, o, lse, mask, scale, block)

    def _ring_backward(self, do: Any, c: RingCache, layer: int) -> tuple[Any, Any, Any]:
        """(dq (B, h, S_i, d), dk, dv (B, S_i, h, d) of this rank's keys)."""
        xp = get_array_module(do)
        split, parts = self.split, self.split.parts
        batch = do.shape[0]
        big_d = (do * c.o).sum(axis=-1, keepdims=True)
        dq = xp.zeros_like(c.q)
        current = c.kv
        carried = None  # the dK/dV accumulator in flight to the next rank
        for step in range(parts):
            shift = None
            if step < parts - 1:
                shift = self.transfer.start(current, site="ring.kv.bwd", layer=layer)
            start, count = split.spans[(split.index - step) % parts]
            k, v = (current[:, :count, i].transpose(0, 2, 1, 3) for i in range(2))
            bias = key_bias(c.mask, start, count, batch, xp, do.dtype)
            dq_step, dk, dv = partial_attention_backward(
                c.q, k, v, bias, do, c.lse, big_d, c.scale, c.block,
                self._poller(shift, None if parts == 1 else carried))
            dq += dq_step
            acc = (xp.zeros_like(c.kv) if carried is None
                   else self.transfer.finish(carried))
            acc[:, :count, 0] += dk.transpose(0, 2, 1, 3)
            acc[:, :count, 1] += dv.transpose(0, 2, 1, 3)
            # the accumulator of this slice goes on to the next rank; after the last step
            # that rank is the slice's owner
            carried = (self.transfer.start(acc, site="ring.dkv", layer=layer, channel=1)
                       if parts > 1 else acc)
            if shift is not None:
                current = self.transfer.finish(shift)
        mine = carried if parts == 1 else self.transfer.finish(carried)
        return dq, mine[:, :split.count, 0], mine[:, :split.count, 1]

    # -- training -----------------------------------------------------------------------

    def forward_cached(self, qkv: Any, bias: Any, batch: int, heads: int, head_dim: int,
                       impl: str, block: int, layer: int) -> tuple[Any, Any]:
        """(o (B*S_i, h*d), cache) from the local tokens' qkv; ``bias``: the (B, 1, 1, S)
        key mask over whole sequences (``attention.mask_bias``)."""
        from .attention import KeyMask, attention_cached

        seq, local = self.split.seq, self.split.count
        if self.algorithm == "ulysses":
            full = self._to_heads(qkv.reshape(batch, local, 3, heads, head_dim), heads,
                                  head_dim, layer, "alltoall.qkv")
            mine = full.shape[3]
            o, cache = attention_cached(full.reshape(batch * seq, 3 * mine * head_dim), bias,
                                        batch, seq, mine, head_dim, impl, block)
            back = self._to_tokens(o.reshape(batch, seq, 1, mine, head_dim), heads, head_dim,
                                   layer, "alltoall.out")
            return back.reshape(batch * local, heads * head_dim), UlyssesCache(cache, batch)
        xp = get_array_module(qkv)
        key_mask = bias[:, 0, 0, :] == 0 if bias is not None else xp.ones((batch, seq), bool)
        o, cache = self._ring_forward(qkv, batch, heads, head_dim, KeyMask.from_mask(key_mask),
                                      layer)
        return o.transpose(0, 2, 1, 3).reshape(batch * local, heads * head_dim), cache

    def backward(self, dout: Any, cache: Any, heads: int, head_dim: int, layer: int) -> Any:
        """d qkv (B*S_i, 3*h*d) of the local tokens from d o (B*S_i, h*d)."""
        from .attention import attention_backward

        xp = get_array_module(dout)
        seq, local = self.split.seq, self.split.count
        if isinstance(cache, UlyssesCache):
            batch = cache.batch
            full = self._to_heads(dout.reshape(batch, local, 1, heads, head_dim), heads,
                                  head_dim, layer, "alltoall.dout")
            mine = full.shape[3]
            dqkv = attention_backward(full.reshape(batch * seq, mine * head_dim),
                                      cache.attention)
            back = self._to_tokens(dqkv.reshape(batch, seq, 3, mine, head_dim), heads,
                                   head_dim, layer, "alltoall.dqkv")
            return back.reshape(batch * local, 3 * heads * head_dim)
        batch = cache.q.shape[0]
        do = dout.reshape(batch, local, heads, head_dim).transpose(0, 2, 1, 3)
        dq, dk, dv = self._ring_backward(do, cache, layer)
        dqkv = xp.empty((batch, local, 3, heads, head_dim), dtype=dout.dtype)
        dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
        dqkv[:, :, 1] = dk
        dqkv[:, :, 2] = dv
        return dqkv.reshape(batch * local, 3 * heads * head_dim)
