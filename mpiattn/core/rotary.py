"""Rotary position embeddings (RoPE) and the sliding attention window: the position
machinery of ModernBERT and NomicBERT, and their gated MLPs (GeGLU, SwiGLU),
array-module generic, MPI-free.

    rotate(qkv, batch, seq, heads, head_dim, theta, start)   # in place, Q and K columns
    band(q0, nq, k0, nk, half, xp, dtype)                    # (nq, nk) 0 / -inf window bias

RoPE (Su et al. 2021) as transformers lays it out (``apply_rotary_pos_emb`` with
``rotate_half``: the two halves of a head's d columns are the pairs): token position p,
pair i < d/2 of a head, angle a = p * theta^(-2i/d); the pair (x_i, x_(i+d/2)) becomes
(x_i cos a - x_(i+d/2) sin a, x_(i+d/2) cos a + x_i sin a). It acts on each head and
each token alone, so a rank's heads rotate without the others (head sharding needs
nothing) and a sequence-parallel rank rotates its slice from the slice's first position.
Cost: 3 operations per element of Q and K (two products, one sum), 6 h d per token.

Angles are computed in float64 whatever the run's dtype (transformers computes them, and
rotates, in float32 even for a float64 model: its float64 output then differs from the
exact rotation by ~1e-7; see docs/models.md).

Window: in a local layer query i sees key j only when |i - j| <= half (ModernBERT:
``half = local_attention // 2``; transformers' ``sliding_window_bidirectional_overlay``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import get_array_module

_TABLES: dict[tuple, tuple[Any, Any]] = {}  # (theta, d, start, count, dtype, xp) -> cos, sin


def tables(theta: float, head_dim: int, start: int, count: int, xp: Any, dtype: Any
           ) -> tuple[Any, Any]:
    """(cos, sin), each (count, head_dim // 2), of positions start..start+count: angles
    p / theta^(2i/d) in float64, then the run's dtype. Made once per shape (kept)."""
    key = (float(theta), head_dim, start, count, str(np.dtype(dtype)), xp.__name__)
    if key not in _TABLES:
        if len(_TABLES) > 256:  # a stream of every sequence length: keep it bounded
            _TABLES.clear()
        inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        angles = np.arange(start, start + count, dtype=np.float64)[:, None] * inv[None, :]
        _TABLES[key] = (xp.asarray(np.cos(angles).astype(dtype)),
                        xp.asarray(np.sin(angles).astype(dtype)))
    return _TABLES[key]


def rotate(qkv: Any, batch: int, seq: int, heads: int, head_dim: int, theta: float,
           start: int = 0) -> None:
    """Rotate the Q and K heads of a fused (B*S, 3*h*d) [Q | K | V] product in place;
    token s of each sequence is at position ``start + s``. ``head_dim`` must be even."""
    xp = get_array_module(qkv)
    half = head_dim // 2
    cos, sin = tables(theta, head_dim, start, seq, xp, qkv.dtype)
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, d/2)
    fused = qkv.reshape(batch, seq, 3, heads, head_dim)
    for part in (0, 1):  # Q, K
        x = fused[:, :, part]  # (B, S, h, d)
        a, b = x[..., :half], x[..., half:]
        first = a * c - b * s
        b_new = b * c + a * s
        a[...] = first
        b[...] = b_new


def overlaps(q_start: int, q_count: int, k_start: int, k_count: int, half: int) -> bool:
    """Whether any of keys k_start..k_start+k_count lies within ``half`` of any of queries
    q_start..q_start+q_count (a block, or a ring step, with none is skipped)."""
    return (k_start <= q_start + q_count - 1 + half
            and k_start + k_count - 1 >= q_start - half)


def band(q_start: int, q_count: int, k_start: int, k_count: int, half: int, xp: Any,
         dtype: Any) -> Any:
    """(q_count, k_count) additive bias: 0 where |query - key| <= half, -inf elsewhere."""
    qi = xp.arange(q_start, q_start + q_count)[:, None]
    kj = xp.arange(k_start, k_start + k_count)[None, :]
    return xp.where(xp.absolute(qi - kj) <= half, 0, -xp.inf).astype(dtype)


def glu(a: Any, act: str = "gelu") -> Any:
    """A gated MLP's activation of a (N, 2f) product laid out [activated | linear]:
    act(activated) * linear, (N, f). ``act`` "gelu": GeGLU (exact erf GELU; ModernBERT's
    ``Wi`` output, ``chunk(2)`` order); "silu": SwiGLU (NomicBERT: silu(fc12 x) * fc11 x,
    its ``fc12`` columns loaded first)."""
    from .ops import gelu

    f = a.shape[1] // 2
    xp = get_array_module(a)
    first = xp.ascontiguousarray(a[:, :f])
    out = gelu(first) if act == "gelu" else silu(first)
    out *= a[:, f:]
    return out


def silu(x: Any) -> Any:
    """x * sigmoid(x), sigmoid from e = exp(-|x|) (never overflows): 1 / (1 + e) where
    x >= 0, e / (1 + e) elsewhere; 7 operations a value, one of them an exp. Returns a
    new array."""
    xp = get_array_module(x)
    e = xp.exp(-xp.absolute(x))
    s = 1 / (1 + e)  # sigmoid(|x|)
    return x * xp.where(x >= 0, s, e * s)
