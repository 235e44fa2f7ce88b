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

from . import vocab as vocab_parallel
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
    """Everything one rank trains: replicated embeddings and head, sharded layers.

    A pipeline stage (``train.stage_params``) holds a part: ``layers`` are the model's
    layers ``first``, ``first + 1``, ...; the embeddings live on the first stage, the
    head on the last, which also keeps a copy of the tied word embedding (an
    ``Embeddings`` whose other tables are None); a part a stage lacks is None.
    """

    emb: Embeddings | None
    layers: list[LayerShard]
    head: MLMHead | None
    first: int = 0  # the model index of layers[0]
    vocab: vocab_parallel.VocabSplit | None = None  # word rows and decoder bias split
    # over the head group (``vocab``): emb.word is (count, H), head.bias (count,)

    @property
    def vocab_split(self) -> bool:
        return self.vocab is not None and self.vocab.split


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


def head_backward(dlogits: Any, c: HeadCache, reduce: Reduce | None = None
                  ) -> tuple[Any, MLMHead, Any]:
    """(dh, head gradients, d word embeddings from the tied decoder). ``reduce``: with
    the vocabulary split, the decoder's dL/d input is a partial sum over the group."""
    dt, dword_t, dbias = linear_backward(dlogits, c.decoder)
    if reduce is not None and dt.shape[0]:  # no masked token (a sequence slice may have
        # none; the same on every rank of the group, like the forward's statistics)
        dt = reduce(dt, site=vocab_parallel.BACKWARD_SITE, layer=0)
    dt, dln_g, dln_b = layer_norm_backward(dt, c.ln)
    dt = gelu_backward(dt, c.gelu)
    dh, ddense_w, ddense_b = linear_backward(dt, c.dense)
    return dh, MLMHead(ddense_w, ddense_b, dln_g, dln_b, dbias), dword_t.T


@dataclass
class StageCache:
    """What the backward of one (micro-)batch through a stage's part of the model needs."""

    embeddings: EmbeddingCache | vocab_parallel.EmbeddingCache | None  # first stage only
    layers: list[LayerCache]
    head: HeadCache | None  # last stage only
    loss: CrossEntropyCache | vocab_parallel.LossCache | None
    positions: Any  # (N,) flat indices of the masked tokens
    shape: tuple[int, int, int]  # (B, S, H)
    first: int = 0  # the model index of the stage's first layer
    vocab: vocab_parallel.VocabSplit | None = None  # the parameters' vocabulary split


ModelCache = StageCache  # the whole model is the one stage of P = 1


def stage_forward(params: Params, inputs: Any, key_mask: Any, positions: Any, targets: Any,
                  scale: float, reduce: Reduce, eps: float, impl: str = "plain",
                  block: int = 0, *, first_stage: bool = True,
                  last_stage: bool = True, sequence: Any = None) -> tuple[Any, StageCache]:
    """A stage's part of the MLM forward (GPipe/Megatron-LM pipeline stages).

    ``inputs``: ids (B, S) on the first stage, else the previous stage's hidden states
    (B, S, H); key_mask (B, S) bool; positions (N,) flat indices into B*S of the masked
    tokens, targets (N,) their original ids (used by the last stage). Returns the loss
    ``scale * sum of the N token losses`` on the last stage, else the hidden states
    (B, S, H) for the next stage, and the cache for ``stage_backward``.

    ``sequence``: a ``seqattn.SequenceAttention`` when this rank holds a slice of the
    tokens (sequence parallelism): ids, inputs and positions are then the slice's (S_i
    tokens), key_mask covers whole sequences (B, S).
    """
    c_emb: Any = None
    offset = 0 if sequence is None else sequence.split.start
    if first_stage and params.vocab_split:
        x, c_emb = vocab_parallel.embed_cached(inputs, params.emb, eps, params.vocab, reduce,
                                               offset)
    elif first_stage:
        x, c_emb = embed_cached(inputs, params.emb, eps, offset)
    else:
        x = inputs
    bias = mask_bias(key_mask, x.dtype)
    caches = []
    for j, p in enumerate(params.layers):
        x, c = layer_cached(x, p, bias, reduce, params.first + j, eps, impl, block, sequence)
        caches.append(c)
    if not last_stage:
        return x, StageCache(c_emb, caches, None, None, positions, x.shape, params.first,
                             params.vocab)
    hidden = x.shape[-1]
    h = x.reshape(-1, hidden)[positions]
    logits, c_head = head_cached(h, params.head, params.emb.word, eps)
    c_ce: Any
    if params.vocab_split:  # (N, count) columns: the statistics summed over the group
        loss, c_ce = vocab_parallel.cross_entropy_cached(logits, targets, scale,
                                                         params.vocab, reduce)
    else:
        loss, c_ce = cross_entropy_cached(logits, targets, scale)
    return loss, StageCache(c_emb, caches, c_head, c_ce, positions, x.shape, params.first,
                            params.vocab)


def stage_backward(c: StageCache, dout: Any, reduce: Reduce) -> tuple[Any, Params]:
    """(dL/d the stage's input hidden states (B, S, H), or None on the first stage; the
    gradients of the stage's parameters, in the shape of its ``Params``). ``dout``: dL/d
    the stage's output (B, S, H); None on the last stage (the loss is its output)."""
    dhead, dword_dec = None, None
    if c.loss is not None:
        split = isinstance(c.loss, vocab_parallel.LossCache)
        dlogits = (vocab_parallel.cross_entropy_backward(c.loss) if split
                   else cross_entropy_backward(c.loss))
        dh, dhead, dword_dec = head_backward(dlogits, c.head, reduce if split else None)
        xp = get_array_module(dh)
        batch, seq, hidden = c.shape
        dx = xp.zeros((batch * seq, hidden), dtype=dh.dtype)
        dx[c.positions] = dh  # positions are distinct
        dx = dx.reshape(c.shape)
    else:
        dx = dout
    dlayers: list[LayerShard] = []
    for lc in reversed(c.layers):
        dx, g = layer_backward(dx, lc, reduce)
        dlayers.append(g)
    demb = None
    if c.embeddings is not None:
        demb = (vocab_parallel.embed_backward(dx, c.embeddings)
                if isinstance(c.embeddings, vocab_parallel.EmbeddingCache)
                else embed_backward(dx, c.embeddings))
        if dword_dec is not None:
            demb.word += dword_dec
        dx = None
    elif dword_dec is not None:  # the last stage's copy of the tied word embedding
        demb = Embeddings(dword_dec, None, None, None, None)
    return dx, Params(demb, dlayers[::-1], dhead, c.first, c.vocab)


def model_forward(params: Params, ids: Any, key_mask: Any, positions: Any, targets: Any,
                  scale: float, reduce: Reduce, eps: float, impl: str = "plain",
                  block: int = 0, sequence: Any = None) -> tuple[float, ModelCache]:
    """MLM loss of a batch: ids (B, S), key_mask (B, S) bool, positions (N,) flat indices
    into B*S of the masked tokens, targets (N,) their original ids; ``impl``/``block``:
    the attention algorithm (``attention.ALGORITHMS``).

    Returns ``scale * sum of the N token losses`` and the cache for ``model_backward``.
    """
    return stage_forward(params, ids, key_mask, positions, targets, scale, reduce, eps,
                         impl, block, sequence=sequence)


def model_backward(c: ModelCache, reduce: Reduce) -> Params:
    """Gradients of every parameter this rank holds, in the shape of ``Params``."""
    return stage_backward(c, None, reduce)[1]


# --- parameters as a flat, named list -------------------------------------------------

LAYER_SHARDED = ("w_qkv", "b_qkv", "w_o", "w_1", "b_1", "w_2")  # split across head ranks


def named(params: Params) -> list[tuple[str, Any, bool]]:
    """(name, array, sharded) for every tensor, in a fixed order (optimizer, buckets);
    a stage's missing parts (None) are left out, its layers named by model index. With
    the vocabulary split, the word rows and the decoder bias are sharded too."""
    out = []
    rows = params.vocab_split
    if params.emb is not None:
        out += [(f"emb.{f.name}", getattr(params.emb, f.name), rows and f.name == "word")
                for f in fields(Embeddings) if getattr(params.emb, f.name) is not None]
    for i, p in enumerate(params.layers, start=params.first):
        for f in fields(LayerShard):
            if f.name != "head_dim":
                out.append((f"layer{i}.{f.name}", getattr(p, f.name), f.name in LAYER_SHARDED))
    if params.head is not None:
        out += [(f"head.{f.name}", getattr(params.head, f.name), rows and f.name == "bias")
                for f in fields(MLMHead)]
    return out
