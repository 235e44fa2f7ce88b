"""Vocabulary-parallel word embedding and cross-entropy over a head group (MPI-free).

Megatron-LM's ``VocabParallelEmbedding`` and ``vocab_parallel_cross_entropy``
(``megatron/core/tensor_parallel/layers.py`` and ``cross_entropy.py``), with the
reduction passed in (``reduce(partial (rows, cols), site=, layer=)``: a checked
Allreduce(SUM) under MPI, ``model.LocalReduce`` or a thread group in tests):

- rank r of k holds word rows ``[start, start + count)`` of the (vocab, H) table
  (``shard.partition``: uneven splits allowed) and the same entries of the decoder bias;
- embedding: each rank looks up the ids it holds, zeros elsewhere, and one sum over the
  group (site ``embed``) gives every rank the whole (B*S, H) word rows, bit for bit the
  one-process lookup (a sum of one value and zeros is exact);
- loss: the tied decoder gives each rank its (N, count) columns of the logits; the
  statistics of every masked token, (N, 2k + 1) = [local maxima of each rank | local
  sums of exp(logit - local max) of each rank | the target's logit], travel in one sum
  (site ``vocab``; each rank fills only its own columns, so the sum is an exact gather):
  ``lse = M + log sum_r s_r exp(m_r - M)`` with ``M = max_r m_r``, the same on every
  rank. Megatron sends a max and two sums (three Allreduces); here it is one checked sum;
- backward: dlogits = softmax - onehot of the rank's columns (no communication), the
  decoder's dL/d input (N, H) is a partial sum over the columns and is reduced (site
  ``vocab.bwd``); the word rows' gradients (embedding and decoder) stay local.

The vocabulary part of every step (the tied decoder over the vocabulary, its gradient
and the optimizer on the word table) then shrinks as 1/k instead of being repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backend import get_array_module
from .ops import LayerNormCache, layer_norm_backward, layer_norm_cached, scatter_add
from .shard import partition

EMBED_SITE = "embed"  # the word rows of the embedding, summed over the head group
LOSS_SITE = "vocab"  # the softmax statistics of the masked tokens
BACKWARD_SITE = "vocab.bwd"  # the decoder's dL/d input, a partial sum over the columns
SITES = (EMBED_SITE, LOSS_SITE, BACKWARD_SITE)


@dataclass(frozen=True)
class VocabSplit:
    """Which word rows rank ``rank`` of ``ranks`` holds: ``[start, start + count)``."""

    vocab: int
    ranks: int
    rank: int

    @property
    def count(self) -> int:
        return partition(self.vocab, self.ranks, self.rank)[0]

    @property
    def start(self) -> int:
        return partition(self.vocab, self.ranks, self.rank)[1]

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.count)

    @property
    def split(self) -> bool:
        """Are the rows split at all (more than one rank)?"""
        return self.ranks > 1

    def local(self, ids: Any) -> tuple[Any, Any]:
        """(row index into this rank's table, 0 where the id is not held; the mask of the
        ids held here), for integer ``ids`` of any shape."""
        xp = get_array_module(ids)
        rows = ids - self.start
        mine = (rows >= 0) & (rows < self.count)
        return xp.where(mine, rows, 0), mine


@dataclass
class EmbeddingCache:
    rows: Any  # (B, S) local row of each id (0 where not held)
    mine: Any  # (B, S) bool: the id is held here
    ln: LayerNormCache
    emb: Any  # the tables (word: this rank's rows)
    offset: int = 0


def embed_cached(ids: Any, emb: Any, eps: float, split: VocabSplit, reduce: Any,
                 offset: int = 0) -> tuple[Any, EmbeddingCache]:
    """``ops.embed_cached`` with the word rows split: (B, S) ids -> (B, S, H) embeddings
    (after LayerNorm); one sum of (B*S, H) word rows over the group (site ``embed``)."""
    batch, seq = ids.shape
    hidden = emb.word.shape[1]
    rows, mine = split.local(ids)
    part = emb.word[rows.reshape(-1)]  # (B*S, H)
    part[~mine.reshape(-1)] = 0
    word = reduce(part, site=EMBED_SITE, layer=0).reshape(batch, seq, hidden)
    x = word + emb.position[offset:offset + seq] + emb.token_type[0]
    out, ln = layer_norm_cached(x, emb.ln_g, emb.ln_b, eps)
    return out, EmbeddingCache(rows, mine, ln, emb, offset)


def embed_backward(dout: Any, cache: EmbeddingCache) -> Any:
    """Gradients of the tables, as a ``model.Embeddings``: the word rows this rank holds
    (the others' rows get theirs on their ranks; dout is the same on every rank)."""
    xp = get_array_module(dout)
    emb = cache.emb
    dx, dg, db = layer_norm_backward(dout, cache.ln)
    hidden = dx.shape[-1]
    mine = cache.mine.reshape(-1)
    dword = xp.zeros_like(emb.word)
    scatter_add(dword, cache.rows.reshape(-1)[mine], dx.reshape(-1, hidden)[mine])
    seq = cache.rows.shape[1]
    dpos = xp.zeros_like(emb.position)
    dpos[cache.offset: cache.offset + seq] = dx.sum(axis=0)
    dtype_ = xp.zeros_like(emb.token_type)
    dtype_[0] = dx.sum(axis=(0, 1))
    return type(emb)(dword, dpos, dtype_, dg, db)


@dataclass
class LossCache:
    logits: Any  # (N, count) this rank's columns; overwritten by the backward
    lse: Any  # (N,) log of the whole vocabulary's sum of exp(logits)
    rows: Any  # (N,) local column of each target (0 where not held)
    mine: Any  # (N,) bool: the target is held here
    scale: float


def cross_entropy_cached(logits: Any, targets: Any, scale: float, split: VocabSplit,
                         reduce: Any) -> tuple[float, LossCache]:
    """``scale * sum_i (log sum_v exp(logits_iv) - logits_i,target_i)`` over the whole
    vocabulary from this rank's (N, count) columns: a float (the same on every rank of
    the group) and the cache. One sum of (N, 2k + 1) statistics (site ``vocab``)."""
    xp = get_array_module(logits)
    n, k, r = logits.shape[0], split.ranks, split.rank
    rows, mine = split.local(targets)
    if n == 0:  # nothing masked in this batch (the same on every rank of the group)
        return 0.0, LossCache(logits, xp.zeros(0, logits.dtype), rows, mine, scale)
    stats = xp.zeros((n, 2 * k + 1), dtype=logits.dtype)
    if logits.shape[1]:
        m = logits.max(axis=1)
        stats[:, r] = m
        stats[:, k + r] = xp.exp(logits - m[:, None]).sum(axis=1)
        picked = logits[xp.arange(n), rows]
        stats[:, 2 * k] = xp.where(mine, picked, 0)
    else:  # no rows here: exp(-inf) adds nothing
        stats[:, r] = -xp.inf
    total = reduce(stats, site=LOSS_SITE, layer=0)
    maxima, sums, target = total[:, :k], total[:, k:2 * k], total[:, 2 * k]
    top = maxima.max(axis=1)
    lse = top + xp.log((sums * xp.exp(maxima - top[:, None])).sum(axis=1))
    loss = float((lse - target).sum()) * scale
    return loss, LossCache(logits, lse, rows, mine, scale)


def cross_entropy_backward(c: LossCache) -> Any:
    """dL/d this rank's logits (N, count): scale * (softmax - onehot of the targets held
    here); no communication. Reuses the cached logits' memory."""
    xp = get_array_module(c.logits)
    d = c.logits
    d -= c.lse[:, None]
    xp.exp(d, out=d)
    held = xp.flatnonzero(c.mine)
    d[held, c.rows[held]] -= 1.0
    d *= c.scale
    return d
