"""Scaled dot-product attention on the heads of one rank: no communication happens here.

Shapes: ``q, k, v`` are (B, h, S, d) with h the rank's heads; ``key_mask`` is (B, S), True
for real tokens. Padding is masked on the key axis with -inf, which is exact (exp(-inf) = 0)
as long as every sequence has at least one real token, which the input layer guarantees.
"""

from __future__ import annotations

import math
from typing import Any

from .backend import get_array_module


def mask_bias(key_mask: Any, dtype: Any) -> Any:
    """(B, 1, 1, S) additive bias: 0 on real tokens, -inf on padding."""
    xp = get_array_module(key_mask)
    bias = xp.zeros(key_mask.shape, dtype=dtype)
    bias[~key_mask] = -xp.inf
    return bias[:, None, None, :]


def softmax(s: Any, out: Any = None) -> Any:
    """Softmax over the last axis, stabilised by the row maximum; ``out=s`` works in place."""
    xp = get_array_module(s)
    out = xp.subtract(s, s.max(axis=-1, keepdims=True), out=out)
    xp.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out


def attention(q: Any, k: Any, v: Any, bias: Any = None) -> Any:
    """softmax(q k^T / sqrt(d) + bias) v, all heads of the rank in one batched product."""
    xp = get_array_module(q)
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    scores = xp.matmul(q * scale, k.swapaxes(-1, -2))  # (B, h, S, S)
    if bias is not None:
        scores += bias
    probs = softmax(scores, out=scores)
    return xp.matmul(probs, v)  # (B, h, S, d)
