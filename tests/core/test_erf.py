"""The elementwise kernels of the CPU path against SciPy (an independent implementation):
erf in float64 (Cody) and float32 (Numerical Recipes erfc, blocked), blocked GELU, and the
batched attention of short sequences against the per-(sequence, head) loop."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf as scipy_erf

from mpiattn.core import attention
from mpiattn.core.backend import erf, erf_float32, erf_float64
from mpiattn.core.ops import gelu

SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300, 5e-324, 0.46875, 4.0,
                     -4.0, 26.5, -27.0, 6.0])


def grid() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([np.linspace(-9, 9, 100_001), rng.normal(0, 3, 50_000), SPECIALS])


def test_float64_erf_is_within_a_few_ulps_of_scipy():
    x = grid()
    got, want = erf_float64(x), scipy_erf(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    assert np.abs(got[finite] - want[finite]).max() <= 4e-16
    tiny = np.abs(want) < 1e-3  # relative accuracy where erf is small too
    assert (np.abs(got - want)[tiny & finite] <= 4e-16 * np.abs(want[tiny & finite]) + 1e-320
            ).all()
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(want[finite]))


def test_float32_erf_is_within_5e_7_and_keeps_special_values():
    x = grid().astype(np.float32)
    got = erf_float32(x)
    want = scipy_erf(x.astype(np.float64))
    finite = ~np.isnan(want)
    assert got.dtype == np.float32
    assert np.abs(got[finite] - want[finite]).max() <= 5e-7
    assert np.isnan(got[~finite]).all()
    assert erf_float32(np.float32([np.inf, -np.inf])).tolist() == [1.0, -1.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_in_place_and_on_views(dtype):
    x = np.random.default_rng(1).normal(size=(7, 300)).astype(dtype)
    want = scipy_erf(x.astype(np.float64))
    tol = 5e-7 if dtype == np.float32 else 4e-16
    y = x.copy()
    assert erf(y, out=y) is y and np.abs(y - want).max() <= tol
    out = np.empty((300, 7), dtype=dtype).T  # a non-contiguous out
    erf(x, out=out)
    assert np.abs(out - want).max() <= tol
    assert np.abs(erf(x[:, ::3]) - want[:, ::3]).max() <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_with_bias_is_exact_gelu_of_the_sum(dtype):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, size=(101, 1536)).astype(dtype)
    b = rng.normal(size=1536).astype(dtype)
    s = x.astype(np.float64) + b
    want = 0.5 * s * (1 + scipy_erf(s / np.sqrt(2)))
    before = x.copy()
    got = gelu(x, bias=b)
    assert got.dtype == dtype
    assert np.abs(got - want).max() <= (2e-6 if dtype == np.float32 else 1e-14) * np.abs(
        want).max()
    np.testing.assert_array_equal(x, before)  # the input is left as it was


def test_float32_gelu_is_within_4e_7_of_float64_over_the_whole_range():
    """The blocked float32 GELU (Abramowitz & Stegun 7.1.26) in absolute terms, on a fine
    grid where it matters and far out in both tails (GELU(-12) is ~1e-32: rounds to 0)."""
    x = np.linspace(-12, 12, 400_001).astype(np.float32)[None, :]
    s = x.astype(np.float64)
    want = 0.5 * s * (1 + scipy_erf(s / np.sqrt(2)))
    got = gelu(x)
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 4e-7
    assert np.isnan(gelu(np.float32([[np.nan, 1.0]]))[0, 0])


def test_batched_short_attention_equals_the_per_head_loop(monkeypatch):
    from mpiattn.core.attention import KeyMask, Options, heads_attention

    rng = np.random.default_rng(3)
    batch, seq, heads, d = 3, 11, 4, 8
    qkv = rng.normal(size=(batch * seq, 3 * heads * d))
    lengths = np.array([11, 5, 1])
    mask = KeyMask.from_mask(np.arange(seq)[None, :] < lengths[:, None])
    batched = np.zeros((batch * seq, heads * d))
    heads_attention(qkv, batched, batch, seq, heads, d, mask, Options("plain"))
    monkeypatch.setattr(attention, "_BATCHED_SCORES", 0)  # force the loop
    looped = np.zeros_like(batched)
    heads_attention(qkv, looped, batch, seq, heads, d, mask, Options("plain"))
    np.testing.assert_allclose(batched, looped, rtol=0, atol=1e-13)
