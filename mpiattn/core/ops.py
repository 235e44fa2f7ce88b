"""Elementary operations of the encoder, each as a side-by-side family (llm.c style):

- ``op(x, ...)``: the forward the inference path runs (in place where it can);
- ``op_cached(x, ...) -> (out, cache)``: the forward training runs, keeping what backward
  needs in a named cache;
- ``op_backward(dout, cache)``: the gradients.

Array-module generic (NumPy or CuPy), MPI-free; each backward is checked against central
finite differences in float64 (tests/core/test_grad.py). The two forwards of an op compute the
same function (tested equal within float tolerance); they differ in what they keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import kernels
from .backend import erf, get_array_module

# --- linear ------------------------------------------------------------------------------


@dataclass
class LinearCache:
    x: Any  # (N, in)
    w: Any  # (in, out)


def linear_cached(x: Any, w: Any, b: Any = None) -> tuple[Any, LinearCache]:
    """y = x @ w (+ b) for x (N, in), w (in, out)."""
    y = x @ w
    if b is not None:
        y += b
    return y, LinearCache(x, w)


def linear_backward(dy: Any, cache: LinearCache) -> tuple[Any, Any, Any]:
    """(dx, dw, db) of ``linear_cached``; db is returned even when there was no bias."""
    return dy @ cache.w.T, cache.x.T @ dy, dy.sum(axis=0)


# --- softmax and the padding mask ----------------------------------------------------------


def softmax(s: Any, out: Any = None) -> Any:
    """Softmax over the last axis, stabilised by the row maximum; ``out=s`` works in place."""
    xp = get_array_module(s)
    out = xp.subtract(s, s.max(axis=-1, keepdims=True), out=out)
    xp.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out


def softmax_cached(s: Any) -> tuple[Any, Any]:
    """Softmax over the last axis (rows of -inf give 0 weight to those entries); the cache
    is the probabilities themselves."""
    xp = get_array_module(s)
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp: Any, p: Any) -> Any:
    """ds = p * (dp - sum(dp * p)) along the last axis."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def mask_cached(s: Any, bias: Any) -> tuple[Any, Any]:
    """Padding mask as an additive 0/-inf bias on the key axis (broadcast)."""
    return s + bias, bias


def mask_backward(ds: Any, bias: Any) -> Any:
    """Masked entries do not depend on the scores (their weight is exactly zero)."""
    xp = get_array_module(ds)
    return xp.where(xp.isfinite(bias), ds, 0)


# --- LayerNorm ---------------------------------------------------------------------------


def layer_norm(x: Any, g: Any, b: Any, eps: float) -> Any:
    """LayerNorm over the last axis, one temporary."""
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = xp.mean(centred * centred, axis=-1, keepdims=True)
    centred /= xp.sqrt(var + eps)
    centred *= g
    centred += b
    return centred


def add_layer_norm(x: Any, residual: Any, g: Any, b: Any, eps: float, *, bias: Any = None,
                   total: Any = None, out: Any = None) -> Any:
    """LayerNorm(x + bias + residual) over the last axis of (N, H) arrays: the residual
    add and norm after a sublayer, in one pass over memory.

    ``bias``: (H,) or None. ``total``: an (N, H) array that also receives ``x + bias``
    (the sublayer's output, for callers that keep it), or None. ``out``: the (N, H)
    result, new when None; it may not be ``x`` or ``residual``. On NumPy, C-contiguous
    float32 arrays go to the compiled kernel (``kernels.add_layer_norm``, row by row);
    otherwise C-contiguous arrays go in blocks of rows small enough for the blocks to stay
    in L2 (about 2x faster than whole-array passes and their temporaries at BERT-base's
    4096 x 768).
    """
    xp = get_array_module(x)
    out = xp.empty(x.shape, dtype=x.dtype) if out is None else out
    arrays = (x, residual, out) + (() if total is None else (total,))
    if x.ndim == 2 and g is not None and b is not None and kernels.fits(
            x, residual, g, b, bias, written=(out, total)) and all(
            a.shape == x.shape for a in arrays) and all(
            v is None or v.shape == x.shape[1:] for v in (g, b, bias)):
        return kernels.add_layer_norm(x, residual, g, b, eps, bias, total, out)
    if xp is not np or x.ndim != 2 or not all(a.flags.c_contiguous for a in arrays):
        s = x if bias is None else x + bias
        if total is not None:
            total[...] = s
        out[...] = layer_norm(s + residual, g, b, eps)
        return out
    cols = x.shape[1] or 1
    step = max(1, _NORM_BLOCK // cols)
    inv_cols, eps_ = x.dtype.type(1.0 / cols), x.dtype.type(eps)
    for i in range(0, x.shape[0], step):
        rows = slice(i, i + step)
        o = out[rows]
        if bias is None:
            if total is not None:
                total[rows] = x[rows]
            np.add(x[rows], residual[rows], out=o)
        else:
            s = o if total is None else total[rows]
            np.add(x[rows], bias, out=s)
            np.add(s, residual[rows], out=o)
        o -= o.mean(axis=1, keepdims=True)
        rstd = np.einsum("ij,ij->i", o, o)  # the rows' sums of squares
        rstd *= inv_cols
        rstd += eps_
        np.sqrt(rstd, out=rstd)
        np.reciprocal(rstd, out=rstd)
        o *= rstd[:, None]
        o *= g
        o += b
    return out


_NORM_BLOCK = 1 << 17  # elements per block (512 KiB of float32); measured best of 2^13..2^17


@dataclass
class LayerNormCache:
    xhat: Any  # normalised input, same shape as x
    rstd: Any  # 1 / std per row, (..., 1)
    g: Any  # the gain


def layer_norm_cached(x: Any, g: Any, b: Any, eps: float) -> tuple[Any, LayerNormCache]:
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * g + b, LayerNormCache(xhat, rstd, g)


def layer_norm_backward(dy: Any, cache: LayerNormCache) -> tuple[Any, Any, Any]:
    """(dx, dg, db); rows are the leading axes, features the last."""
    xhat, rstd, g = cache.xhat, cache.rstd, cache.g
    feat = xhat.shape[-1]
    lead = tuple(range(dy.ndim - 1))
    dg = (dy * xhat).sum(axis=lead)
    db = dy.sum(axis=lead)
    dxhat = dy * g
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True)
          - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / feat) * rstd
    return dx, dg, db


# --- GELU (exact, erf) -------------------------------------------------------------------

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(x: Any, out: Any = None, bias: Any = None) -> Any:
    """Exact GELU, x * Phi(x), as BERT uses it, of ``x + bias`` (bias: one row, or None);
    ``out`` (not ``x``) saves the temporaries. float32 on NumPy runs the compiled kernel
    (``kernels.gelu``, one pass) or else goes block by block (``_gelu_blocks``), both by
    Abramowitz & Stegun 7.1.26; ``x`` is then left as it was."""
    xp = get_array_module(x)
    if xp is np and x.dtype == np.float32 and x.ndim >= 1 and x.flags.c_contiguous and (
            out is None or out.flags.c_contiguous):
        out = np.empty_like(x) if out is None else out
        if kernels.fits(x, bias, written=(out,)) and out.shape == x.shape and (
                bias is None or bias.shape == x.shape[-1:]):
            return kernels.gelu(x, bias, out)
        return _gelu_blocks(x, out, bias)
    if bias is not None:
        x = x + bias
    t = xp.multiply(x, x.dtype.type(_SQRT_HALF), out=out)
    erf(t, out=t)
    t += 1.0
    t *= x
    t *= 0.5
    return t


def _gelu_blocks(x: np.ndarray, out: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """GELU of a float32 array in L2-sized blocks of whole rows, as x * Phi(x) written
    ``max(x, 0) - |x| q`` with ``q = Phi(-|x|) = erfc(|x| / sqrt 2) / 2`` by Abramowitz &
    Stegun 7.1.26 (Hastings): ``erfc(z) = t P(t) exp(-z^2)``, ``t = 1 / (1 + p z)``, P of
    degree 5, |error| <= 1.5e-7 in erf. 21 passes over a block that stays in cache,
    against 33 for ``erf_float32`` and the GELU around it: 1.45x faster at BERT's MLP
    width, and as accurate in absolute terms (3.3e-7 against float64 over [-12, 12],
    float32 rounding included, vs 4.5e-7). +-inf give NaN (the finite checks then name
    the layer); ``x`` is left as it was."""
    cols = x.shape[-1] if x.shape[-1] else 1
    rows_x, rows_out = x.reshape(-1, cols), out.reshape(-1, cols)
    step = max(1, _GELU_BLOCK // cols)
    work = np.empty((4, min(step, rows_x.shape[0]), cols), dtype=np.float32)
    one, zero, minus_half = np.float32(1), np.float32(0), np.float32(-0.5)
    with np.errstate(over="ignore", invalid="ignore"):  # x^2 of |x| > 1.8e19; +-inf
        for i in range(0, rows_x.shape[0], step):
            xb, o = rows_x[i : i + step], rows_out[i : i + step]
            n = xb.shape[0]
            if bias is not None:
                xb = np.add(xb, bias, out=work[0, :n])
            a = np.abs(xb, out=work[1, :n])
            t = np.multiply(a, _HASTINGS_P, out=work[2, :n])
            t += one
            np.reciprocal(t, out=t)
            y = np.multiply(t, _HASTINGS_A[-1], out=work[3, :n])
            for c in _HASTINGS_A[-2::-1]:  # Horner: q = t (a1 + t (a2 + ... t a5)) ...
                y += c
                y *= t
            e = np.multiply(xb, xb, out=t)
            e *= minus_half
            np.exp(e, out=e)  # ... * exp(-x^2 / 2)
            y *= e
            y *= a
            np.maximum(xb, zero, out=o)
            o -= y
    return out


_GELU_BLOCK = 1 << 15
# Abramowitz & Stegun (1964) 7.1.26: p and a1..a5, here for erfc(|x| / sqrt 2) / 2
_HASTINGS_P = np.float32(0.3275911 * _SQRT_HALF)
_HASTINGS_A = tuple(np.float32(a / 2) for a in (
    0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


@dataclass
class GeluCache:
    x: Any
    cdf: Any  # Phi(x)


def gelu_cached(x: Any) -> tuple[Any, GeluCache]:
    cdf = 0.5 * (1.0 + erf(x * _SQRT_HALF))
    return x * cdf, GeluCache(x, cdf)


def gelu_backward(dy: Any, cache: GeluCache) -> Any:
    """d/dx x Phi(x) = Phi(x) + x phi(x)."""
    xp = get_array_module(dy)
    x, cdf = cache.x, cache.cdf
    pdf = xp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return dy * (cdf + x * pdf)


# --- embeddings --------------------------------------------------------------------------


def relative_buckets(seq: int, xp: Any) -> Any:
    """MPNet's relative position bucket of key j for query i: (S, S) int, 32 buckets,
    max distance 128 (transformers' ``relative_position_bucket``): 16 per direction
    (key before the query: +16), distances 0..7 exact, then 8 + floor(2 log2(n / 8))
    up to 15. The log is taken exactly on integers (``frexp`` of floor(n^2 / 64)), which
    agrees with transformers' float32 arithmetic for every distance below 70,000."""
    pos = xp.arange(seq)
    n = pos[:, None] - pos[None, :]  # query - key = -(relative position)
    a = xp.abs(n)
    large = 8 + xp.frexp(xp.maximum(a * a // 64, 1).astype(xp.float64))[1] - 1
    return xp.where(n < 0, 16, 0) + xp.where(a < 8, a, xp.minimum(large, 15))


def position_rows(key_mask: Any, padding_idx: int, offset: int, seq: int) -> Any:
    """RoBERTa-family position rows of tokens ``offset .. offset + seq`` of whole
    sequences whose real tokens are ``key_mask`` (B, S_whole): ``padding_idx`` + the
    running count of real tokens, ``padding_idx`` on padding (transformers'
    ``create_position_ids_from_input_ids``, with padding told by the mask): (B, seq) int."""
    xp = get_array_module(key_mask)
    real = key_mask.astype(xp.int64)
    rows = padding_idx + xp.cumsum(real, axis=1) * real
    return rows[:, offset:offset + seq]


def embed(ids: Any, emb: Any, eps: float, types: Any = None, offset: int = 0,
          key_mask: Any = None) -> Any:
    """Word + position + token-type embeddings, then LayerNorm (and ELECTRA's
    projection): (B, S) -> (B, S, H). The rotary families (``emb.position`` None): word
    (NomicBERT: + token type), then LayerNorm.

    ``emb``: a ``model.Embeddings``. ``types``: (B, S) integer segment ids in
    [0, type_vocab) (validated by the reader), or None for all 0 (one broadcast row, no
    (B, S, H) gather). ``offset``: the position of the first token (a sequence-parallel
    rank's slice starts there). ``key_mask``: (B, S_whole) real tokens of the whole
    sequences, for the RoBERTa family's positions (``emb.padding_idx``; None: every token
    is real).
    """
    seq = ids.shape[1]
    if emb.position is None:  # RoPE: no position table; ModernBERT: no token types either
        x = emb.word[ids]
        if emb.token_type is not None:  # NomicBERT: word + token type
            x = x + (emb.token_type[0] if types is None else emb.token_type[types])
        return layer_norm(x, emb.ln_g, emb.ln_b, eps)
    segment = emb.token_type[0] if types is None else emb.token_type[types]
    pad = getattr(emb, "padding_idx", None)
    if pad is None:
        position = emb.position[offset:offset + seq]
    elif key_mask is None:
        position = emb.position[pad + 1 + offset:pad + 1 + offset + seq]
    else:
        position = emb.position[position_rows(key_mask, pad, offset, seq)]
    x = layer_norm(emb.word[ids] + position + segment, emb.ln_g, emb.ln_b, eps)
    if getattr(emb, "project_w", None) is not None:
        xp = get_array_module(x)
        x = xp.matmul(x, emb.project_w) + emb.project_b
    return x


@dataclass
class EmbeddingCache:
    ids: Any  # (B, S)
    ln: LayerNormCache
    emb: Any  # the tables (their shapes and dtypes shape the gradients)
    offset: int = 0  # position of the first token


def embed_cached(ids: Any, emb: Any, eps: float, offset: int = 0
                 ) -> tuple[Any, EmbeddingCache]:
    """Word + position + token-type(0), then LayerNorm: (B, S) -> (B, S, H); the first
    token at position ``offset``."""
    if emb.padding_idx is not None or emb.project_w is not None:
        raise ValueError("training is built for BERT embeddings (positions 0..S-1, no"
                         " projection)")
    seq = ids.shape[1]
    x = emb.word[ids] + emb.position[offset:offset + seq] + emb.token_type[0]
    out, ln = layer_norm_cached(x, emb.ln_g, emb.ln_b, eps)
    return out, EmbeddingCache(ids, ln, emb, offset)


def scatter_add(target: Any, index: Any, values: Any) -> None:
    """target[index] += values with repeated indices accumulated (NumPy or CuPy)."""
    xp = get_array_module(target)
    if xp.__name__ == "cupy":
        import cupyx

        cupyx.scatter_add(target, index, values)
    else:
        xp.add.at(target, index, values)


def embed_backward(dout: Any, cache: EmbeddingCache) -> Any:
    """Gradients of every embedding table, as a ``model.Embeddings`` of the tables' shapes."""
    xp = get_array_module(dout)
    ids, emb = cache.ids, cache.emb
    dx, dg, db = layer_norm_backward(dout, cache.ln)
    hidden = dx.shape[-1]
    dword = xp.zeros_like(emb.word)
    scatter_add(dword, ids.reshape(-1), dx.reshape(-1, hidden))
    dpos = xp.zeros_like(emb.position)
    dpos[cache.offset: cache.offset + ids.shape[1]] = dx.sum(axis=0)
    dtype_ = xp.zeros_like(emb.token_type)
    dtype_[0] = dx.sum(axis=(0, 1))
    return type(emb)(dword, dpos, dtype_, dg, db)


# --- the loss ----------------------------------------------------------------------------


@dataclass
class CrossEntropyCache:
    logp: Any  # (N, vocab) log-probabilities
    targets: Any  # (N,)
    scale: float


def cross_entropy_cached(logits: Any, targets: Any, scale: float
                         ) -> tuple[float, CrossEntropyCache]:
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
    return loss, CrossEntropyCache(logp, targets, scale)


def cross_entropy_backward(cache: CrossEntropyCache) -> Any:
    xp = get_array_module(cache.logp)
    dlogits = xp.exp(cache.logp)
    dlogits[xp.arange(cache.targets.shape[0]), cache.targets] -= 1.0
    dlogits *= cache.scale
    return dlogits
