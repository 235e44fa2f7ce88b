"""Sequence-parallel attention in one process: Q threads stand in for the ranks of a
sequence group (Ulysses' Alltoall, the ring's shifts) and the result of every rank's token
slice must equal attention over whole sequences, forward and backward, with uneven token
and head splits and with padding. The MPI transfers themselves are tested in
tests/mpi/test_ring_mpi.py and test_transfers_mpi.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TOL, ThreadAlltoall, ThreadRing, run_ranks

from mpiattn.core.attention import KeyMask, Options, attention_backward, attention_cached, mask_bias
from mpiattn.core.seqattn import (
    SequenceAttention,
    SequenceSplit,
    merge,
    partial_attention,
    resolve,
)


def inputs(batch: int, seq: int, heads: int, head_dim: int, dtype: str, padded: bool,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """qkv (B*S, 3*h*d) and a (B, S) key mask: prefix padding, and one sequence with a
    hole in the middle (not a prefix) when ``padded``."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((batch * seq, 3 * heads * head_dim)).astype(dtype)
    mask = np.ones((batch, seq), dtype=bool)
    if padded:
        mask[0, seq // 3:] = False  # prefix: a third real
        if batch > 1:
            mask[1, 1: seq // 2] = False  # not a prefix
    return qkv, mask


def local_rows(x: np.ndarray, batch: int, seq: int, split: SequenceSplit) -> np.ndarray:
    return x.reshape(batch, seq, -1)[:, split.local].reshape(batch * split.count, -1)


def group(algorithm: str, parts: int) -> tuple[list, list]:
    fake = ThreadAlltoall(parts) if algorithm == "ulysses" else ThreadRing(parts)
    return [fake.member(i) for i in range(parts)], [fake]


CASES = [  # (algorithm, ranks, batch, seq, heads)
    ("ulysses", 2, 2, 10, 4), ("ulysses", 3, 2, 11, 5), ("ulysses", 4, 1, 9, 4),
    ("ring", 2, 2, 10, 3), ("ring", 3, 2, 11, 2), ("ring", 4, 2, 13, 1),
]


@pytest.mark.parametrize(("algorithm", "parts", "batch", "seq", "heads"), CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_of_every_slice_equals_whole_sequence_attention(algorithm, parts, batch, seq,
                                                                 heads, dtype, padded):
    head_dim = 8
    qkv, key_mask = inputs(batch, seq, heads, head_dim, dtype, padded)
    want = np.empty((batch * seq, heads * head_dim), dtype=dtype)
    from mpiattn.core.attention import heads_attention

    heads_attention(qkv, want, batch, seq, heads, head_dim, KeyMask.from_mask(key_mask),
                    Options("plain"))
    transfers, fakes = group(algorithm, parts)
    got = [None] * parts

    def rank(i: int) -> None:
        split = SequenceSplit(seq, parts, i)
        attn = SequenceAttention(algorithm, split, transfers[i], block=4)
        out = np.empty((batch * split.count, heads * head_dim), dtype=dtype)
        attn.forward(local_rows(qkv, batch, seq, split), out, batch, heads, head_dim,
                     KeyMask.from_mask(key_mask), Options("blocked", 4), layer=0)
        got[i] = out.reshape(batch, split.count, -1)

    run_ranks(rank, [(i,) for i in range(parts)], fakes)
    whole = np.concatenate(got, axis=1).reshape(want.shape)
    scale = np.abs(want).max()
    assert np.abs(whole - want).max() / scale <= TOL[dtype]
    if algorithm == "ulysses":  # two Alltoalls per layer, nothing else
        assert fakes[0].sites == ["alltoall.qkv", "alltoall.out"]


@pytest.mark.parametrize(("algorithm", "parts", "batch", "seq", "heads"), CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_backward_of_every_slice_equals_whole_sequence_gradients(algorithm, parts, batch, seq,
                                                                  heads, padded):
    head_dim, dtype = 4, "float64"
    qkv, key_mask = inputs(batch, seq, heads, head_dim, dtype, padded, seed=1)
    bias = mask_bias(key_mask, np.dtype(dtype))
    dout = np.random.default_rng(2).standard_normal((batch * seq, heads * head_dim))
    want_o, cache = attention_cached(qkv, bias, batch, seq, heads, head_dim, "plain")
    want = attention_backward(dout, cache)
    transfers, fakes = group(algorithm, parts)
    got_o, got = [None] * parts, [None] * parts

    def rank(i: int) -> None:
        split = SequenceSplit(seq, parts, i)
        attn = SequenceAttention(algorithm, split, transfers[i], block=3)
        o, c = attn.forward_cached(local_rows(qkv, batch, seq, split), bias, batch, heads,
                                   head_dim, "blocked", 3, layer=2)
        got_o[i] = o.reshape(batch, split.count, -1)
        dq = attn.backward(local_rows(dout, batch, seq, split), c, heads, head_dim, layer=2)
        got[i] = dq.reshape(batch, split.count, -1)

    run_ranks(rank, [(i,) for i in range(parts)], fakes)
    o = np.concatenate(got_o, axis=1).reshape(want_o.shape)
    dqkv = np.concatenate(got, axis=1).reshape(want.shape)
    assert np.abs(o - want_o).max() <= TOL[dtype] * np.abs(want_o).max()
    assert np.abs(dqkv - want).max() <= TOL[dtype] * np.abs(want).max()


def test_gradients_match_finite_differences_through_the_ring():
    """d/dqkv of sum(o * w) through a 3-rank ring, against central differences."""
    batch, seq, heads, head_dim, parts = 1, 7, 2, 3, 3
    qkv, key_mask = inputs(batch, seq, heads, head_dim, "float64", True, seed=3)
    bias = mask_bias(key_mask, np.dtype("float64"))
    weight = np.random.default_rng(4).standard_normal((batch * seq, heads * head_dim))

    def run(x: np.ndarray, grad: bool) -> tuple[float, np.ndarray | None]:
        transfers, fakes = group("ring", parts)
        outs, grads = [None] * parts, [None] * parts

        def rank(i: int) -> None:
            split = SequenceSplit(seq, parts, i)
            attn = SequenceAttention("ring", split, transfers[i], block=2)
            o, c = attn.forward_cached(local_rows(x, batch, seq, split), bias, batch, heads,
                                       head_dim, "blocked", 2, layer=0)
            outs[i] = o.reshape(batch, split.count, -1)
            if grad:
                w = local_rows(weight, batch, seq, split)
                grads[i] = attn.backward(w, c, heads, head_dim, 0).reshape(batch, split.count, -1)

        run_ranks(rank, [(i,) for i in range(parts)], fakes)
        o = np.concatenate(outs, axis=1).reshape(weight.shape)
        g = np.concatenate(grads, axis=1).reshape(x.shape) if grad else None
        return float((o * weight).sum()), g

    _, analytic = run(qkv, True)
    rng = np.random.default_rng(5)
    for flat in rng.choice(qkv.size, 12, replace=False):
        step = np.zeros(qkv.size)
        step[flat] = 1e-6
        up, _ = run(qkv + step.reshape(qkv.shape), False)
        down, _ = run(qkv - step.reshape(qkv.shape), False)
        assert abs((up - down) / 2e-6 - analytic.reshape(-1)[flat]) < 1e-6


def test_merge_of_two_key_halves_is_attention_over_all_keys():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    bias = np.zeros((2, 1, 1, 8))
    bias[0, ..., 3:] = -np.inf  # sequence 0: the second half has no real key
    k8, v8 = np.concatenate([k, k[:, :, :3]], axis=2), np.concatenate([v, v[:, :, :3]], axis=2)
    scale = 1 / math.sqrt(4)
    want, want_lse = partial_attention(q * scale, k8, v8, bias, 8)
    o, lse = partial_attention(q * scale, k8[:, :, :4], v8[:, :, :4], bias[..., :4], 2)
    o2, lse2 = partial_attention(q * scale, k8[:, :, 4:], v8[:, :, 4:], bias[..., 4:], 3)
    assert np.isneginf(lse2[0]).all() and (o2[0] == 0).all()  # no keys: nothing to add
    o, lse = merge(o, lse, o2, lse2)
    np.testing.assert_allclose(o, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_split_is_contiguous_and_uneven_and_ulysses_needs_a_head_per_rank():
    spans = SequenceSplit(11, 3, 0).spans
    assert spans == [(0, 4), (4, 4), (8, 3)]
    assert SequenceSplit(11, 3, 2).local == slice(8, 11)
    assert resolve("auto", 12, 5) == "ulysses" and resolve("auto", 3, 4) == "ring"
    with pytest.raises(ValueError, match="use attention.sequence = \"ring\""):
        resolve("ulysses", 3, 4)


def test_nested_phases_count_every_second_once():
    """The sequence group's transfers are timed inside ``attention``: the timer takes the
    inner phase's seconds out of the outer one."""
    from mpiattn.core.model import PhaseTimer

    ticks = iter([0.0, 1.0, 4.0, 10.0])  # attention starts, sequence 1..4, attention ends
    timer = PhaseTimer(lambda: next(ticks), ("attention", "sequence"))
    with timer("attention"), timer("sequence"):
        pass
    assert timer.seconds == {(0, "attention"): 7.0, (0, "sequence"): 3.0}


def test_transfers_are_timed_as_the_sequence_phase():
    from mpiattn.core.model import PhaseTimer

    transfers, fakes = group("ulysses", 2)
    timers = [PhaseTimer(lambda: 0.0, ("sequence",)) for _ in range(2)]
    names: list[list[str]] = [[], []]

    def rank(i: int) -> None:
        def phase(name: str, i=i):
            names[i].append(name)
            return timers[i](name)

        split = SequenceSplit(10, 2, i)
        qkv, mask = inputs(1, 10, 2, 4, "float64", False)
        attn = SequenceAttention("ulysses", split, transfers[i], phase=phase)
        out = np.empty((split.count, 8))
        attn.forward(local_rows(qkv, 1, 10, split), out, 1, 2, 4, KeyMask.from_mask(mask),
                     Options(), 0)

    run_ranks(rank, [(0,), (1,)], fakes)
    assert names == [["sequence"] * 2] * 2  # the two Alltoalls, nothing else
