"""Hand-written backward passes, llm.c style: ``forward(x, ...) -> (out, cache)`` and
``backward(dout, cache) -> gradients``, on NumPy or CuPy arrays, MPI-free.

The encoder layer here is the same math as ``model.layer_forward`` (tested equal) but keeps
what backward needs. Megatron's conjugate pair decides where the head group talks:

- forward: after each row-parallel product (attention output, second MLP linear) the
  partial sums are reduced (sites ``attention`` and ``mlp``);
- backward: the gradient *entering* a column-parallel region — dL/dx of the input of the
  fused QKV product and of the first MLP linear — is a partial sum over this rank's heads
  and is reduced (sites ``attention.bwd`` and ``mlp.bwd``); the gradient leaving a
  row-parallel region (dL/d partial = dL/d sum) needs no communication.

Replicated parameters (biases added after a reduction, LayerNorms, embeddings, the MLM
head) get bit-identical gradients on every rank of a head group, since everything after
a reduction is computed from identical inputs.

The MLM head is BERT's: transform (dense + GELU + LayerNorm), then a decoder tied to the
word embeddings plus a bias, applied only to the masked positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .backend import erf, get_array_module
from .model import Embeddings, LayerShard, Reduce

# --- elementary ops -------------------------------------------------------------------


def linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, Any]:
    """y = x @ w (+ b) for x (N, in), w (in, out)."""
    y = x @ w
    if b is not None:
        y += b
    return y, (x, w)


def linear_backward(dy: Any, cache: Any) -> tuple[Any, Any, Any]:
    """(dx, dw, db) of ``linear_forward``; db is returned even when there was no bias."""
    x, w = cache
    return dy @ w.T, x.T @ dy, dy.sum(axis=0)


def softmax_forward(s: Any) -> tuple[Any, Any]:
    """Softmax over the last axis (rows of -inf give 0 weight to those entries)."""
    xp = get_array_module(s)
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp: Any, p: Any) -> Any:
    """ds = p * (dp - sum(dp * p)) along the last axis."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def mask_forward(s: Any, bias: Any) -> tuple[Any, Any]:
    """Padding mask as an additive 0/-inf bias on the key axis (broadcast)."""
    return s + bias, bias


def mask_backward(ds: Any, bias: Any) -> Any:
    """Masked entries do not depend on the scores (their weight is exactly zero)."""
    xp = get_array_module(ds)
    return xp.where(xp.isfinite(bias), ds, 0)


def layernorm_forward(x: Any, g: Any, b: Any, eps: float) -> tuple[Any, Any]:
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dy: Any, cache: Any) -> tuple[Any, Any, Any]:
    """(dx, dg, db); rows are the leading axes, features the last."""
    xhat, rstd, g = cache
    feat = xhat.shape[-1]
    lead = tuple(range(dy.ndim - 1))
    dg = (dy * xhat).sum(axis=lead)
    db = dy.sum(axis=lead)
    dxhat = dy * g
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True)
          - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / feat) * rstd
    return dx, dg, db


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x: Any) -> tuple[Any, Any]:
    """Exact GELU x * Phi(x) (erf), as BERT and ``model.gelu``."""
    cdf = 0.5 * (1.0 + erf(x * _SQRT_HALF))
    return x * cdf, (x, cdf)


def gelu_backward(dy: Any, cache: Any) -> Any:
    """d/dx x Phi(x) = Phi(x) + x phi(x)."""
    xp = get_array_module(dy)
    x, cdf = cache
    pdf = xp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return dy * (cdf + x * pdf)


def scatter_add(target: Any, index: Any, values: Any) -> None:
    """target[index] += values with repeated indices accumulated (NumPy or CuPy)."""
    xp = get_array_module(target)
    if xp.__name__ == "cupy":
        import cupyx

        cupyx.scatter_add(target, index, values)
    else:
        xp.add.at(target, index, values)


def embedding_forward(ids: Any, emb: Embeddings, eps: float) -> tuple[Any, Any]:
    """Word + position + token-type(0), then LayerNorm: (B, S) -> (B, S, H), as ``model.embed``."""
    seq = ids.shape[1]
    x = emb.word[ids] + emb.position[:seq] + emb.token_type[0]
    out, ln = layernorm_forward(x, emb.ln_g, emb.ln_b, eps)
    return out, (ids, ln, emb)


def embedding_backward(dout: Any, cache: Any) -> Embeddings:
    """Gradients of every embedding table (same shapes as the tables)."""
    xp = get_array_module(dout)
    ids, ln, emb = cache
    dx, dg, db = layernorm_backward(dout, ln)
    hidden = dx.shape[-1]
    dword = xp.zeros_like(emb.word)
    scatter_add(dword, ids.reshape(-1), dx.reshape(-1, hidden))
    dpos = xp.zeros_like(emb.position)
    dpos[: ids.shape[1]] = dx.sum(axis=0)
    dtype_ = xp.zeros_like(emb.token_type)
    dtype_[0] = dx.sum(axis=(0, 1))
    return Embeddings(dword, dpos, dtype_, dg, db)


def cross_entropy_forward(logits: Any, targets: Any, scale: float) -> tuple[Any, Any]:
    """scale * sum_i -log softmax(logits_i)[targets_i]: a float, and the cache.

    ``scale`` is 1 / (masked tokens in the *global* batch), so that the sum of every
    replica's loss (and gradient) is the mean over the global batch.
    """
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logz = xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
    logp = shifted - logz
    rows = xp.arange(targets.shape[0])
    loss = -float(logp[rows, targets].sum()) * scale
    return loss, (logp, targets, scale)


def cross_entropy_backward(cache: Any) -> Any:
    xp = get_array_module(cache[0])
    logp, targets, scale = cache
    dlogits = xp.exp(logp)
    dlogits[xp.arange(targets.shape[0]), targets] -= 1.0
    dlogits *= scale
    return dlogits


# --- attention on this rank's heads ---------------------------------------------------


def key_bias(key_mask: Any, dtype: Any) -> Any:
    """(B, 1, 1, S) additive bias from a (B, S) bool mask of real tokens."""
    xp = get_array_module(key_mask)
    bias = xp.zeros(key_mask.shape, dtype=dtype)
    bias[~key_mask] = -xp.inf
    return bias[:, None, None, :]


def attention_forward(qkv: Any, bias: Any, batch: int, seq: int, heads: int,
                      head_dim: int) -> tuple[Any, Any]:
    """Plain attention of the local heads: qkv (B*S, 3*h*d) [Q|K|V] -> o (B*S, h*d)."""
    width = heads * head_dim
    # (B, S, 3, h, d) -> three (B, h, S, d)
    q, k, v = (qkv.reshape(batch, seq, 3, heads, head_dim)[:, :, i].transpose(0, 2, 1, 3)
               for i in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    s = (q @ k.swapaxes(-1, -2)) * scale  # (B, h, S, S)
    s, mcache = mask_forward(s, bias)
    p, pcache = softmax_forward(s)
    o = p @ v  # (B, h, S, d)
    out = o.transpose(0, 2, 1, 3).reshape(batch * seq, width)
    return out, (q, k, v, pcache, mcache, scale, batch, seq, heads, head_dim)


def blocked_attention_forward(qkv: Any, bias: Any, batch: int, seq: int, heads: int,
                              head_dim: int, block: int) -> tuple[Any, Any]:
    """Attention by the online softmax (FlashAttention), keeping per query row only the
    log-sum-exp L for the backward pass: memory O(S*block) instead of O(S^2) per head.

    Per query block: for each key block, s = q k^T/sqrt(d) + bias, new row max m', rescale
    the running sum l and output by exp(m - m'), add exp(s - m') and exp(s - m') v. Then
    o = acc / l and L = m + log l.
    """
    xp = get_array_module(qkv)
    q, k, v = (qkv.reshape(batch, seq, 3, heads, head_dim)[:, :, i].transpose(0, 2, 1, 3)
               for i in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    o = xp.empty((batch, heads, seq, head_dim), dtype=qkv.dtype)
    lse = xp.empty((batch, heads, seq, 1), dtype=qkv.dtype)
    for q0 in range(0, seq, block):
        qb = q[:, :, q0:q0 + block] * scale
        m = xp.full((*qb.shape[:3], 1), -xp.inf, dtype=qkv.dtype)
        total = xp.zeros_like(m)
        acc = xp.zeros(qb.shape, dtype=qkv.dtype)
        for k0 in range(0, seq, block):
            s = qb @ k[:, :, k0:k0 + block].swapaxes(-1, -2)
            if bias is not None:
                s = s + bias[..., k0:k0 + block]
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            safe = xp.where(xp.isfinite(m_new), m_new, 0)
            alpha = xp.exp(m - safe)
            p = xp.exp(s - safe)
            total = total * alpha + p.sum(axis=-1, keepdims=True)
            acc = acc * alpha + p @ v[:, :, k0:k0 + block]
            m = m_new
        o[:, :, q0:q0 + block] = acc / total
        lse[:, :, q0:q0 + block] = m + xp.log(total)
    out = o.transpose(0, 2, 1, 3).reshape(batch * seq, heads * head_dim)
    return out, ("blocked", q, k, v, o, lse, bias, scale, block, batch, seq, heads, head_dim)


def _blocked_attention_backward(do: Any, cache: Any) -> tuple[Any, Any, Any]:
    """FlashAttention's backward: recompute p = exp(s - L) block by block.

    With D = rowsum(do * o): dv += p^T do, dp = do v^T, ds = p (dp - D),
    dq += ds k / sqrt(d), dk += ds^T q / sqrt(d). Masked keys have p = 0, so ds = 0 there.
    """
    xp = get_array_module(do)
    _, q, k, v, o, lse, bias, scale, block, _, seq = cache[:11]
    big_d = (do * o).sum(axis=-1, keepdims=True)
    dq, dk, dv = (xp.zeros_like(t) for t in (q, k, v))
    for q0 in range(0, seq, block):
        qs = slice(q0, q0 + block)
        qb, dob = q[:, :, qs], do[:, :, qs]
        for k0 in range(0, seq, block):
            ks = slice(k0, k0 + block)
            s = (qb * scale) @ k[:, :, ks].swapaxes(-1, -2)
            if bias is not None:
                s = s + bias[..., ks]
            p = xp.exp(s - lse[:, :, qs])
            dv[:, :, ks] += p.swapaxes(-1, -2) @ dob
            ds = p * (dob @ v[:, :, ks].swapaxes(-1, -2) - big_d[:, :, qs])
            dq[:, :, qs] += (ds @ k[:, :, ks]) * scale
            dk[:, :, ks] += (ds.swapaxes(-1, -2) @ qb) * scale
    return dq, dk, dv


def attention_backward(dout: Any, cache: Any) -> Any:
    """d qkv (B*S, 3*h*d) from d o (B*S, h*d), for the plain or the blocked forward."""
    xp = get_array_module(dout)
    if isinstance(cache[0], str):  # blocked
        batch, seq, heads, head_dim = cache[-4:]
        do = dout.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
        dq, dk, dv = _blocked_attention_backward(do, cache)
        dqkv = xp.empty((batch, seq, 3, heads, head_dim), dtype=dout.dtype)
        for i, g in enumerate((dq, dk, dv)):
            dqkv[:, :, i] = g.transpose(0, 2, 1, 3)
        return dqkv.reshape(batch * seq, 3 * heads * head_dim)
    q, k, v, p, bias, scale, batch, seq, heads, head_dim = cache
    do = dout.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ v.swapaxes(-1, -2)
    ds = mask_backward(softmax_backward(dp, p), bias) * scale
    dq = ds @ k
    dk = ds.swapaxes(-1, -2) @ q
    dqkv = xp.empty((batch, seq, 3, heads, head_dim), dtype=dout.dtype)
    for i, g in enumerate((dq, dk, dv)):
        dqkv[:, :, i] = g.transpose(0, 2, 1, 3)
    return dqkv.reshape(batch * seq, 3 * heads * head_dim)


# --- one encoder layer on this rank's heads -------------------------------------------


def layer_forward(x: Any, p: LayerShard, bias: Any, reduce: Reduce, layer: int,
                  eps: float, block: int = 0) -> tuple[Any, Any]:
    """(B, S, H) -> (B, S, H), the math of ``model.layer_forward`` with a cache.

    ``block > 0`` runs blocked (online-softmax) attention with that block size.
    """
    batch, seq, hidden = x.shape
    x2 = x.reshape(batch * seq, hidden)
    qkv, c_qkv = linear_forward(x2, p.w_qkv, p.b_qkv)  # column-parallel
    if block:
        o, c_att = blocked_attention_forward(qkv, bias, batch, seq, p.heads, p.head_dim,
                                             block)
    else:
        o, c_att = attention_forward(qkv, bias, batch, seq, p.heads, p.head_dim)
    partial, c_o = linear_forward(o, p.w_o)  # row-parallel
    attn = reduce(partial, site="attention", layer=layer) + p.b_o
    h1, c_ln1 = layernorm_forward(attn + x2, p.ln1_g, p.ln1_b, eps)
    a, c_1 = linear_forward(h1, p.w_1, p.b_1)  # column-parallel
    g, c_gelu = gelu_forward(a)
    partial, c_2 = linear_forward(g, p.w_2)  # row-parallel
    mlp = reduce(partial, site="mlp", layer=layer) + p.b_2
    out, c_ln2 = layernorm_forward(mlp + h1, p.ln2_g, p.ln2_b, eps)
    cache = (c_qkv, c_att, c_o, c_ln1, c_1, c_gelu, c_2, c_ln2, x.shape, layer)
    return out.reshape(batch, seq, hidden), cache


def layer_backward(dout: Any, cache: Any, reduce: Reduce) -> tuple[Any, LayerShard]:
    """(dx, gradients of this rank's LayerShard); two reductions, at the column-parallel
    inputs (the conjugates of the forward ones)."""
    c_qkv, c_att, c_o, c_ln1, c_1, c_gelu, c_2, c_ln2, shape, layer = cache
    batch, seq, hidden = shape
    dout = dout.reshape(batch * seq, hidden)
    dm, dln2_g, dln2_b = layernorm_backward(dout, c_ln2)  # d(mlp + h1)
    db_2 = dm.sum(axis=0)
    dg, dw_2, _ = linear_backward(dm, c_2)  # leaving the row-parallel region: no reduce
    da = gelu_backward(dg, c_gelu)
    dh1_part, dw_1, db_1 = linear_backward(da, c_1)
    dh1 = reduce(dh1_part, site="mlp.bwd", layer=layer) + dm  # entering column-parallel
    dr, dln1_g, dln1_b = layernorm_backward(dh1, c_ln1)  # d(attn + x2)
    db_o = dr.sum(axis=0)
    do, dw_o, _ = linear_backward(dr, c_o)
    dqkv = attention_backward(do, c_att)
    dx_part, dw_qkv, db_qkv = linear_backward(dqkv, c_qkv)
    # The key bias adds q.b_k to every score of a query row; softmax ignores such a shift, so
    # its gradient is exactly zero. Computed, it is rounding noise that Adam would blow up
    # to steps of size lr (and that differs between layouts): write the exact zero.
    width = db_qkv.shape[0] // 3
    db_qkv[width: 2 * width] = 0
    dx = reduce(dx_part, site="attention.bwd", layer=layer) + dr
    grads = LayerShard(w_qkv=dw_qkv, b_qkv=db_qkv, w_o=dw_o, b_o=db_o, ln1_g=dln1_g,
                       ln1_b=dln1_b, w_1=dw_1, b_1=db_1, w_2=dw_2, b_2=db_2, ln2_g=dln2_g,
                       ln2_b=dln2_b, head_dim=c_att[-1])
    return dx.reshape(batch, seq, hidden), grads


# --- the MLM head and the whole model ---------------------------------------------------


@dataclass
class MLMHead:
    """BERT's prediction head; the decoder weight is the word embedding (tied)."""

    dense_w: Any  # (hidden, hidden), stored (in, out)
    dense_b: Any  # (hidden,)
    ln_g: Any
    ln_b: Any
    bias: Any  # (vocab,)


@dataclass
class Params:
    """Everything one rank trains: replicated embeddings and head, sharded layers."""

    emb: Embeddings
    layers: list[LayerShard]
    head: MLMHead


def head_forward(h: Any, head: MLMHead, word: Any, eps: float) -> tuple[Any, Any]:
    """(N, H) hidden rows at masked positions -> (N, vocab) logits."""
    t, c_d = linear_forward(h, head.dense_w, head.dense_b)
    t, c_g = gelu_forward(t)
    t, c_ln = layernorm_forward(t, head.ln_g, head.ln_b, eps)
    logits, c_dec = linear_forward(t, word.T, head.bias)
    return logits, (c_d, c_g, c_ln, c_dec)


def head_backward(dlogits: Any, cache: Any) -> tuple[Any, MLMHead, Any]:
    """(dh, head gradients, d word embeddings from the tied decoder)."""
    c_d, c_g, c_ln, c_dec = cache
    dt, dword_t, dbias = linear_backward(dlogits, c_dec)
    dt, dln_g, dln_b = layernorm_backward(dt, c_ln)
    dt = gelu_backward(dt, c_g)
    dh, ddense_w, ddense_b = linear_backward(dt, c_d)
    return dh, MLMHead(ddense_w, ddense_b, dln_g, dln_b, dbias), dword_t.T


def model_forward(params: Params, ids: Any, key_mask: Any, positions: Any, targets: Any,
                  scale: float, reduce: Reduce, eps: float, block: int = 0
                  ) -> tuple[float, Any]:
    """MLM loss of a batch: ids (B, S), key_mask (B, S) bool, positions (N,) flat indices
    into B*S of the masked tokens, targets (N,) their original ids.

    Returns ``scale * sum of the N token losses`` and the cache for ``model_backward``.
    """
    x, c_emb = embedding_forward(ids, params.emb, eps)
    bias = key_bias(key_mask, x.dtype)
    caches = []
    for i, p in enumerate(params.layers):
        x, c = layer_forward(x, p, bias, reduce, i, eps, block)
        caches.append(c)
    hidden = x.shape[-1]
    h = x.reshape(-1, hidden)[positions]
    logits, c_head = head_forward(h, params.head, params.emb.word, eps)
    loss, c_ce = cross_entropy_forward(logits, targets, scale)
    return loss, (c_emb, caches, c_head, c_ce, positions, x.shape)


def model_backward(cache: Any, reduce: Reduce) -> Params:
    """Gradients of every parameter this rank holds, in the shape of ``Params``."""
    xp = get_array_module(cache[3][0])
    c_emb, caches, c_head, c_ce, positions, shape = cache
    dlogits = cross_entropy_backward(c_ce)
    dh, dhead, dword_dec = head_backward(dlogits, c_head)
    dx = xp.zeros((shape[0] * shape[1], shape[2]), dtype=dh.dtype)
    dx[positions] = dh  # positions are distinct
    dx = dx.reshape(shape)
    dlayers: list[LayerShard] = []
    for c in reversed(caches):
        dx, g = layer_backward(dx, c, reduce)
        dlayers.append(g)
    demb = embedding_backward(dx, c_emb)
    demb.word += dword_dec
    return Params(demb, dlayers[::-1], dhead)


# --- parameters as a flat, named list -------------------------------------------------

LAYER_SHARDED = ("w_qkv", "b_qkv", "w_o", "w_1", "b_1", "w_2")  # split across head ranks


def named(params: Params) -> list[tuple[str, Any, bool]]:
    """(name, array, sharded) for every tensor, in a fixed order (optimizer, buckets)."""
    out = [(f"emb.{f.name}", getattr(params.emb, f.name), False) for f in fields(Embeddings)]
    for i, p in enumerate(params.layers):
        for f in fields(LayerShard):
            if f.name != "head_dim":
                out.append((f"layer{i}.{f.name}", getattr(p, f.name), f.name in LAYER_SHARDED))
    out += [(f"head.{f.name}", getattr(params.head, f.name), False) for f in fields(MLMHead)]
    return out


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
