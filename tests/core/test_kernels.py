"""The compiled float32 kernels (``mpiattn.core.kernels``) against float64 oracles, their
edges (row tails, column blocks, infinities, NaN, masked keys), and the NumPy operations
that dispatch to them, run both ways: compiled and NumPy passes (``LIB`` None)."""

import math
import os
import platform
import shutil
import sys
import sysconfig

import numpy as np
import pytest
from scipy.special import erf

from mpiattn.core import attention as attention_module
from mpiattn.core import kernels, ops
from mpiattn.core.attention import KeyMask, Options, attention, heads_attention, mask_bias

needs_lib = pytest.mark.skipif(kernels.LIB is None, reason=kernels.description())


def test_the_kernels_are_built_where_a_compiler_is():
    """An install with a C compiler builds them (setup.py), so the suite tests them."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if os.environ.get("MPIATTN_KERNELS", "").lower() == "numpy":
        assert kernels.LIB is None and "MPIATTN_KERNELS" in kernels.description()
    elif shutil.which(compiler) or shutil.which("cc"):
        assert kernels.LIB is not None, kernels.description()
        said = kernels.description()
        assert said.startswith("compiled, ") and "(_kernels" in said, said
        if platform.machine() == "x86_64" and sys.platform == "linux":  # the clone in use
            assert any(f"{isa} clone" in said for isa in ("AVX-512", "AVX2", "baseline"))


def gelu64(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


@needs_lib
@pytest.mark.parametrize("shape", [(1, 1), (3, 15), (5, 17), (7, 384), (2, 1536), (4, 3, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_against_erf(shape, with_bias):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32) if with_bias else None
    keep = x.copy()
    out = kernels.gelu(x, bias, np.full_like(x, np.nan))
    want = gelu64(x if bias is None else x + bias)  # the float32 sum, as the kernel has it
    np.testing.assert_allclose(out, want, rtol=2e-7, atol=4e-7)
    np.testing.assert_array_equal(x, keep)


@needs_lib
def test_gelu_over_the_whole_range_and_at_the_edges():
    x = np.linspace(-12, 12, 240_001, dtype=np.float32).reshape(1, -1)
    assert np.abs(kernels.gelu(x, None, np.empty_like(x)) - gelu64(x)).max() < 3.5e-7
    edges = np.array([[-np.inf, np.inf, np.nan, 0.0, -0.0, 1e-30, -100.0, 100.0, 1e30, -1e30,
                       3.4e38, -3.4e38]], np.float32)
    out = kernels.gelu(edges, None, np.empty_like(edges))
    assert np.isnan(out[0, :3]).all()  # +-inf and NaN: NaN, as the NumPy passes give
    np.testing.assert_allclose(out[0, 3:], [0, 0, 5e-31, 0, 100, 1e30, 0, 3.4e38, 0],
                               rtol=1e-6, atol=0)
    numpy_passes = ops._gelu_blocks(edges, np.empty_like(edges), None)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(numpy_passes))


@needs_lib
@pytest.mark.parametrize(("groups", "rows", "cols"), [
    (1, 1, 1), (1, 2, 15), (2, 17, 17), (3, 256, 64), (1, 5, 513), (2, 3, 1100)])
def test_softmax_columns_against_float64(groups, rows, cols):
    """Every column block (512 wide) and tail; masked (-inf) keys give exactly 0."""
    rng = np.random.default_rng(rows * cols)
    s = (rng.standard_normal((groups, rows, cols)) * 10).astype(np.float32)
    if rows > 1:
        s[:, rng.random(rows) < 0.3] = -np.inf  # masked keys
        s[:, 0] = np.where(np.isinf(s[:, 0]), 0, s[:, 0])
    want = np.exp((s - s.max(axis=1, keepdims=True)).astype(np.float64))  # float32 shift
    total = np.full((groups, cols), np.nan, np.float32)
    kernels.softmax_columns(s, total)
    np.testing.assert_allclose(s, want, rtol=3e-7, atol=1e-37)
    assert (s[np.isinf(want) | (want == 0)] == 0).all()
    np.testing.assert_allclose(total, want.sum(axis=1), rtol=2e-6)


@needs_lib
def test_softmax_columns_exp_over_its_whole_range():
    """One column per argument: exp of -104..0 within 1 ulp-ish, 0 below the normals."""
    v = np.linspace(-104, 0, 200_001, dtype=np.float32)
    s = np.stack([v, np.zeros_like(v)])[None].copy()
    total = np.empty((1, v.size), np.float32)
    kernels.softmax_columns(s, total)
    want = np.exp(v.astype(np.float64))
    normal = want > np.finfo(np.float32).tiny
    assert (np.abs(s[0, 0, normal] - want[normal]) / want[normal]).max() < 2e-7
    assert (s[0, 0, ~normal] == 0).all() and (s[0, 1] == 1).all()
    np.testing.assert_array_equal(total[0], s[0, 0] + 1)


@needs_lib
def test_softmax_columns_nan_stays_in_its_column():
    s = np.zeros((1, 4, 3), np.float32)
    s[0, 2, 1] = np.nan
    total = np.empty((1, 3), np.float32)
    kernels.softmax_columns(s, total)
    assert np.isnan(total[0, 1]) and np.isnan(s[0, 2, 1])
    np.testing.assert_array_equal(total[0, [0, 2]], [4, 4])
    np.testing.assert_array_equal(s[0, :, [0, 2]], 1)


@needs_lib
def test_store_heads_divides_and_touches_only_its_heads():
    groups, queries, d, heads = 3, 5, 4, 7
    rng = np.random.default_rng(0)
    o = rng.standard_normal((groups, queries, d)).astype(np.float32)
    total = rng.random((groups, queries)).astype(np.float32) + 0.5
    dest = np.full((queries, heads, d), -7.0, np.float32)
    kernels.store_heads(o, total, dest[:, 2:5])
    np.testing.assert_array_equal(dest[:, 2:5], (o / total[:, :, None]).transpose(1, 0, 2))
    assert (dest[:, :2] == -7).all() and (dest[:, 5:] == -7).all()
    with pytest.raises(ValueError, match="does not fit"):
        kernels.store_heads(o, total, dest[:, 2:5, :3])


def layer_norm64(v, g, b, eps):
    v = v.astype(np.float64)
    c = v - v.mean(axis=1, keepdims=True)
    return c / np.sqrt((c * c).mean(axis=1, keepdims=True) + eps) * g + b


@needs_lib
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (3, 15), (4, 17), (33, 384), (2, 768)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_total", [False, True])
def test_add_layer_norm_against_float64(rows, cols, with_bias, with_total):
    rng = np.random.default_rng(rows + cols)
    x, residual = (rng.standard_normal((2, rows, cols)) * 3 + 1).astype(np.float32)
    g, b, bias = rng.standard_normal((3, cols)).astype(np.float32)
    bias = bias if with_bias else None
    total = np.full_like(x, np.nan) if with_total else None
    out = kernels.add_layer_norm(x, residual, g, b, 1e-5, bias, total, np.empty_like(x))
    summed = x if bias is None else x + bias
    np.testing.assert_allclose(out, layer_norm64(summed + residual, g, b, 1e-5),
                               rtol=1e-5, atol=2e-6)
    if with_total:
        np.testing.assert_array_equal(total, summed)  # the same float32 sum


@pytest.mark.parametrize(("rows", "cols"), [(5, 17), (64, 384)])
def test_ops_gelu_and_add_layer_norm_both_paths(path, rows, cols):
    """The operations the layers call: float32 C-contiguous arrays take the kernels where
    they are built, anything else the NumPy passes, with the same numbers."""
    kind, calls = path
    rng = np.random.default_rng(cols)
    a, x, residual = rng.standard_normal((3, rows, cols)).astype(np.float32)
    g, b, bias = rng.standard_normal((3, cols)).astype(np.float32)
    got = ops.gelu(a, out=np.empty_like(a), bias=bias)
    np.testing.assert_allclose(got, gelu64(a + bias), rtol=2e-7, atol=4e-7)
    total = np.empty_like(x)
    got = ops.add_layer_norm(x, residual, g, b, 1e-12, bias=bias, total=total)
    np.testing.assert_allclose(got, layer_norm64(x + bias + residual, g, b, 1e-12),
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(total, x + bias)
    assert calls == ([] if kind == "numpy" else ["gelu", "add_layer_norm"])
    calls.clear()  # float64, and strided float32: the NumPy passes
    ops.gelu(a.astype(np.float64), bias=bias.astype(np.float64))
    ops.add_layer_norm(x[:, ::2], residual[:, ::2], g[::2], b[::2], 1e-12)
    assert calls == []


def grouped_case(batch, seq, heads, d, prefix, seed):
    rng = np.random.default_rng(seed)
    qkv = (rng.standard_normal((batch * seq, 3 * heads * d)) * 2).astype(np.float32)
    lengths = rng.integers(1, seq + 1, size=batch)
    mask = np.arange(seq)[None, :] < lengths[:, None]
    if not prefix:
        mask = rng.random((batch, seq)) < 0.6
        mask[:, 0] = True
    return qkv, mask


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("seq", "group_bytes"), [(1, 1 << 30), (37, 1), (37, 3 * 37 * 37 * 4),
                                                  (300, 1 << 30)])
@pytest.mark.parametrize("position", [False, True])
def test_grouped_float32_attention_both_paths(path, monkeypatch, prefix, workers, seq,
                                              group_bytes, position):
    """float32 attention of NumPy's groups of heads, with the compiled softmax and store or
    with NumPy's passes: every grouping, mask, thread count and position bias against the
    float64 all-heads product of the same float32 inputs."""
    kind, calls = path
    monkeypatch.setattr(attention_module, "_GROUP_BYTES", group_bytes)
    batch, heads, d = 3, 7, 8
    qkv, mask = grouped_case(batch, seq, heads, d, prefix, seed=seq)
    bias = (np.random.default_rng(4).standard_normal((heads, seq, seq)).astype(np.float32)
            if position else None)
    out = np.full((batch * seq, heads * d), np.nan, np.float32)
    heads_attention(qkv, out, batch, seq, heads, d, KeyMask.from_mask(mask),
                    Options("plain", 0, workers, position_bias=bias))
    q, k, v = (qkv.astype(np.float64).reshape(batch, seq, 3, heads, d)[:, :, i]
               .transpose(0, 2, 1, 3) for i in range(3))
    full = mask_bias(mask, np.float64) + (0 if bias is None else bias[None])
    want = attention(q, k, v, full).transpose(0, 2, 1, 3).reshape(batch * seq, heads * d)
    assert np.abs(out - want).max() / np.abs(want).max() < 3e-6
    if kind == "compiled":
        assert calls.count("softmax_columns") == calls.count("store_heads") > 0
    else:
        assert calls == []
