"""The masked-language model one rank trains: embeddings, its layer shards, BERT's MLM head.

Built from the side-by-side operations of ``ops`` and ``model`` (caching forward and
backward). Megatron's conjugate pair decides where the head group talks:

- forward: after each row-parallel product (attention output, second MLP linear) the
  partial sums are reduced (sites ``attention`` and ``mlp``);
- backward: the gradient *entering* a column-parallel region (dL/dx of the input of the
  fused QKV product and of the first MLP linear) is a partial sum over this rank's heads
  and is reduced (sites ``attention.bwd`` and ``mlp.bwd``); the gradient leaving a
  row-parallel region (dL/d partial = dL/d sum) needs no communication.

Replicated parameters (biases added after a reduction, LayerNorms, embeddings, the MLM
head) get bit-identical gradients on every rank of a head group, since everything after
a reduction is computed from identical inputs. The MLM head is BERT's: transform (dense +
GELU + LayerNorm), then a decoder tied to the word embeddings plus a bias, applied only to
the masked positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .attention import mask_bias
from .backend import get_array_module
from .model import Embeddings, LayerCache, LayerShard, Reduce, layer_backward
from .model import layer_forward_cached as layer_cached
from .ops import (
    CrossEntropyCache,
    EmbeddingCache,
    GeluCache,
    LayerNormCache,
    LinearCache,
    cross_entropy_backward,
    cross_entropy_cached,
    embed_backward,
    embed_cached,
    gelu_backward,
    gelu_cached,
    layer_norm_backward,
    layer_norm_cached,
    linear_backward,
    linear_cached,
)


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


@dataclass
class HeadCache:
    dense: LinearCache
    gelu: GeluCache
    ln: LayerNormCache
    decoder: LinearCache


def head_cached(h: Any, head: MLMHead, word: Any, eps: float) -> tuple[Any, HeadCache]:
    """(N, H) hidden rows at masked positions -> (N, vocab) logits."""
    t, c_d = linear_cached(h, head.dense_w, head.dense_b)
    t, c_g = gelu_cached(t)
    t, c_ln = layer_norm_cached(t, head.ln_g, head.ln_b, eps)
    logits, c_dec = linear_cached(t, word.T, head.bias)
    return logits, HeadCache(c_d, c_g, c_ln, c_dec)


def head_backward(dlogits: Any, c: HeadCache) -> tuple[Any, MLMHead, Any]:
    """(dh, head gradients, d word embeddings from the tied decoder)."""
    dt, dword_t, dbias = linear_backward(dlogits, c.decoder)
    dt, dln_g, dln_b = layer_norm_backward(dt, c.ln)
    dt = gelu_backward(dt, c.gelu)
    dh, ddense_w, ddense_b = linear_backward(dt, c.dense)
    return dh, MLMHead(ddense_w, ddense_b, dln_g, dln_b, dbias), dword_t.T


@dataclass
class ModelCache:
    embeddings: EmbeddingCache
    layers: list[LayerCache]
    head: HeadCache
    loss: CrossEntropyCache
    positions: Any  # (N,) flat indices of the masked tokens
    shape: tuple[int, int, int]  # (B, S, H)


def model_forward(params: Params, ids: Any, key_mask: Any, positions: Any, targets: Any,
                  scale: float, reduce: Reduce, eps: float, impl: str = "plain",
                  block: int = 0) -> tuple[float, ModelCache]:
    """MLM loss of a batch: ids (B, S), key_mask (B, S) bool, positions (N,) flat indices
    into B*S of the masked tokens, targets (N,) their original ids; ``impl``/``block``:
    the attention algorithm (``attention.ALGORITHMS``).

    Returns ``scale * sum of the N token losses`` and the cache for ``model_backward``.
    """
    x, c_emb = embed_cached(ids, params.emb, eps)
    bias = mask_bias(key_mask, x.dtype)
    caches = []
    for i, p in enumerate(params.layers):
        x, c = layer_cached(x, p, bias, reduce, i, eps, impl, block)
        caches.append(c)
    hidden = x.shape[-1]
    h = x.reshape(-1, hidden)[positions]
    logits, c_head = head_cached(h, params.head, params.emb.word, eps)
    loss, c_ce = cross_entropy_cached(logits, targets, scale)
    return loss, ModelCache(c_emb, caches, c_head, c_ce, positions, x.shape)


def model_backward(c: ModelCache, reduce: Reduce) -> Params:
    """Gradients of every parameter this rank holds, in the shape of ``Params``."""
    xp = get_array_module(c.loss.logp)
    dlogits = cross_entropy_backward(c.loss)
    dh, dhead, dword_dec = head_backward(dlogits, c.head)
    batch, seq, hidden = c.shape
    dx = xp.zeros((batch * seq, hidden), dtype=dh.dtype)
    dx[c.positions] = dh  # positions are distinct
    dx = dx.reshape(c.shape)
    dlayers: list[LayerShard] = []
    for lc in reversed(c.layers):
        dx, g = layer_backward(dx, lc, reduce)
        dlayers.append(g)
    demb = embed_backward(dx, c.embeddings)
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
