"""The oracle: the whole model in one process, written plainly, one head at a time.

No fused QKV, no batched heads, no reductions: separate Q/K/V matrices per head and an
explicit softmax, in the dtype asked for. Every sharded result is tested against this.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from ..config import ModelConfig
from .shard import head_shard

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from ..io.weights import Source


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def forward(
    ids: np.ndarray, mask: np.ndarray, source: Source, model: ModelConfig,
    types: np.ndarray | None = None, probabilities: list | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer (attention outputs, hidden states), each (B, S, hidden).

    ids, mask (True on real tokens) and types (token type ids; None: all 0) are (B, S).
    ``probabilities``: a list that receives each layer's attention probabilities
    (B, heads, S query, S key), 0 on padding keys (the oracle of ``headstats``).
    """
    heads, hidden = model.heads, model.hidden
    d = hidden // heads
    full = head_shard(heads, d, model.ffn, 1, 0)
    emb = source.embeddings()
    seq = ids.shape[1]
    if types is None:
        types = np.zeros_like(ids)
    if emb.padding_idx is None:  # BERT: 0 .. S-1
        positions = np.broadcast_to(np.arange(seq), ids.shape)
    else:  # RoBERTa family: padding_idx + 1 + index among the real tokens; padding_idx
        count = np.cumsum(mask, axis=1)
        positions = np.where(mask, emb.padding_idx + count, emb.padding_idx)
    x = emb.word[ids] + emb.position[positions] + emb.token_type[types]
    x = _layer_norm(x, emb.ln_g, emb.ln_b, model.layer_norm_eps)
    if emb.project_w is not None:  # ELECTRA's embeddings_project
        x = x @ emb.project_w + emb.project_b
    relative = source.relative_bias(full)  # MPNet: (32, heads), else None
    if relative is not None:
        pos = np.arange(seq)
        n = pos[:, None] - pos[None, :]
        a = np.abs(n)
        large = np.array([8 + int(v).bit_length() - 1 for v in (a * a // 64).ravel()])
        large = np.minimum(large.reshape(a.shape), 15)
        buckets = np.where(n < 0, 16, 0) + np.where(a < 8, a, large)
        relative = relative[buckets].transpose(2, 0, 1)  # (heads, S, S)
    attentions, hiddens = [], []
    for layer in range(model.layers):
        p = source.layer(layer, full)
        wq, wk, wv = np.split(p.w_qkv, 3, axis=1)
        bq, bk, bv = np.split(p.b_qkv, 3)
        per_head, probs_of_layer = [], []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            q = x @ wq[:, cols] + bq[cols]  # (B, S, d)
            k = x @ wk[:, cols] + bk[cols]
            v = x @ wv[:, cols] + bv[cols]
            scores = np.einsum("bqd,bkd->bqk", q, k) / math.sqrt(d)
            if relative is not None:
                scores = scores + relative[h]
            scores = np.where(mask[:, None, :], scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            probs_of_layer.append(probs)
            per_head.append(np.einsum("bqk,bkd->bqd", probs, v))
        if probabilities is not None:
            probabilities.append(np.stack(probs_of_layer, axis=1))
        attn = np.concatenate(per_head, axis=-1) @ p.w_o + p.b_o
        h1 = _layer_norm(x + attn, p.ln1_g, p.ln1_b, model.layer_norm_eps)
        a = h1 @ p.w_1 + p.b_1
        a = 0.5 * a * (1.0 + erf(a / math.sqrt(2.0)))
        x = _layer_norm(h1 + a @ p.w_2 + p.b_2, p.ln2_g, p.ln2_b, model.layer_norm_eps)
        attentions.append(attn)
        hiddens.append(x)
    return attentions, hiddens


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the error measure of every equivalence test."""
    scale = float(np.max(np.abs(want))) or 1.0
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) / scale
