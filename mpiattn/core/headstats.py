"""Per-head attention statistics, computed where the head lives: MPI-free.

The statistics of Clark et al. 2019, "What Does BERT Look At? An Analysis of BERT's
Attention" (BlackboxNLP), for the attention distribution p_i. of query token i over the
keys j of one head (softmax of the masked scores, so padding keys have p_ij = 0):

- entropy  H_i = -sum_j p_ij ln p_ij   in nats (0: one key takes it all; ln n: uniform
  over n real keys);
- distance D_i =  sum_j p_ij |i - j|    in tokens (positions in the padded sequence).

Each is averaged over the real (non-padding) query tokens of every sequence of the run:
one number per (layer, head). A rank keeps the *sums* and the token count of its own heads
(``HeadStats``); the file's means are sum / count over all ranks, so data-parallel
replicas, pipeline stages and uneven head splits need nothing inside the forward.

The attention kernels (``attention``) compute the per-query values from what they have:
the unnormalised weights e_ij = exp(s_ij - m_i) and their row sum l_i (p = e / l), with

    H_i = ln l_i - (sum_j e_ij ln e_ij) / l_i,    D_i = (sum_j e_ij |i - j|) / l_i,

(``weight_sums`` and ``finish``); the blocked (online softmax) kernel carries both sums
from key block to key block, rescaled as it rescales l (``rescale_log_sum``), so no
(S, S) probabilities are ever materialised. Attention maps of chosen sequences are a
separate small pass (``attention.probabilities``), the same for every algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import get_array_module, to_host

_DISTANCES: dict[tuple[str, str], Any] = {}  # (module, dtype) -> |i - j| (n, n), grown


def distances(rows: int, cols: int, xp: Any, dtype: Any, first_row: int = 0,
              first_col: int = 0) -> Any:
    """(rows, cols) array of |(first_row + i) - (first_col + j)|: token distances.

    The aligned case (``first_row == first_col == 0``, the plain kernels) is a view of one
    cached matrix per module and dtype, grown to the largest size asked for; offset blocks
    (the blocked kernel) are made on the fly, block x block.
    """
    if first_row or first_col:
        i = xp.arange(first_row, first_row + rows)[:, None]
        j = xp.arange(first_col, first_col + cols)[None, :]
        return xp.abs(i - j).astype(dtype)
    key = (xp.__name__, np.dtype(dtype).str)
    have = _DISTANCES.get(key)
    if have is None or have.shape[0] < max(rows, cols):
        n = max(rows, cols, 0 if have is None else have.shape[0])
        idx = xp.arange(n)
        have = _DISTANCES[key] = xp.abs(idx[:, None] - idx[None, :]).astype(dtype)
    return have[:rows, :cols]


def _row_dot(x: Any, y: Any) -> Any:
    """sum_j x_ij y_ij over the last axis, kept as (..., rows, 1): one batched product of
    (1, keys) @ (keys, 1) per row (faster than multiply-then-sum, and no (rows, keys)
    temporary); ``y`` broadcasts against ``x``."""
    return (x[..., None, :] @ y[..., :, None])[..., 0]


def weight_sums(e: Any, first_row: int = 0, first_col: int = 0) -> tuple[Any, Any]:
    """(sum_j e_ij ln e_ij, sum_j e_ij |i - j|) over the last axis, each (..., rows, 1).

    ``e`` (..., rows, keys): weights in [0, 1] (exp of scores minus the row maximum, or
    probabilities) of queries ``first_row + i`` on keys ``first_col + j``; 0 ln 0 = 0
    (masked keys). A key block wholly on one side of its queries needs no |i - j| matrix:
    sum_j e_ij (delta + j - i) = e (delta + j) - i sum_j e_ij, delta = first_col - first_row.
    """
    xp = get_array_module(e)
    log_e = xp.maximum(e, xp.finfo(e.dtype).tiny)  # e = 0 -> 0 * ln(tiny) = 0
    xp.log(log_e, out=log_e)
    a = _row_dot(e, log_e)
    rows, cols = e.shape[-2:]
    delta = first_col - first_row
    right, left = delta >= rows - 1, delta + cols - 1 <= 0  # keys all right / left of queries
    if right or left:
        j = (delta + xp.arange(cols)).astype(e.dtype)[:, None]
        i = xp.arange(rows, dtype=e.dtype)[:, None]
        c = e @ j - i * e.sum(axis=-1, keepdims=True)
        return a, (c if right else -c)
    return a, _row_dot(e, distances(rows, cols, xp, e.dtype, first_row, first_col))


def rescale_log_sum(a: Any, total: Any, alpha: Any, shift: Any) -> Any:
    """sum e ln e after the row maximum moved: e' = alpha e with ln alpha = ``shift``, so
    sum e' ln e' = alpha (a + shift * total), ``total`` = sum e before the move. Rows
    still without a finite maximum have a = total = 0 and must pass shift = 0."""
    return alpha * (a + shift * total)


def finish(a: Any, c: Any, total: Any, entropy: Any, distance: Any) -> None:
    """Per-query entropy ln l - a / l (nats) and distance c / l (tokens) into the (rows,)
    views ``entropy`` and ``distance``; ``a``, ``c``, ``total`` (rows, 1) are the sums of
    ``weight_sums`` and l = sum_j e_ij."""
    xp = get_array_module(total)
    entropy[...] = (xp.log(total) - a / total)[:, 0]
    distance[...] = (c / total)[:, 0]


def from_probabilities(p: Any) -> tuple[Any, Any]:
    """(entropy, distance) per query, each (..., S_q), of probabilities ``p`` (..., S_q,
    S_k) (rows summing to 1; query i and key j at token positions i and j)."""
    a, c = weight_sums(p)
    return -a[..., 0], c[..., 0]


@dataclass
class HeadStats:
    """One rank's running sums over a run, for its own heads of the layers it computes.

    ``entropy``, ``distance``: (layers, heads) float64 sums over real query tokens of H_i
    (nats) and D_i (tokens); ``queries``: (layers,) float64, the real query tokens summed
    over. ``maps``: (sequence, layer) -> (heads, S, S) probabilities (query, key) of the
    chosen sequences, in the run's dtype. Arrays live on the compute device (``xp``);
    ``host`` copies them out. Heads ``first_head .. first_head + heads - 1`` are global
    indices; sequences are global indices into the run's batch (``first_row`` is the
    global index of this rank's first sequence).
    """

    xp: Any
    layers: int
    first_head: int
    heads: int
    first_row: int = 0
    stats: bool = True  # entropy and distance; False: only maps
    map_sequences: tuple[int, ...] = ()
    entropy: Any = None
    distance: Any = None
    queries: Any = None
    maps: dict[tuple[int, int], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        zeros = self.xp.zeros
        self.entropy = zeros((self.layers, self.heads), dtype=np.float64)
        self.distance = zeros((self.layers, self.heads), dtype=np.float64)
        self.queries = zeros(self.layers, dtype=np.float64)

    def at(self, layer: int, first_row: int = 0) -> Probe:
        """What the attention of ``layer`` reports to, for a batch whose first sequence is
        this rank's ``first_row``-th."""
        return Probe(self, layer, self.first_row + first_row)

    def host(self, maps: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """(entropy, distance, queries, maps) as NumPy arrays; ``maps=False`` leaves the
        maps (L*H*S^2 numbers each) on the device and gives an empty dict."""
        return (to_host(self.entropy), to_host(self.distance), to_host(self.queries),
                {key: to_host(a) for key, a in self.maps.items()} if maps else {})

    def host_maps(self) -> dict:
        """The attention maps as NumPy arrays, without the statistics."""
        return {key: to_host(a) for key, a in self.maps.items()}


@dataclass
class Probe:
    """``HeadStats`` bound to one layer and one batch (its first sequence's global index)."""

    sink: HeadStats
    layer: int
    first_row: int

    @property
    def stats(self) -> bool:
        return self.sink.stats

    def rows(self, offset: int) -> Probe:
        """The probe of the sub-batch starting ``offset`` sequences later."""
        return Probe(self.sink, self.layer, self.first_row + offset)

    def map_rows(self, batch: int) -> list[int]:
        """Local indices (< ``batch``) of the sequences whose maps are wanted."""
        return [g - self.first_row for g in self.sink.map_sequences
                if 0 <= g - self.first_row < batch]

    def add(self, entropy: Any, distance: Any, real: Any) -> None:
        """Add per-query values (B, heads, S) over the real queries ``real`` (B, S) bool."""
        xp = get_array_module(entropy)
        keep = real[:, None, :]
        s = self.sink
        s.entropy[self.layer] += xp.where(keep, entropy, 0).sum(axis=(0, 2), dtype=np.float64)
        s.distance[self.layer] += xp.where(keep, distance, 0).sum(axis=(0, 2),
                                                                  dtype=np.float64)
        s.queries[self.layer] += real.sum(dtype=np.float64)

    def add_map(self, row: int, probs: Any) -> None:
        """Probabilities (heads, S, S) of local sequence ``row`` at this layer."""
        self.sink.maps[(self.first_row + row, self.layer)] = probs


def rank_sums(stats: HeadStats, heads: int) -> np.ndarray:
    """(3, layers, ``heads``) float64: this rank's entropy sums, distance sums and query
    counts in the columns of its own heads (global indices), zero elsewhere; summed over
    all ranks they give every (layer, head) once per replica (``means``)."""
    entropy, distance, queries, _ = stats.host(maps=False)
    out = np.zeros((3, stats.layers, heads))
    cols = slice(stats.first_head, stats.first_head + stats.heads)
    out[0, :, cols] = entropy
    out[1, :, cols] = distance
    out[2, :, cols] = queries[:, None]
    return out


def means(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-wide (entropy [nats], distance [tokens], real query tokens), each (layers,
    heads), from the ``rank_sums`` of every rank stacked (rank, 3, layers, heads)."""
    total = sums.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total[0] / total[2], total[1] / total[2], total[2]


@dataclass
class HeadResults:
    """What goes to ``/heads`` (``layout.write_heads``): run-wide means and chosen maps."""

    entropy: np.ndarray | None  # (layer, head) float64, nats; None without head_stats
    distance: np.ndarray | None  # (layer, head) float64, tokens
    query_tokens: int  # real query tokens each (layer, head) mean is over
    sequences: list[int]  # global sequence index of each map
    maps: np.ndarray | None  # (sequence, layer, head, query, key), the run's dtype


def assemble(sums: np.ndarray | None, pieces: list[tuple[int, int, int, np.ndarray]],
             sequences: list[int], layers: int, heads: int) -> HeadResults:
    """``HeadResults`` from every rank's ``rank_sums`` stacked (rank, 3, layers, heads) (or
    None) and every rank's map pieces (sequence, layer, first head, (h, S, S) probabilities).
    Each (sequence, layer, head) must come from exactly one rank (ValueError otherwise)."""
    entropy = distance = None
    tokens = 0
    if sums is not None:
        entropy, distance, counts = means(sums)
        if counts.min() != counts.max():
            raise ValueError(f"per-head query counts differ ({counts.min()} .. {counts.max()}):"
                             " a layer or head was counted more than once")
        tokens = int(counts.flat[0])
    maps = None
    if sequences:
        seq_len, dtype = pieces[0][3].shape[-1], pieces[0][3].dtype
        maps = np.zeros((len(sequences), layers, heads, seq_len, seq_len), dtype=dtype)
        seen = np.zeros((len(sequences), layers, heads), dtype=np.int64)
        for g, layer, first, probs in pieces:
            at = sequences.index(g)
            maps[at, layer, first:first + probs.shape[0]] = probs
            seen[at, layer, first:first + probs.shape[0]] += 1
        if (seen != 1).any():
            raise ValueError(f"attention maps: {int((seen != 1).sum())} (sequence, layer, head)"
                             " cells not computed exactly once")
    return HeadResults(entropy, distance, tokens, list(sequences), maps)
