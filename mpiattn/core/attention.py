"""Scaled dot-product attention on the heads of one rank: no communication happens here.

Two algorithms in a registry (``ALGORITHMS``, chosen by ``attention.impl`` for run, bench
and train alike), equal within float tolerance (tested); each has the per-head kernel the
inference path runs, a forward that keeps a named cache, and its backward:

- **plain**: every key of a query at once. On NumPy in float32, where ``kernels`` is
  built, one compiled call per sequence makes 8 queries' scores, softmax and product with
  V in the L1 cache, adding the QKV bias as it reads (``_fused_heads``); otherwise a group
  of one sequence's heads at a time, so the (S, S) scores stay in cache and the softmax
  passes are cheap (``_grouped_heads``); head by head, or all heads batched for short
  sequences, when per-query statistics or a window are asked for; on CuPy all heads go
  in one batched product.
- **blocked**: FlashAttention's online softmax. Queries in blocks of ``block`` rows meet
  keys in blocks of ``block`` columns; a running row maximum ``m`` and sum ``l`` rescale
  the partial output, so memory is O(block^2) per head instead of O(S^2).

The blocked algorithm's loops are ``partial_attention`` and ``partial_attention_backward``:
attention over the keys given with its row log-sum-exp, so that results over disjoint key
sets ``merge`` into attention over all of them (the ring of ``seqattn`` runs them on each
travelling K/V slice).

Padding is masked on the key axis. A prefix mask (real tokens first, as tokenizers pad)
is applied by cutting the keys at each sequence's length: exact, and no work on padding.
Any other mask adds a 0/-inf bias. Every sequence has at least one real token.

With a ``headstats.Probe`` (``output.head_stats``, ``output.attention_maps``) the kernels
also give each query's attention entropy and distance, from the weights they already
have (plain: the (S, S) weights; blocked: sums carried from key block to key block like
the softmax's own), and the chosen sequences' probabilities come from a separate small
pass (``probabilities``). Without one, nothing extra runs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import headstats, kernels, rotary
from .backend import get_array_module, grown, to_host
from .ops import mask_backward, mask_cached, softmax, softmax_backward, softmax_cached
from .shard import partition

PLAIN_MAX_SEQ = 2048  # auto: plain up to this length (16 MiB of float32 scores per head)
DEFAULT_BLOCK = 512  # blocked attention's key/query block when none is set (min with the keys)


@dataclass
class KeyMask:
    """Which keys each sequence may attend to."""

    lengths: list[int] | None  # prefix masks: the first lengths[b] keys are real
    bias: Any = None  # otherwise (B, S) additive bias, 0 on real tokens, -inf on padding
    _made: dict = field(default_factory=dict, repr=False, compare=False)  # made once

    def device_lengths(self, xp: Any) -> Any:
        """(B, 1) ``lengths`` as an ``xp`` array, made once per array module: on a GPU the
        lengths go to the device once per forward, not once per layer."""
        key = ("lengths", xp.__name__)
        if key not in self._made:
            self._made[key] = xp.asarray(self.lengths)[:, None]
        return self._made[key]

    def prefix_bias(self, xp: Any, seq: int, dtype: Any) -> Any:
        """(B, 1, 1, S) additive bias of a prefix mask (0 on the first lengths[b] keys,
        -inf after), made once per array module, length and dtype."""
        key = ("bias", xp.__name__, seq, str(dtype))
        if key not in self._made:
            self._made[key] = xp.where(xp.arange(seq)[None, :] < self.device_lengths(xp),
                                       0, -xp.inf).astype(dtype)[:, None, None, :]
        return self._made[key]

    @classmethod
    def from_mask(cls, key_mask: Any) -> KeyMask:
        """The mask of a (B, S) bool ``key_mask``: a prefix mask (lengths) when every row
        is one, else an additive bias. On a device the lengths and the prefix test come
        to the host in one copy, and the device lengths are kept (``device_lengths``)."""
        xp = get_array_module(key_mask)
        lengths = key_mask.sum(axis=1)
        prefix = xp.arange(key_mask.shape[1])[None, :] < lengths[:, None]
        is_prefix = (prefix == key_mask).all().astype(lengths.dtype).reshape(1)
        host = to_host(xp.concatenate([lengths, is_prefix]))  # (B + 1,): one read
        if host[-1]:
            made = cls([int(n) for n in host[:-1].tolist()])
            # already where the layers need them: on a GPU no copy back to the device
            made._made[("lengths", xp.__name__)] = lengths[:, None]
            return made
        bias = xp.zeros(key_mask.shape, dtype=xp.float32)
        bias[~key_mask] = -xp.inf
        return cls(None, bias)

    def rows(self, start: int, count: int) -> KeyMask:
        """The mask of sequences start..start+count (a chunk of the batch)."""
        if self.lengths is not None:
            return KeyMask(self.lengths[start : start + count])
        return KeyMask(None, self.bias[start : start + count])

    def keys(self, b: int, seq: int) -> int:
        return seq if self.lengths is None else self.lengths[b]

    def real(self, batch: int, seq: int, xp: Any) -> Any:
        """(batch, seq) bool: True on real tokens (the queries statistics average over)."""
        if self.lengths is None:
            return self.bias == 0
        return xp.arange(seq)[None, :] < self.device_lengths(xp)

    def key_bias(self, b: int, seq: int, xp: Any, dtype: Any) -> Any:
        """(seq,) 0/-inf additive bias of sequence ``b`` over all ``seq`` keys."""
        if self.lengths is None:
            return self.bias[b].astype(dtype)
        return xp.where(xp.arange(seq) < self.lengths[b], 0, -xp.inf).astype(dtype)

    def row_bias(self, b: int, stop: int, start: int = 0) -> Any:
        return None if self.bias is None else self.bias[b, start:stop]


@dataclass
class Options:
    """How attention runs: the algorithm, its block, and worker threads (NumPy only)."""

    impl: str = "auto"  # "auto" | "plain" | "blocked"
    block: int = 0  # 0 = chosen from the sequence length
    workers: int = 1  # threads over heads; BLAS runs single-threaded inside them
    sequence: Any = None  # a seqattn.SequenceAttention when the tokens are split over ranks
    position_bias: Any = None  # (local heads, S, S) added to the scores (MPNet), or None
    window: int | None = None  # sliding window (ModernBERT's local layers): query i sees
    # keys j with |i - j| <= window; blocks (and ring steps) wholly outside are skipped
    _scratch: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def configured(cls, impl: str, block: int, threads: int) -> Options:
        """The ``[attention]`` table's choice; worker threads over heads take the rank's
        BLAS threads (NumPy only)."""
        return cls(impl, block, max(1, threads))

    def scratch(self, name: str, shape: tuple, dtype: Any, xp: Any) -> Any:
        """A work array kept from call to call: large fresh arrays cost page faults
        (the allocator maps and unmaps them each time), which showed in every layer.
        One buffer per name, grown to the largest shape asked for; a smaller shape is a
        contiguous view of its start (a stream of batches of every length would otherwise
        keep one buffer per shape)."""
        return grown(self._scratch, (name, str(dtype), xp.__name__), shape,
                     lambda n: xp.empty(n, dtype=dtype))

    def resolve(self, seq: int) -> tuple[str, int]:
        impl = self.impl
        if impl == "auto":
            impl = "plain" if seq <= PLAIN_MAX_SEQ else "blocked"
        block = self.block or min(DEFAULT_BLOCK, seq)
        return impl, block


def mask_bias(key_mask: Any, dtype: Any) -> Any:
    """(B, 1, 1, S) additive bias: 0 on real tokens, -inf on padding."""
    xp = get_array_module(key_mask)
    bias = xp.zeros(key_mask.shape, dtype=dtype)
    bias[~key_mask] = -xp.inf
    return bias[:, None, None, :]


def attention(q: Any, k: Any, v: Any, bias: Any = None, stats: tuple | None = None) -> Any:
    """softmax(q k^T / sqrt(d) + bias) v for (B, h, S, d) arrays, all heads batched.

    ``stats``: (entropy, distance) arrays (B, h, S) to fill with each query's attention
    entropy (nats) and distance (tokens) (``headstats``).
    """
    xp = get_array_module(q)
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    scores = xp.matmul(q * scale, k.swapaxes(-1, -2))  # (B, h, S, S)
    if bias is not None:
        scores += bias
    probs = softmax(scores, out=scores)
    if stats is not None:
        stats[0][...], stats[1][...] = headstats.from_probabilities(probs)
    return xp.matmul(probs, v)  # (B, h, S, d)


def probabilities(q: Any, k: Any, bias: Any = None) -> Any:
    """softmax(q k^T / sqrt(d) + bias): (h, S, S) attention probabilities (query, key)
    from unscaled (h, S, d) q and k and a (S,) 0/-inf key bias; masked keys get 0.

    The attention maps of ``output.attention_maps``: a separate pass over the chosen
    sequences only, the same for every algorithm.
    """
    xp = get_array_module(q)
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    scores = xp.matmul(q * scale, k.swapaxes(-1, -2))
    if bias is not None:
        scores += bias
    return softmax(scores, out=scores)


def _plain_head(q: Any, k: Any, v: Any, bias: Any, out: Any, stats: tuple | None = None,
                window: int | None = None) -> None:
    """One head: (S, d) views in, softmax(q k^T + bias) v written to ``out`` (S, d).

    ``q`` is already scaled. The row sums divide the (S, d) output, not the (S, S) scores.
    ``stats``: (entropy, distance) (S,) views to fill per query (``headstats.finish``).
    """
    xp = get_array_module(q)
    s = q @ k.T
    if bias is not None:
        s += bias
    if window is not None:
        s += rotary.band(0, q.shape[0], 0, k.shape[0], window, xp, s.dtype)
    with _quiet(window, xp):  # a padding query out of reach of every key: 0/0, zeroed
        s -= s.max(axis=1, keepdims=True)
        xp.exp(s, out=s)
        xp.matmul(s, v, out=out)
        total = s.sum(axis=1, keepdims=True)
        out /= total
        if stats is not None:
            headstats.finish(*headstats.weight_sums(s), total, *stats)


def _blocked_head(q: Any, k: Any, v: Any, bias: Any, out: Any, block: int,
                  stats: tuple | None = None, window: int | None = None) -> None:
    """One head with the online softmax over key blocks (FlashAttention, forward).

    Pass 1, per query block: for each key block, scores s = q k^T (+ bias); new row max
    m' = max(m, max s); rescale l and the output accumulator by exp(m - m'); add exp(s -
    m') to l and exp(s - m') v to the accumulator. Pass 2: divide by l.
    ``stats``: (entropy, distance) (S,) views; the sums a = sum e ln e and c = sum e |i-j|
    ride along, rescaled with l (``headstats.rescale_log_sum``), and finish with it.
    ``window``: keys beyond +-window of a query block are never visited (a query with no
    key in reach gets 0/0: the caller zeroes such rows).
    """
    xp = get_array_module(q)
    seq, keys = q.shape[0], k.shape[0]
    for q0 in range(0, seq, block):
        qb = q[q0 : q0 + block]
        first, stop = 0, keys
        if window is not None:  # only the keys within reach of this query block
            first, stop = max(0, q0 - window), min(keys, q0 + qb.shape[0] + window)
        acc = out[q0 : q0 + block]
        acc[...] = 0
        m = xp.full((qb.shape[0], 1), -xp.inf, dtype=q.dtype)
        total = xp.zeros((qb.shape[0], 1), dtype=q.dtype)
        a = c = xp.zeros_like(total)
        for k0 in range(first, stop, block):
            k1 = min(k0 + block, stop)
            s = qb @ k[k0:k1].T
            if bias is not None:
                s += bias[k0:k1]
            if window is not None:
                s += rotary.band(q0, qb.shape[0], k0, k1 - k0, window, xp, s.dtype)
            m_new = xp.maximum(m, s.max(axis=1, keepdims=True))
            # rows with every key so far masked keep m = -inf: nothing to rescale yet
            safe = xp.where(xp.isfinite(m_new), m_new, 0)
            alpha = xp.exp(m - safe)
            s -= safe
            xp.exp(s, out=s)
            if stats is not None:
                shift = xp.where(xp.isfinite(m), m - safe, 0)
                a_block, c_block = headstats.weight_sums(s, q0, k0)
                a = headstats.rescale_log_sum(a, total, alpha, shift) + a_block
                c = alpha * c + c_block
            total *= alpha
            total += s.sum(axis=1, keepdims=True)
            acc *= alpha
            acc += s @ v[k0:k1]
            m = m_new
        with _quiet(window, xp):
            acc /= total
            if stats is not None:
                headstats.finish(a, c, total, *(x[q0 : q0 + block] for x in stats))


_pool: ThreadPoolExecutor | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers != workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mpiattn-head")
    return _pool


_BATCHED_SCORES = 1 << 22  # CPU: batch all heads while the (B, h, S, S) scores stay this small


def heads_attention(qkv: Any, out: Any, batch: int, seq: int, heads: int, head_dim: int,
                    mask: KeyMask, options: Options, probe: Any = None,
                    qkv_bias: Any = None) -> str:
    """Attention of all local heads from the fused QKV product into ``out``.

    ``qkv`` is (B*S, 3*h*d) laid out [Q heads | K heads | V heads]; ``out`` is (B*S, h*d),
    head h in columns h*d:(h+1)*d, ready for the output projection without a transpose.
    ``qkv_bias`` (3*h*d,) or None: the QKV bias when it is not yet in ``qkv``; the fused
    kernel adds it as it reads (one pass over the (B*S, 3*h*d) product less), every other
    path adds it to ``qkv`` first. ``probe`` (a ``headstats.Probe``, or None): receives each
    query's entropy and distance (B, h, S) and the probabilities (h, S, S) of the sequences
    it asks for. Returns the algorithm used (recorded in the output file).
    """
    xp = get_array_module(qkv)
    impl, block = options.resolve(seq)
    fused = (impl == "plain" and options.window is None and (probe is None or not probe.stats)
             and kernels.fits(qkv, options.position_bias, written=(out,)))
    if qkv_bias is not None and not (fused and probe is None and kernels.fits(qkv_bias)):
        qkv += qkv_bias  # every path but the fused kernel's, and a probe's, reads it in qkv
        qkv_bias = None
    width = heads * head_dim
    scale = qkv.dtype.type(1.0 / math.sqrt(head_dim))
    stats = None
    if probe is not None and probe.stats:
        stats = (xp.empty((batch, heads, seq), dtype=qkv.dtype),
                 xp.empty((batch, heads, seq), dtype=qkv.dtype))
    # one batched product: on the GPU always; on the CPU for short sequences, where the
    # per-(sequence, head) loop below costs more in calls than in arithmetic
    batched = xp.__name__ == "cupy" or batch * heads * seq * seq <= _BATCHED_SCORES
    position = options.position_bias  # (h, S, S) or None
    if position is not None and impl != "plain":
        raise ValueError("a position bias (MPNet) is built for attention.impl = \"plain\"")
    window = options.window
    if window is not None and position is not None:
        raise ValueError("a sliding window and a position bias are not built together")
    if impl == "plain" and xp.__name__ == "numpy" and stats is None and window is None:
        if fused:
            _fused_heads(qkv, out, batch, seq, heads, head_dim, mask, position,
                         options.workers, qkv_bias)
        else:
            _grouped_heads(qkv, out, batch, seq, heads, head_dim, mask, position,
                           options.workers)
        _report(probe, None, qkv, batch, seq, heads, head_dim, mask, position)
        return impl
    if impl == "plain" and batched:
        q, k, v = (qkv.reshape(batch, seq, 3, heads, head_dim)[:, :, i].transpose(0, 2, 1, 3)
                   for i in range(3))
        bias = mask.bias[:, None, None, :] if mask.bias is not None else None
        if mask.lengths is not None and min(mask.lengths) < seq:
            bias = mask.prefix_bias(xp, seq, qkv.dtype)
        if position is not None:
            bias = position[None] if bias is None else bias + position[None]
        if window is not None:
            band = rotary.band(0, seq, 0, seq, window, xp, qkv.dtype)[None, None]
            bias = band if bias is None else bias + band
        with _quiet(window, xp):
            o = attention(q, k, v, bias, stats)
        out.reshape(batch, seq, heads, head_dim)[...] = o.transpose(0, 2, 1, 3)
        _finish_window(out, window)
        _report(probe, stats, qkv, batch, seq, heads, head_dim, mask, _window_bias(
            position, window, seq, xp, qkv.dtype))
        return impl

    rows = qkv.reshape(batch, seq, 3 * width)
    dest = out.reshape(batch, seq, width)

    def one(b: int, h: int) -> None:
        cols = slice(h * head_dim, (h + 1) * head_dim)
        n = mask.keys(b, seq)
        q = rows[b, :, cols] * scale  # (S, d), contiguous
        k = rows[b, :n, width + cols.start : width + cols.stop]
        v = rows[b, :n, 2 * width + cols.start : 2 * width + cols.stop]
        bias = mask.row_bias(b, n)
        if position is not None:
            bias = position[h, :, :n] if bias is None else position[h, :, :n] + bias
        ALGORITHMS[impl].head(q, k, v, bias, dest[b, :, cols], block,
                              None if stats is None else (stats[0][b, h], stats[1][b, h]),
                              window)

    _each(one, [(b, h) for b in range(batch) for h in range(heads)],
          options.workers if xp.__name__ == "numpy" else 1)
    _finish_window(out, window)
    _report(probe, stats, qkv, batch, seq, heads, head_dim, mask, _window_bias(
        position, window, seq, xp, qkv.dtype))
    return impl


def _grouped_heads(qkv: np.ndarray, out: np.ndarray, batch: int, seq: int, heads: int,
                   head_dim: int, mask: KeyMask, position: Any, workers: int) -> None:
    """The plain algorithm on NumPy where the fused kernel (``_fused_heads``) does not run:
    each sequence's heads in groups whose scores stay in the L2 cache (``_GROUP_BYTES``),
    keys cut at the sequence's length.

    The scores of a group are laid out (heads, keys, queries), k q^T rather than q k^T:
    the softmax's reductions over keys then run down the rows, element-wise across whole
    rows (3x faster than along each row at S = 256), the row sums are one product with a
    vector of ones, and p^T v reads the same array transposed at no cost. Measured on one
    core at 32 x 256 tokens, 12 heads of 32: 63 ms against 83 ms head by head, and 3.7
    against 9.1 ms for the all-heads batched product at 32 x 64. Each thread keeps its work
    arrays for the call (fresh ones cost page faults: ~5 ms more at 32 x 256).
    ``position``: (h, S, S) [query, key] bias (MPNet), or None; ``mask.bias`` (non-prefix
    masks) is added per key.
    """
    width = heads * head_dim
    scale = qkv.dtype.type(1.0 / math.sqrt(head_dim))
    group = max(1, min(heads, _GROUP_BYTES // (seq * seq * qkv.itemsize)))
    rows = qkv.reshape(batch, seq, 3 * width)
    dest = out.reshape(batch, seq, heads, head_dim)
    ones = np.ones(seq, dtype=qkv.dtype)
    sizes = {"q": seq * group * head_dim, "s": group * seq * seq, "o": group * seq * head_dim,
             "total": group * seq}
    work: dict[int, dict[str, np.ndarray]] = {}  # per thread: fresh arrays cost page faults

    def one(b: int, first: int) -> None:
        stop = min(first + group, heads)
        g, n = stop - first, mask.keys(b, seq)
        lo, hi = first * head_dim, stop * head_dim
        ident = threading.get_ident()
        if ident not in work:
            work[ident] = {name: np.empty(size, qkv.dtype) for name, size in sizes.items()}
        flat = work[ident]
        q = flat["q"][: seq * g * head_dim].reshape(seq, g * head_dim)
        np.multiply(rows[b, :, lo:hi], scale, out=q)  # (S, g*d), contiguous
        q = q.reshape(seq, g, head_dim).transpose(1, 2, 0)  # (g, d, S)
        k, v = (rows[b, :n, at + lo : at + hi].reshape(n, g, head_dim).transpose(1, 0, 2)
                for at in (width, 2 * width))  # (g, n, d)
        s = np.matmul(k, q, out=flat["s"][: g * n * seq].reshape(g, n, seq))
        bias = mask.row_bias(b, n)  # s: (g, n, S), keys down, queries across
        if bias is not None:
            s += bias[:, None]
        if position is not None:
            s += position[first:stop, :, :n].transpose(0, 2, 1)
        o = flat["o"][: g * seq * head_dim].reshape(g, seq, head_dim)
        total = flat["total"][: g * seq].reshape(g, seq)
        s -= s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        np.matmul(ones[:n], s, out=total)
        np.matmul(s.transpose(0, 2, 1), v, out=o)
        o /= total[:, :, None]
        dest[b, :, first:stop] = o.transpose(1, 0, 2)

    _each(one, [(b, h) for b in range(batch) for h in range(0, heads, group)], workers)


def _fused_heads(qkv: np.ndarray, out: np.ndarray, batch: int, seq: int, heads: int,
                 head_dim: int, mask: KeyMask, position: Any, workers: int,
                 qkv_bias: np.ndarray | None) -> None:
    """The plain algorithm by the compiled kernel (``kernels.attention``): per sequence,
    blocks of 8 queries whose scores, softmax and product with V stay in the L1 cache,
    keys cut at the sequence's length; ``qkv_bias`` (or None) is added as the kernel reads.
    Measured on one AMD EPYC core at 32 x 256 tokens, 12 heads of 32 (MiniLM): the QKV
    bias and attention in 55-59 ms against 65-66 ms for the groups of heads with a
    compiled softmax (``docs/text-corpora.md``). With several workers the heads of a
    sequence are split so that every worker has work.
    """
    rows = qkv.reshape(batch, seq, 3 * heads * head_dim)
    dest = out.reshape(batch, seq, heads * head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    parts = min(heads, -(-2 * workers // max(batch, 1))) if workers > 1 else 1
    work: dict[int, np.ndarray] = {}  # per thread: fresh arrays cost page faults
    size = kernels.attention_work(head_dim, seq)

    def one(b: int, part: int) -> None:
        count, first = partition(heads, parts, part)
        n = mask.keys(b, seq)
        bias = mask.row_bias(b, n)
        ident = threading.get_ident()
        if ident not in work:
            work[ident] = np.empty(size, np.float32)
        kernels.attention(rows[b], heads, first, first + count, head_dim, n, scale, qkv_bias,
                          None if bias is None else np.ascontiguousarray(bias, np.float32),
                          position, dest[b], work[ident])

    _each(one, [(b, part) for b in range(batch) for part in range(parts)], workers)


_GROUP_BYTES = 3 << 19  # 1.5 MiB of scores per group: 6 heads at S = 256 (best of 1..12)


def _each(work: Callable[[int, int], None], pairs: list[tuple[int, int]], workers: int
          ) -> None:
    """``work(b, h)`` for every pair, on ``workers`` threads (BLAS single-threaded in them)."""
    if workers > 1 and len(pairs) > 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            list(_executor(workers).map(lambda bh: work(*bh), pairs))
    else:
        for b, h in pairs:
            work(b, h)


def _quiet(window: int | None, xp: Any) -> Any:
    """NumPy's warnings off for the 0/0 of a padding query out of every key's reach under
    a window (the row is zeroed after: ``_finish_window``); a no-op otherwise."""
    if window is None or xp.__name__ != "numpy":
        return nullcontext()
    return xp.errstate(invalid="ignore", divide="ignore")


def _finish_window(out: Any, window: int | None) -> None:
    """Under a window a padding query may have no real key in reach (0/0): its row is
    set to 0, so that no NaN reaches the padding keys of the next layer (NaN + -inf is
    NaN). Real queries always reach themselves."""
    if window is not None:
        xp = get_array_module(out)
        out[...] = xp.where(xp.isfinite(out), out, 0)


def _window_bias(position: Any, window: int | None, seq: int, xp: Any, dtype: Any) -> Any:
    """The score bias the attention maps see: MPNet's (h, S, S), the window's (1, S, S)."""
    if window is None:
        return position
    return rotary.band(0, seq, 0, seq, window, xp, dtype)[None]


def _report(probe: Any, stats: tuple | None, qkv: Any, batch: int, seq: int, heads: int,
            head_dim: int, mask: KeyMask, position: Any = None) -> None:
    """Hand the per-query statistics and the wanted sequences' probabilities to ``probe``
    (``position``: the (h, S, S) position bias of the scores, or None)."""
    if probe is None:
        return
    xp = get_array_module(qkv)
    if stats is not None:
        probe.add(*stats, mask.real(batch, seq, xp))
    for b in probe.map_rows(batch):
        q, k = (qkv.reshape(batch, seq, 3, heads, head_dim)[b, :, i].transpose(1, 0, 2)
                for i in range(2))  # (h, S, d)
        bias = mask.key_bias(b, seq, xp, qkv.dtype)
        with _quiet(0 if position is not None else None, xp):
            probs = probabilities(q, k, bias if position is None else bias + position)
        if position is not None:  # a window: padding queries out of every key's reach: 0
            probs = xp.where(xp.isfinite(probs), probs, 0)
        probe.add_map(b, probs)


# --- attention over part of the keys, with its log-sum-exp, and the merge ---------------

def partial_attention(q: Any, k: Any, v: Any, bias: Any, block: int,
                      poll: Callable[[], None] | None = None,
                      window: tuple[int, int, int] | None = None) -> tuple[Any, Any]:
    """softmax(q k^T + bias) v over the keys given, with the row log-sum-exp:
    q (B, h, Sq, d) already scaled by 1/sqrt(d), k, v (B, h, Sk, d), bias (B, 1, 1, Sk) or
    None -> (o (B, h, Sq, d), lse (B, h, Sq, 1)). Blocked online softmax (FlashAttention,
    forward), O(block^2) scores per (sequence, head) at a time. A row whose every key is
    masked gets o = 0 and lse = -inf, which ``merge`` treats as "no keys". ``poll`` is
    called after every block (a ring shift in flight progresses meanwhile). ``window``:
    (half, first query position, first key position): keys beyond +-half of a query are
    masked, and (query, key) blocks with none within reach are skipped."""
    xp = get_array_module(q)
    o = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty((*q.shape[:3], 1), dtype=q.dtype)
    keys = k.shape[2]
    for q0 in range(0, q.shape[2], block):
        qb = q[:, :, q0:q0 + block]
        m = xp.full((*qb.shape[:3], 1), -xp.inf, dtype=q.dtype)
        total = xp.zeros_like(m)
        acc = xp.zeros(qb.shape, dtype=q.dtype)
        for k0 in range(0, keys, block):
            nk = min(block, keys - k0)
            if window is not None and not rotary.overlaps(window[1] + q0, qb.shape[2],
                                                          window[2] + k0, nk, window[0]):
                continue
            s = qb @ k[:, :, k0:k0 + block].swapaxes(-1, -2)
            if bias is not None:
                s += bias[..., k0:k0 + block]
            if window is not None:
                s += rotary.band(window[1] + q0, qb.shape[2], window[2] + k0, nk, window[0],
                                 xp, s.dtype)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            safe = xp.where(xp.isfinite(m_new), m_new, 0)
            alpha = xp.exp(m - safe)
            s -= safe
            xp.exp(s, out=s)
            total *= alpha
            total += s.sum(axis=-1, keepdims=True)
            acc *= alpha
            acc += s @ v[:, :, k0:k0 + block]
            m = m_new
            if poll is not None:
                poll()
        empty = total == 0
        o[:, :, q0:q0 + block] = acc / xp.where(empty, 1, total)
        lse[:, :, q0:q0 + block] = xp.where(empty, -xp.inf, m + xp.log(xp.where(empty, 1, total)))
    return o, lse


def merge(o: Any, lse: Any, o_new: Any, lse_new: Any) -> tuple[Any, Any]:
    """Attention over two disjoint key sets from each one's (output, log-sum-exp):
    L = log(e^lse + e^lse_new), o = e^(lse - L) o + e^(lse_new - L) o_new (in place on
    ``o``; ring-flash-attention's ``_update_out_and_lse``). Rows with no keys on either
    side (-inf) keep what the other side has."""
    xp = get_array_module(o)
    total = xp.logaddexp(lse, lse_new)
    finite = xp.isfinite(total)
    safe = xp.where(finite, total, 0)
    o *= xp.where(finite, xp.exp(lse - safe), 0)
    o += xp.where(finite, xp.exp(lse_new - safe), 0) * o_new
    return o, total


def partial_attention_backward(q: Any, k: Any, v: Any, bias: Any, do: Any, lse: Any,
                               big_d: Any, scale: float, block: int,
                               poll: Callable[[], None] | None = None
                               ) -> tuple[Any, Any, Any]:
    """The FlashAttention backward against one key slice: (dq, dk, dv) contributions.

    q (B, h, Sq, d) unscaled, k, v (B, h, Sk, d), bias (B, 1, 1, Sk) or None, do the
    output gradient, lse the log-sum-exp over *all* keys (so p = exp(s - lse) are the true
    probabilities), big_d = rowsum(do * o) (B, h, Sq, 1). With ds = p (do v^T - D):
    dq = ds k scale, dk = ds^T q scale, dv = p^T do.
    """
    xp = get_array_module(q)
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    for q0 in range(0, q.shape[2], block):
        qs = slice(q0, q0 + block)
        qb, dob = q[:, :, qs], do[:, :, qs]
        for k0 in range(0, k.shape[2], block):
            ks = slice(k0, k0 + block)
            s = (qb * scale) @ k[:, :, ks].swapaxes(-1, -2)
            if bias is not None:
                s += bias[..., ks]
            p = xp.exp(s - lse[:, :, qs])
            dv[:, :, ks] += p.swapaxes(-1, -2) @ dob
            ds = p * (dob @ v[:, :, ks].swapaxes(-1, -2) - big_d[:, :, qs])
            dq[:, :, qs] += (ds @ k[:, :, ks]) * scale
            dk[:, :, ks] += (ds.swapaxes(-1, -2) @ qb) * scale
            if poll is not None:
                poll()
    return dq, dk, dv


# --- the registry: inference kernel, caching forward and backward per algorithm ---------


def _split_qkv(qkv: Any, batch: int, seq: int, heads: int, head_dim: int) -> tuple:
    """(B*S, 3*h*d) [Q|K|V] -> three (B, h, S, d) views."""
    return tuple(qkv.reshape(batch, seq, 3, heads, head_dim)[:, :, i].transpose(0, 2, 1, 3)
                 for i in range(3))


def _join_qkv(dq: Any, dk: Any, dv: Any) -> Any:
    """Three (B, h, S, d) gradients -> (B*S, 3*h*d) in the fused [Q|K|V] layout."""
    xp = get_array_module(dq)
    batch, heads, seq, head_dim = dq.shape
    dqkv = xp.empty((batch, seq, 3, heads, head_dim), dtype=dq.dtype)
    for i, g in enumerate((dq, dk, dv)):
        dqkv[:, :, i] = g.transpose(0, 2, 1, 3)
    return dqkv.reshape(batch * seq, 3 * heads * head_dim)


@dataclass
class PlainCache:
    q: Any  # (B, h, S, d), unscaled
    k: Any
    v: Any
    p: Any  # (B, h, S, S) probabilities
    bias: Any  # (B, 1, 1, S) 0/-inf
    scale: float


@dataclass
class BlockedCache:
    q: Any  # (B, h, S, d), unscaled
    k: Any
    v: Any
    o: Any  # (B, h, S, d) output
    lse: Any  # (B, h, S, 1) row log-sum-exp
    bias: Any
    scale: float
    block: int


class Plain:
    """The whole (S, S) score matrix of a head at once."""

    name = "plain"

    @staticmethod
    def head(q: Any, k: Any, v: Any, bias: Any, out: Any, block: int = 0,
             stats: tuple | None = None, window: int | None = None) -> None:
        _plain_head(q, k, v, bias, out, stats, window)

    @staticmethod
    def forward_cached(qkv: Any, bias: Any, batch: int, seq: int, heads: int, head_dim: int,
                       block: int = 0) -> tuple[Any, PlainCache]:
        """qkv (B*S, 3*h*d) [Q|K|V] -> o (B*S, h*d), all heads batched."""
        q, k, v = _split_qkv(qkv, batch, seq, heads, head_dim)
        scale = 1.0 / math.sqrt(head_dim)
        s = (q @ k.swapaxes(-1, -2)) * scale  # (B, h, S, S)
        s, _ = mask_cached(s, bias)
        p, _ = softmax_cached(s)
        o = p @ v  # (B, h, S, d)
        out = o.transpose(0, 2, 1, 3).reshape(batch * seq, heads * head_dim)
        return out, PlainCache(q, k, v, p, bias, scale)

    @staticmethod
    def backward(do: Any, c: PlainCache) -> tuple[Any, Any, Any]:
        """(dq, dk, dv) from do, all (B, h, S, d)."""
        dv = c.p.swapaxes(-1, -2) @ do
        dp = do @ c.v.swapaxes(-1, -2)
        ds = mask_backward(softmax_backward(dp, c.p), c.bias) * c.scale
        return ds @ c.k, ds.swapaxes(-1, -2) @ c.q, dv


class Blocked:
    """FlashAttention's online softmax: memory O(S * block) per head instead of O(S^2)."""

    name = "blocked"

    @staticmethod
    def head(q: Any, k: Any, v: Any, bias: Any, out: Any, block: int,
             stats: tuple | None = None, window: int | None = None) -> None:
        _blocked_head(q, k, v, bias, out, block, stats, window)

    @staticmethod
    def forward_cached(qkv: Any, bias: Any, batch: int, seq: int, heads: int, head_dim: int,
                       block: int) -> tuple[Any, BlockedCache]:
        """As ``Plain.forward_cached``, keeping per query row only the log-sum-exp L.

        Per query block: for each key block, s = q k^T/sqrt(d) + bias, new row max m',
        rescale the running sum l and output by exp(m - m'), add exp(s - m') and
        exp(s - m') v. Then o = acc / l and L = m + log l.
        """
        q, k, v = _split_qkv(qkv, batch, seq, heads, head_dim)
        scale = 1.0 / math.sqrt(head_dim)
        o, lse = partial_attention(q * q.dtype.type(scale), k, v, bias, block)
        out = o.transpose(0, 2, 1, 3).reshape(batch * seq, heads * head_dim)
        return out, BlockedCache(q, k, v, o, lse, bias, scale, block)

    @staticmethod
    def backward(do: Any, c: BlockedCache) -> tuple[Any, Any, Any]:
        """FlashAttention's backward: recompute p = exp(s - L) block by block.

        With D = rowsum(do * o): dv += p^T do, dp = do v^T, ds = p (dp - D),
        dq += ds k / sqrt(d), dk += ds^T q / sqrt(d). Masked keys have p = 0: ds = 0 there.
        """
        big_d = (do * c.o).sum(axis=-1, keepdims=True)
        return partial_attention_backward(c.q, c.k, c.v, c.bias, do, c.lse, big_d, c.scale,
                                          c.block)


ALGORITHMS: dict[str, Any] = {"plain": Plain(), "blocked": Blocked()}


def attention_cached(qkv: Any, bias: Any, batch: int, seq: int, heads: int, head_dim: int,
                     impl: str = "plain", block: int = 0) -> tuple[Any, Any]:
    """The caching forward of algorithm ``impl``: (o (B*S, h*d), its cache)."""
    return ALGORITHMS[impl].forward_cached(qkv, bias, batch, seq, heads, head_dim, block)


def attention_backward(dout: Any, cache: Any) -> Any:
    """d qkv (B*S, 3*h*d) from d o (B*S, h*d), for the algorithm that made ``cache``."""
    batch, heads, seq, head_dim = cache.q.shape
    do = dout.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
    algorithm = ALGORITHMS["blocked" if isinstance(cache, BlockedCache) else "plain"]
    return _join_qkv(*algorithm.backward(do, cache))
