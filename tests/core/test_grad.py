"""Every hand-written backward against central finite differences, in float64.

Error measure: max |analytic - numeric| / max |numeric| over the entries checked (all
entries of the small ops, a seeded sample of each tensor for the whole model); tolerance
1e-6. Sharded gradients (2 and 3 simulated head ranks, 5 heads: uneven splits) must equal
the one-rank gradients within 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ThreadGroup, run_ranks

from mpiattn.config import ModelConfig
from mpiattn.core import attention, mlm, model, ops
from mpiattn.core.attention import KeyMask
from mpiattn.core.model import Embeddings, LocalReduce
from mpiattn.core.model import layer_forward as model_layer_forward
from mpiattn.core.shard import head_shard
from mpiattn.io.weights import SeededWeights

TOL = 1e-6
H = 1e-6  # finite-difference step


def rel_err(got, want):
    got, want = np.asarray(got, float), np.asarray(want, float)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    return float(np.abs(got - want).max(initial=0.0)) / scale


def numeric(f, x, index=None):
    """Central differences of the scalar f() w.r.t. x (in place), at every or some entries."""
    flat = x.reshape(-1)
    index = range(flat.size) if index is None else index
    out = []
    for i in index:
        old = flat[i]
        flat[i] = old + H
        up = f()
        flat[i] = old - H
        down = f()
        flat[i] = old
        out.append((up - down) / (2 * H))
    return np.array(out)


def check(name, analytic, f, x):
    err = rel_err(analytic, numeric(f, x).reshape(np.shape(analytic)))
    print(f"{name}: rel error {err:.2e}")
    assert err <= TOL, name


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear(rng):
    x, w, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 5)), rng.normal(size=5)
    r = rng.normal(size=(4, 5))

    def f():
        return float((ops.linear_cached(x, w, b)[0] * r).sum())

    dx, dw, db = ops.linear_backward(r, ops.linear_cached(x, w, b)[1])
    for name, a, t in (("dx", dx, x), ("dw", dw, w), ("db", db, b)):
        check(f"linear {name}", a, f, t)


def test_softmax_and_mask(rng):
    s = rng.normal(size=(2, 3, 4, 5))
    keep = np.ones((2, 5), bool)
    keep[1, 3:] = False
    bias = attention.mask_bias(keep, s.dtype)
    r = rng.normal(size=s.shape)

    def f():
        return float((ops.softmax_cached(ops.mask_cached(s, bias)[0])[0] * r).sum())

    masked, mcache = ops.mask_cached(s, bias)
    p, pcache = ops.softmax_cached(masked)
    assert np.all(p[1, ..., 3:] == 0)
    ds = ops.mask_backward(ops.softmax_backward(r, pcache), mcache)
    check("softmax+mask ds", ds, f, s)


def test_layernorm(rng):
    x, g, b = rng.normal(size=(3, 4, 6)), rng.normal(size=6), rng.normal(size=6)
    r = rng.normal(size=x.shape)

    def f():
        return float((ops.layer_norm_cached(x, g, b, 1e-5)[0] * r).sum())

    dx, dg, db = ops.layer_norm_backward(r, ops.layer_norm_cached(x, g, b, 1e-5)[1])
    for name, a, t in (("dx", dx, x), ("dg", dg, g), ("db", db, b)):
        check(f"layernorm {name}", a, f, t)


def test_gelu(rng):
    x = rng.normal(size=(5, 7)) * 2
    r = rng.normal(size=x.shape)

    def f():
        return float((ops.gelu_cached(x)[0] * r).sum())

    check("gelu dx", ops.gelu_backward(r, ops.gelu_cached(x)[1]), f, x)


def test_attention(rng):
    batch, seq, heads, d = 2, 5, 3, 2
    qkv = rng.normal(size=(batch * seq, 3 * heads * d))
    keep = np.ones((batch, seq), bool)
    keep[0, 3:] = False  # padding in sequence 0
    bias = attention.mask_bias(keep, qkv.dtype)
    r = rng.normal(size=(batch * seq, heads * d))

    def f():
        return float((attention.attention_cached(qkv, bias, batch, seq, heads, d)[0] * r).sum())

    _, cache = attention.attention_cached(qkv, bias, batch, seq, heads, d)
    check("attention dqkv", attention.attention_backward(r, cache), f, qkv)


@pytest.mark.parametrize("block", [2, 3, 7])
def test_blocked_attention(rng, block):
    """Online-softmax forward equals plain; its backward passes finite differences."""
    batch, seq, heads, d = 2, 7, 2, 3
    qkv = rng.normal(size=(batch * seq, 3 * heads * d))
    keep = np.ones((batch, seq), bool)
    keep[0, 4:] = False
    keep[1, 1:3] = False  # a hole, not only a padded tail
    bias = attention.mask_bias(keep, qkv.dtype)
    r = rng.normal(size=(batch * seq, heads * d))
    plain = attention.attention_cached(qkv, bias, batch, seq, heads, d)[0]
    out, cache = attention.attention_cached(qkv, bias, batch, seq, heads, d, "blocked", block)
    assert rel_err(out, plain) <= 1e-13

    def f():
        o = attention.attention_cached(qkv, bias, batch, seq, heads, d, "blocked", block)[0]
        return float((o * r).sum())

    check(f"blocked attention dqkv (block {block})", attention.attention_backward(r, cache), f, qkv)
    _, plain_cache = attention.attention_cached(qkv, bias, batch, seq, heads, d)
    assert rel_err(attention.attention_backward(r, cache),
                   attention.attention_backward(r, plain_cache)) <= 1e-12


def test_embedding(rng):
    vocab, pos, hidden = 7, 6, 4
    emb = Embeddings(rng.normal(size=(vocab, hidden)), rng.normal(size=(pos, hidden)),
                     rng.normal(size=(2, hidden)), rng.normal(size=hidden),
                     rng.normal(size=hidden))
    ids = np.array([[1, 3, 3, 0], [6, 1, 2, 3]])  # repeated ids accumulate
    r = rng.normal(size=(2, 4, hidden))

    def f():
        return float((ops.embed_cached(ids, emb, 1e-5)[0] * r).sum())

    g = ops.embed_backward(r, ops.embed_cached(ids, emb, 1e-5)[1])
    for name in ("word", "position", "token_type", "ln_g", "ln_b"):
        check(f"embedding {name}", getattr(g, name), f, getattr(emb, name))


def test_cross_entropy(rng):
    logits, targets = rng.normal(size=(6, 9)), rng.integers(0, 9, size=6)

    def f():
        return ops.cross_entropy_cached(logits, targets, 0.25)[0]

    cache = ops.cross_entropy_cached(logits, targets, 0.25)[1]
    check("cross-entropy dlogits", ops.cross_entropy_backward(cache), f, logits)


# --- the whole model, sharded ---------------------------------------------------------

MODEL = ModelConfig(layers=2, heads=5, hidden=10, ffn=15, vocab=23, max_positions=8)
EPS = 1e-5


def tiny_model(shard):
    source = SeededWeights(3, MODEL, "float64")
    rng = np.random.default_rng(9)
    head = mlm.MLMHead(rng.normal(size=(10, 10)) / 3, rng.normal(size=10) * 0.1,
                        1 + rng.normal(size=10) * 0.1, rng.normal(size=10) * 0.1,
                        rng.normal(size=23) * 0.1)
    return mlm.Params(source.embeddings(), [source.layer(i, shard) for i in range(2)], head)


def tiny_batch():
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 23, size=(3, 7))
    keep = np.ones((3, 7), bool)
    keep[1, 5:] = False
    keep[2, 2:] = False
    ids[~keep] = 0
    positions = np.array([0, 3, 6, 8, 11, 14, 15])  # flat indices of real tokens
    targets = rng.integers(0, 23, size=positions.size)
    return ids, keep, positions, targets


def run_sharded(k):
    """Loss and per-rank gradients with k simulated head ranks (threads)."""
    ids, keep, positions, targets = tiny_batch()
    group = ThreadGroup(k)
    out: list = [None] * k

    def work(i):
        shard = head_shard(5, 2, 15, k, i)
        params = tiny_model(shard)
        member = group.member(i) if k > 1 else LocalReduce(np)
        loss, cache = mlm.model_forward(params, ids, keep, positions, targets, 1 / 7,
                                         member, EPS)
        out[i] = (loss, mlm.model_backward(cache, member), shard)

    run_ranks(work, [(i,) for i in range(k)], [group])
    return out


def test_layer_matches_model_forward():
    shard = head_shard(5, 2, 15, 1, 0)
    params = tiny_model(shard)
    _, keep, _, _ = tiny_batch()
    x = np.random.default_rng(1).normal(size=(3, 7, 10))
    want = model_layer_forward(x, params.layers[0], KeyMask.from_mask(keep), LocalReduce(np),
                               0, EPS)[1]
    got = model.layer_forward_cached(x, params.layers[0], attention.mask_bias(keep, x.dtype),
                             LocalReduce(np), 0, EPS)[0]
    assert rel_err(got, want) <= 1e-13


def test_model_gradients_against_finite_differences():
    ids, keep, positions, targets = tiny_batch()
    params = tiny_model(head_shard(5, 2, 15, 1, 0))
    reduce = LocalReduce(np)

    def f():
        return mlm.model_forward(params, ids, keep, positions, targets, 1 / 7, reduce, EPS)[0]

    _, cache = mlm.model_forward(params, ids, keep, positions, targets, 1 / 7, reduce, EPS)
    grads = mlm.model_backward(cache, reduce)
    rng = np.random.default_rng(5)
    worst = 0.0
    for (name, p, _), (_, g, _) in zip(mlm.named(params), mlm.named(grads), strict=True):
        assert g.shape == p.shape, name
        sample = rng.choice(p.size, size=min(p.size, 12), replace=False)
        num = numeric(f, p, sample)
        err = rel_err(g.reshape(-1)[sample], num) if np.abs(num).max() > 0 else float(
            np.abs(g.reshape(-1)[sample]).max())
        worst = max(worst, err)
        assert err <= TOL, f"{name}: {err:.2e}"
    print(f"whole model: worst rel error {worst:.2e}")


@pytest.mark.parametrize("k", [2, 3])
def test_sharded_gradients_equal_one_rank(k):
    (loss1, g1, _), = run_sharded(1)
    ranks = run_sharded(k)
    for loss, _, _ in ranks:
        assert abs(loss - loss1) <= 1e-12 * abs(loss1)
    worst = 0.0
    for i in range(2):
        joined = model.join_shards([g.layers[i] for _, g, _ in ranks])
        for f in ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_g", "w_1", "b_1", "w_2", "b_2", "ln2_b"):
            err = rel_err(getattr(joined, f), getattr(g1.layers[i], f))
            worst = max(worst, err)
            assert err <= 1e-12, (i, f, err)
    for _, g, _ in ranks:  # replicated parameters: identical on every head rank
        assert np.array_equal(g.emb.word, ranks[0][1].emb.word)
        assert rel_err(g.emb.word, g1.emb.word) <= 1e-12
        assert rel_err(g.head.dense_w, g1.head.dense_w) <= 1e-12
    print(f"k={k}: worst rel error vs one rank {worst:.2e}")


def test_split_join_roundtrip():
    full = tiny_model(head_shard(5, 2, 15, 1, 0)).layers[0]
    for k in (2, 3):
        shards = [head_shard(5, 2, 15, k, i) for i in range(k)]
        pieces = [model.split_shard(full, s.cols, s.ffn_cols) for s in shards]
        seeded = [SeededWeights(3, MODEL, "float64").layer(0, s) for s in shards]
        for a, b in zip(pieces, seeded, strict=True):
            assert np.array_equal(a.w_qkv, b.w_qkv) and np.array_equal(a.w_2, b.w_2)
        back = model.join_shards(pieces)
        for f in ("w_qkv", "b_qkv", "w_o", "w_1", "b_1", "w_2"):
            assert np.array_equal(getattr(back, f), getattr(full, f))
