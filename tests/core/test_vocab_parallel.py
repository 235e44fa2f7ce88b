"""Vocabulary-parallel embedding and cross-entropy (``core.vocab``) in one process.

k = 2 and 3 simulated head ranks (threads; 23 words: uneven splits 12/11 and 8/8/7) give
the one-process loss and every gradient within 1e-12 (float64); the loss alone stays
finite and exact when the ranks' logits lie far apart (no overflow in exp).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import ThreadGroup, run_ranks
from test_grad import EPS, rel_err, tiny_batch, tiny_model

from mpiattn.core import mlm, model, ops, vocab
from mpiattn.core.model import LocalReduce
from mpiattn.core.shard import head_shard


def split_params(params, split):
    """This rank's part of whole-vocabulary parameters: its word rows and bias entries."""
    emb = dataclasses.replace(params.emb, word=params.emb.word[split.rows].copy())
    head = dataclasses.replace(params.head, bias=params.head.bias[split.rows].copy())
    return mlm.Params(emb, params.layers, head, params.first, split)


def run(k):
    ids, keep, positions, targets = tiny_batch()
    group = ThreadGroup(k)
    out: list = [None] * k

    def work(i):
        shard = head_shard(5, 2, 15, k, i)
        split = vocab.VocabSplit(23, k, i)
        params = split_params(tiny_model(shard), split)
        member = group.member(i)
        loss, cache = mlm.model_forward(params, ids, keep, positions, targets, 1 / 7,
                                         member, EPS)
        out[i] = (loss, mlm.model_backward(cache, member), split)

    run_ranks(work, [(i,) for i in range(k)], [group])
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_split_vocabulary_equals_one_process(k):
    ids, keep, positions, targets = tiny_batch()
    one = tiny_model(head_shard(5, 2, 15, 1, 0))
    want, cache = mlm.model_forward(one, ids, keep, positions, targets, 1 / 7,
                                    LocalReduce(np), EPS)
    g1 = mlm.model_backward(cache, LocalReduce(np))
    ranks = run(k)
    assert [s.count for _, _, s in ranks] == ([12, 11] if k == 2 else [8, 8, 7])
    for loss, _, _ in ranks:  # every rank has the whole loss, bit for bit the same
        assert loss == ranks[0][0]
    assert rel_err(ranks[0][0], want) <= 1e-12
    grads = [g for _, g, _ in ranks]
    word = np.concatenate([g.emb.word for g in grads])
    bias = np.concatenate([g.head.bias for g in grads])
    assert word.shape == g1.emb.word.shape and rel_err(word, g1.emb.word) <= 1e-12
    assert rel_err(bias, g1.head.bias) <= 1e-12
    for name in ("position", "token_type", "ln_g", "ln_b"):
        assert rel_err(getattr(grads[0].emb, name), getattr(g1.emb, name)) <= 1e-12, name
    for name in ("dense_w", "dense_b", "ln_g", "ln_b"):
        assert rel_err(getattr(grads[-1].head, name), getattr(g1.head, name)) <= 1e-12, name
    for i in range(2):
        joined = model.join_shards([g.layers[i] for g in grads])
        assert rel_err(joined.w_qkv, g1.layers[i].w_qkv) <= 1e-12
        assert rel_err(joined.ln2_g, g1.layers[i].ln2_g) <= 1e-12
    # the word rows and the decoder bias are counted as sharded (global norm)
    sharded = {n for n, _, s in mlm.named(grads[0]) if s}
    assert {"emb.word", "head.bias"} <= sharded


@pytest.mark.parametrize("dtype, gap", [("float64", 800.0), ("float32", 120.0)])
def test_loss_with_far_apart_ranks(dtype, gap):
    """Rank 1's logits lie ``gap`` above rank 0's (exp(gap) overflows the dtype): the
    merged loss and gradients still equal the whole-vocabulary ones."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 9)).astype(dtype)
    logits[:, 4:] += np.asarray(gap, dtype)
    targets = np.array([0, 3, 4, 8, 6])
    want, c1 = ops.cross_entropy_cached(logits.copy(), targets, 0.25)
    d1 = ops.cross_entropy_backward(c1)
    group = ThreadGroup(2)
    out: list = [None] * 2

    def work(i):
        split = vocab.VocabSplit(9, 2, i)
        loss, c = vocab.cross_entropy_cached(logits[:, split.rows].copy(), targets, 0.25,
                                             split, group.member(i))
        out[i] = (loss, vocab.cross_entropy_backward(c))

    run_ranks(work, [(0,), (1,)], [group])
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert np.isfinite(out[0][0]) and out[0][0] == out[1][0]
    assert rel_err(out[0][0], want) <= tol
    assert rel_err(np.concatenate([out[0][1], out[1][1]], axis=1), d1) <= tol
