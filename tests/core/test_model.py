"""The sharded encoder against the one-process reference, and its pieces against plain math."""

import math

import numpy as np
import pytest
from helpers import TOL, sharded_forward, tiny

from mpiattn.core import ops, reference
from mpiattn.core.attention import attention, mask_bias
from mpiattn.core.model import mean_pool
from mpiattn.core.ops import add_layer_norm, gelu, layer_norm, softmax
from mpiattn.inputs.data import load_batch
from mpiattn.io.weights import open_source


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5, 12])
def test_sharded_equals_reference(ranks, dtype):
    cfg = tiny(dtype=dtype)
    batch = load_batch(cfg)
    want_attn, want_hidden = reference.forward(
        batch.ids, batch.mask, open_source(cfg.seed, cfg.model, dtype), cfg.model)
    got = sharded_forward(cfg, ranks)
    worst = 0.0
    for (attn, hidden), wa, wh in zip(got, want_attn, want_hidden, strict=True):
        assert attn.dtype == np.dtype(dtype)
        worst = max(worst, reference.relative_error(attn, wa),
                    reference.relative_error(hidden, wh))
    print(f"ranks={ranks} {dtype}: max relative error {worst:.2e}")
    assert worst <= TOL[dtype]


def test_float32_close_to_float64_oracle():
    """Catches a float32 path that is self-consistent but wrong."""
    cfg32, cfg64 = tiny(dtype="float32"), tiny(dtype="float64")
    got = sharded_forward(cfg32, 3)[-1][1]
    batch = load_batch(cfg64)
    want = reference.forward(batch.ids, batch.mask,
                             open_source(0, cfg64.model, "float64"), cfg64.model)[1][-1]
    assert reference.relative_error(got, want) < 1e-4


def test_attention_matches_per_head_loop():
    rng = np.random.default_rng(1)
    b, h, s, d = 2, 3, 7, 5
    q, k, v = (rng.standard_normal((b, h, s, d)) for _ in range(3))
    key_mask = np.ones((b, s), bool)
    key_mask[1, 4:] = False
    out = attention(q, k, v, mask_bias(key_mask, q.dtype))
    for bi in range(b):
        for hi in range(h):
            valid = key_mask[bi]
            scores = q[bi, hi] @ k[bi, hi, valid].T / math.sqrt(d)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            np.testing.assert_allclose(out[bi, hi], p @ v[bi, hi, valid], rtol=1e-12)


def test_padding_does_not_leak_into_real_tokens():
    cfg = tiny(dtype="float64", model__layers=1)
    batch = load_batch(cfg)
    assert not batch.mask.all(), "the seeded batch must contain padding"
    source = open_source(0, cfg.model, "float64")
    base = reference.forward(batch.ids, batch.mask, source, cfg.model)[1][0]
    scrambled = batch.ids.copy()
    scrambled[~batch.mask] = 17  # different ids under the mask
    from mpiattn.core.model import LocalReduce, encoder_forward
    from mpiattn.core.shard import head_shard

    shard = head_shard(12, 8, cfg.model.ffn, 1, 0)
    layers = [source.layer(0, shard)]
    out = encoder_forward(scrambled, batch.mask, source.embeddings(), layers, LocalReduce(np),
                          cfg.model.layer_norm_eps)
    real = batch.mask
    np.testing.assert_allclose(out[real], base[real], rtol=0, atol=1e-12)
    assert not np.allclose(out[~real], base[~real])  # padded rows did change


def test_softmax_rows_sum_to_one_and_survive_large_values():
    s = np.array([[1000.0, 1000.0, -np.inf], [0.0, 1.0, 2.0]])
    p = softmax(s.copy())
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0])


def test_gelu_is_exact_erf_form():
    x = np.linspace(-6, 6, 101)
    want = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x])
    np.testing.assert_allclose(gelu(x), want, rtol=1e-14, atol=1e-15)


def test_layer_norm_normalises():
    x = np.random.default_rng(0).standard_normal((4, 10)) * 5 + 3
    y = layer_norm(x.copy(), np.ones(10), np.zeros(10), 1e-12)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_total", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_add_layer_norm_is_layer_norm_of_the_sum(monkeypatch, dtype, with_bias, with_total,
                                                  contiguous):
    """Blocks of 3 rows over 10 (the last one short), and the whole-array path that takes
    views, give LayerNorm(x + bias + residual); ``total`` gets x + bias; inputs untouched."""
    monkeypatch.setattr(ops, "_NORM_BLOCK", 3 * 7)
    rng = np.random.default_rng(4)
    x, residual = (rng.normal(2, 3, size=(10, 7)).astype(dtype) for _ in range(2))
    g, b, bias = (rng.normal(size=7).astype(dtype) for _ in range(3))
    if not contiguous:
        x = np.asfortranarray(x)
    before = x.copy(), residual.copy()
    total = np.full((10, 7), np.nan, dtype=dtype) if with_total else None
    got = add_layer_norm(x, residual, g, b, 1e-5, bias=bias if with_bias else None,
                         total=total)
    s = x.astype(np.float64) + (bias if with_bias else 0)
    want = layer_norm(s + residual, g.astype(np.float64), b.astype(np.float64), 1e-5)
    tol = 2e-6 if dtype == np.float32 else 1e-14
    assert got.dtype == dtype and np.abs(got - want).max() <= tol * np.abs(want).max()
    if with_total:
        np.testing.assert_allclose(total, s, rtol=tol)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(residual, before[1])


def test_mean_pool_ignores_padding_and_is_unit_length():
    h = np.random.default_rng(0).standard_normal((2, 5, 4))
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    pooled = mean_pool(h, mask)
    want = h[0, :2].mean(0)
    np.testing.assert_allclose(pooled[0], want / np.linalg.norm(want))
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0)
