"""Vocabulary-parallel embedding and cross-entropy (``core.vocab``) in one process.

k = 2 and 3 simulated head ranks (threads; 23 words: uneven splits 12/11 and 8/8/7) give
the one-process loss and every gradient within 1e-12 (float64); the loss alone stays
finite and exact when the ranks' logits lie far apart (no overflow in exp). The same with
2 pipeline stages x 2 head ranks (the tied gradient summed per row block) and with 2
sequence slices x 2 head ranks (Ulysses and the ring; a slice without masked tokens).
"""

from __future__ import annotations

import dataclasses
import functools

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


def grads_one_process(ids, keep, positions, targets):
    one = tiny_model(head_shard(5, 2, 15, 1, 0))
    want, cache = mlm.model_forward(one, ids, keep, positions, targets, 1 / 7,
                                    LocalReduce(np), EPS)
    return want, mlm.model_backward(cache, LocalReduce(np))


def threads(k, work):
    """``work(i, member)`` on k threads of one head group; their results in rank order."""
    group, out = ThreadGroup(k), [None] * k

    def run_one(i):
        out[i] = work(i, group.member(i))

    run_ranks(run_one, [(i,) for i in range(k)], [group])
    return out


def test_split_vocabulary_over_pipeline_stages_equals_one_process():
    """2 stages x 2 head ranks (Megatron-LM's layout): stage 0 holds each head rank's word
    rows, stage 1 the same rows of the tied decoder; the tied gradient summed per row
    block (the two ends of one head rank) equals the one-process gradient (1e-12)."""
    from mpiattn.commands.train import split_vocab, stage_params

    ids, keep, positions, targets = tiny_batch()
    want, g1 = grads_one_process(ids, keep, positions, targets)
    k = 2

    def part(i, stage):
        whole = tiny_model(head_shard(5, 2, 15, k, i))
        return split_vocab(stage_params(whole, stage, 2, 2), vocab.VocabSplit(23, k, i))

    ends = [part(0, 0), part(0, 1)]
    assert ends[0].emb.word.shape == ends[1].emb.word.shape == (12, 10)  # rows 0..11 both
    assert ends[0].head is None and ends[1].emb.position is None
    assert ends[1].head.bias.shape == (12,) and (ends[0].first, ends[1].first) == (0, 1)

    def forward0(i, member):
        return mlm.stage_forward(part(i, 0), ids, keep, positions, targets, 1 / 7, member,
                                 EPS, last_stage=False)

    f0 = threads(k, forward0)

    def last(i, member):
        loss, cache = mlm.stage_forward(part(i, 1), f0[i][0], keep, positions, targets,
                                        1 / 7, member, EPS, first_stage=False)
        return loss, *mlm.stage_backward(cache, None, member)

    f1 = threads(k, last)
    b0 = threads(k, lambda i, member: mlm.stage_backward(f0[i][1], f1[i][1], member)[1])
    assert f1[0][0] == f1[1][0] and rel_err(f1[0][0], want) <= 1e-12
    tied = [b0[i].emb.word + f1[i][2].emb.word for i in range(k)]  # per row block
    assert rel_err(np.concatenate(tied), g1.emb.word) <= 1e-12
    assert rel_err(np.concatenate([f1[i][2].head.bias for i in range(k)]),
                   g1.head.bias) <= 1e-12
    assert rel_err(b0[0].emb.position, g1.emb.position) <= 1e-12
    assert rel_err(f1[1][2].head.dense_w, g1.head.dense_w) <= 1e-12
    for stage, grads in ((0, b0), (1, [f[2] for f in f1])):
        joined = model.join_shards([g.layers[0] for g in grads])
        assert rel_err(joined.w_qkv, g1.layers[stage].w_qkv) <= 1e-12, stage
        assert rel_err(joined.w_2, g1.layers[stage].w_2) <= 1e-12, stage


@pytest.mark.parametrize("algorithm, masked", [("ulysses", "all"), ("ring", "first slice")])
def test_split_vocabulary_over_sequence_slices_equals_one_process(algorithm, masked):
    """2 sequence slices x 2 head ranks: each slice's loss over the vocabulary split (its
    statistics summed over the head group only), summed over the slices, and the summed
    gradients equal one process (1e-12); also when a slice has no masked token."""
    from helpers import ThreadAlltoall, ThreadRing

    from mpiattn.core.seqattn import SequenceAttention, SequenceSplit

    ids, keep, positions, targets = tiny_batch()
    if masked == "first slice":  # columns 0..3 only: the second slice masks nothing
        keep_cols = positions % 7 < 4
        positions, targets = positions[keep_cols], targets[keep_cols]
    want, g1 = grads_one_process(ids, keep, positions, targets)
    tensor, parts = 2, 2
    heads = [ThreadGroup(tensor) for _ in range(parts)]
    fakes = [(ThreadAlltoall if algorithm == "ulysses" else ThreadRing)(parts)
             for _ in range(tensor)]
    out = {}

    def work(t, s):
        split = SequenceSplit(7, parts, s)
        row, col = np.divmod(positions, 7)
        mine = (col >= split.start) & (col < split.start + split.count)
        local = row[mine] * split.count + col[mine] - split.start
        params = split_params(tiny_model(head_shard(5, 2, 15, tensor, t)),
                              vocab.VocabSplit(23, tensor, t))
        seq = SequenceAttention(algorithm, split, fakes[t].member(s), block=2)
        member = heads[s].member(t)
        loss, cache = mlm.model_forward(params, np.ascontiguousarray(ids[:, split.local]),
                                        keep, local, targets[mine], 1 / 7, member, EPS,
                                        sequence=seq)
        out[t, s] = (loss, mlm.model_backward(cache, member), int(mine.sum()))

    run_ranks(work, [(t, s) for t in range(tensor) for s in range(parts)], [*heads, *fakes])
    if masked == "first slice":
        assert out[0, 1][2] == 0 and out[0, 1][0] == 0.0
    for s in range(parts):  # the head ranks of a slice agree bit for bit
        assert out[0, s][0] == out[1, s][0]
    assert rel_err(sum(out[0, s][0] for s in range(parts)), want) <= 1e-12

    def add(a, b):  # arrays, or layer shards field by field
        if isinstance(a, np.ndarray):
            return a + b
        return dataclasses.replace(a, **{f.name: getattr(a, f.name) + getattr(b, f.name)
                                         for f in dataclasses.fields(a)
                                         if f.name != "head_dim"})

    def summed(get):  # a gradient summed over the sequence group (the data x sequence sum)
        return [functools.reduce(add, [get(out[t, s][1]) for s in range(parts)])
                for t in range(tensor)]

    word = np.concatenate(summed(lambda g: g.emb.word))
    assert word.shape == g1.emb.word.shape and rel_err(word, g1.emb.word) <= 1e-12
    assert rel_err(np.concatenate(summed(lambda g: g.head.bias)), g1.head.bias) <= 1e-12
    assert rel_err(summed(lambda g: g.emb.position)[0], g1.emb.position) <= 1e-12
    assert rel_err(summed(lambda g: g.head.dense_w)[1], g1.head.dense_w) <= 1e-12
    for i in range(2):
        joined = model.join_shards(summed(lambda g, i=i: g.layers[i]))
        assert rel_err(joined.w_qkv, g1.layers[i].w_qkv) <= 1e-12
