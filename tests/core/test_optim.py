"""Optimizers against scalar formulas written out, the schedule, and sharded clipping."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from mpiattn.config import TrainConfig
from mpiattn.core.optim import Optimizer, clip_factor, global_norm, lr_at


def scalar_reference(kind, t, p, grads, lrs, decays):
    """The update rules element by element in plain Python (PyTorch's definitions)."""
    p = float(p)
    m = v = buf = 0.0
    for step, (g, lr) in enumerate(zip(grads, lrs, strict=True)):
        wd = t.weight_decay if decays else 0.0
        if kind == "sgd":
            g += wd * p
            buf = t.momentum * buf + g
            p -= lr * buf
            continue
        if kind == "adam":
            g += wd * p
        else:
            p *= 1 - lr * wd
        m = t.beta1 * m + (1 - t.beta1) * g
        v = t.beta2 * v + (1 - t.beta2) * g * g
        mhat = m / (1 - t.beta1 ** (step + 1))
        vhat = v / (1 - t.beta2 ** (step + 1))
        p -= lr * mhat / (math.sqrt(vhat) + t.eps)
    return p


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_update_rules(kind):
    t = TrainConfig(optimizer=kind, weight_decay=0.1, lr=0.05)
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 2)), rng.normal(size=4)  # a matrix decays, a bias does not
    w0, b0 = w.copy(), b.copy()
    opt = Optimizer(t, [w, b])
    grads = [[rng.normal(size=(3, 2)), rng.normal(size=4)] for _ in range(4)]
    lrs = [0.05, 0.04, 0.03, 0.02]
    for step, (g, lr) in enumerate(zip(grads, lrs, strict=True)):
        opt.step([w, b], g, lr, step)
    for got, start, decays, k in ((w, w0, True, 0), (b, b0, False, 1)):
        for idx in np.ndindex(got.shape):
            want = scalar_reference(kind, t, start[idx], [g[k][idx] for g in grads], lrs,
                                    decays)
            assert abs(got[idx] - want) <= 1e-12 * max(1.0, abs(want))


def test_schedule():
    t = TrainConfig(steps=110, warmup=10, lr=1.0, min_lr=0.1, decay="cosine")
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(109, t) == pytest.approx(0.1)
    assert lr_at(59.5, t) == pytest.approx(0.55)  # half-way: the mean of lr and min_lr
    lin = dataclasses.replace(t, decay="linear")
    assert lr_at(59.5, lin) == pytest.approx(0.55)
    assert lr_at(109, lin) == pytest.approx(0.1)
    assert lr_at(50, dataclasses.replace(t, decay="none")) == 1.0


def test_sharded_global_norm():
    rng = np.random.default_rng(1)
    sharded_full, replicated = rng.normal(size=(4, 6)), rng.normal(size=5)
    want = math.sqrt((sharded_full ** 2).sum() + (replicated ** 2).sum())
    for k in (1, 2, 3):
        pieces = np.array_split(sharded_full, k, axis=1)
        squares = [float((piece ** 2).sum()) for piece in pieces]
        for piece in pieces:  # every rank: its shard and its copy of the replicated tensor
            got = global_norm([piece, replicated], [True, False], lambda _, sq=squares: sum(sq))
            assert got == pytest.approx(want, rel=1e-14)
    assert clip_factor(10.0, 1.0) == pytest.approx(0.1, rel=1e-6)
    assert clip_factor(0.5, 1.0) == 1.0 and clip_factor(10.0, 0.0) == 1.0


def test_adam_minimises_a_quadratic():
    t = TrainConfig(optimizer="adam", weight_decay=0.0, lr=0.1)
    x = np.array([3.0, -2.0])
    opt = Optimizer(t, [x])
    for step in range(300):
        opt.step([x], [2 * x], 0.1, step)
    assert np.abs(x).max() < 1e-2
