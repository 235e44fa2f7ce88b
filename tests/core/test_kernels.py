"""The compiled float32 kernels (``mpiattn.core.kernels``) against float64 oracles, their
edges (row tails, column blocks, infinities, NaN, masked keys), and the NumPy operations
that dispatch to them, run both ways: compiled and NumPy passes (``LIB`` None)."""

import importlib.machinery
import math
import os
import platform
import shutil
import subprocess
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


def fused64(rows, heads, first, stop, d, keys, scale, qkv_bias, key_bias, position):
    """The float64 oracle of ``kernels.attention``: (S, (stop - first) * d)."""
    rows = rows.astype(np.float64)
    if qkv_bias is not None:
        rows = rows + qkv_bias
    width = heads * d
    out = []
    for h in range(first, stop):
        q = rows[:, h * d:(h + 1) * d] * np.float64(np.float32(scale))
        k = rows[:keys, width + h * d:width + (h + 1) * d]
        v = rows[:keys, 2 * width + h * d:2 * width + (h + 1) * d]
        s = q @ k.T
        if key_bias is not None:
            s = s + key_bias
        if position is not None:
            s = s + position[h, :, :keys]
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out.append(p @ v / p.sum(axis=1, keepdims=True))
    return np.concatenate(out, axis=1)


def fused_case(seq, heads, d, seed, biases=True, masked=True, position=True):
    """A sequence's (S, 3 h d) QKV rows inside a wider array, and the optional inputs."""
    rng = np.random.default_rng(seed)
    wide = (rng.standard_normal((seq, 3 * heads * d + 5)) * 2).astype(np.float32)
    rows = wide[:, 2:2 + 3 * heads * d]  # rows contiguous, not the whole array
    qkv_bias = rng.standard_normal(3 * heads * d).astype(np.float32) if biases else None
    keys = int(rng.integers(1, seq + 1))
    key_bias = None
    if masked:
        key_bias = np.where(rng.random(keys) < 0.3, -np.inf, 0).astype(np.float32)
        key_bias[0] = 0.5
    pos = rng.standard_normal((heads, seq, seq)).astype(np.float32) if position else None
    return rows, qkv_bias, keys, key_bias, pos


@needs_lib
@pytest.mark.parametrize("d", [1, 8, 16, 20, 32, 48, 64, 80])
@pytest.mark.parametrize("seq", [1, 7, 8, 9, 33, 300])
@pytest.mark.parametrize("extras", [False, True])
def test_fused_attention_against_float64(d, seq, extras):
    """Every register tile and its tails: head_dim in 32-, 16- and odd-column pieces,
    query blocks of 8 and their tail, keys padded to 32; with and without the QKV bias,
    masked (-inf) keys and a position bias; heads 1:3 of 4 land in their columns only."""
    heads, first, stop = 4, 1, 3
    rows, qkv_bias, keys, key_bias, position = fused_case(
        seq, heads, d, seed=seq * 100 + d, biases=extras, masked=extras, position=extras)
    dest = np.full((seq, heads * d + 3), -7.0, np.float32)
    scale = 1 / math.sqrt(d)
    work = np.empty(kernels.attention_work(d, keys), np.float32)
    kernels.attention(rows, heads, first, stop, d, keys, scale, qkv_bias, key_bias, position,
                      dest[:, :heads * d], work)
    want = fused64(rows, heads, first, stop, d, keys, scale, qkv_bias, key_bias, position)
    got = dest[:, first * d:stop * d]
    assert np.abs(got - want).max() <= 3e-6 * max(1.0, np.abs(want).max())
    assert (dest[:, :first * d] == -7).all() and (dest[:, stop * d:] == -7).all()


@needs_lib
def test_fused_attention_exp_over_its_whole_range():
    """One query, keys whose scores run over -104..0 (d = 1, q = 1, unit scale) and an
    identity V: each output is exp(s_j) / sum, within 1 ulp-ish; 0 below the normals."""
    for chunk in np.array_split(np.linspace(-104, 0, 20_001, dtype=np.float32), 20):
        keys = chunk.size + 1
        d = keys  # V = identity: output j is weight j
        rows = np.zeros((keys, 3 * d), np.float32)
        rows[0, 0] = 1.0  # q
        rows[:, d] = np.append(chunk, 0)  # k: the scores, and one key at 0 (the max)
        rows[:, 2 * d:] = np.eye(keys, dtype=np.float32)
        dest = np.empty((keys, d), np.float32)
        kernels.attention(rows, 1, 0, 1, d, keys, 1.0, None, None, None, dest,
                          np.empty(kernels.attention_work(d, keys), np.float32))
        e = np.exp(np.append(chunk, 0).astype(np.float64))
        want = e / e.sum()
        normal = want > np.finfo(np.float32).tiny
        assert (np.abs(dest[0, normal] - want[normal]) / want[normal]).max() < 4e-7
        assert (dest[0, ~normal] == 0).all()


@needs_lib
def test_fused_attention_nan_and_no_keys():
    """A NaN query gives NaN in its own row only; no keys give NaN; misfits raise."""
    heads, d, seq = 2, 16, 11
    rows, *_ = fused_case(seq, heads, d, seed=3, biases=False, masked=False, position=False)
    rows[4, d] = np.nan  # query 4 of head 1
    dest = np.zeros((seq, heads * d), np.float32)
    work = np.empty(kernels.attention_work(d, seq), np.float32)
    kernels.attention(rows, heads, 0, heads, d, seq, 0.25, None, None, None, dest, work)
    assert np.isnan(dest[4, d:]).all() and not np.isnan(np.delete(dest, 4, 0)).any()
    assert np.isfinite(dest[:, :d]).all()
    kernels.attention(rows, heads, 0, heads, d, 0, 0.25, None, None, None, dest, work)
    assert np.isnan(dest).all()
    for bad in ({"dest": dest[:, :d]}, {"work": work[:10]}, {"keys": seq + 1},
                {"rows": rows.astype(np.float64)}, {"qkv_bias": np.ones(5, np.float32)},
                {"key_bias": np.ones(seq - 1, np.float32)}, {"first": 2, "stop": 1}):
        args = dict(rows=rows, heads=heads, first=0, stop=heads, head_dim=d, keys=seq,
                    scale=0.25, qkv_bias=None, key_bias=None, position=None, dest=dest,
                    work=work) | bad
        with pytest.raises(ValueError, match="do not fit"):
            kernels.attention(**args)


@needs_lib
def test_fused_attention_refuses_what_it_cannot_take_safely():
    """Read-only or overlapping outputs, rows not a whole number of floats apart: a
    ValueError, never a write into them; an empty range of heads is a no-op (with a
    position bias too); NumPy integers are sizes like any other."""
    heads, d, seq = 2, 16, 9
    rows, *_ = fused_case(seq, heads, d, seed=8, biases=False, masked=False, position=False)
    dest = np.zeros((seq, heads * d), np.float32)
    work = np.empty(kernels.attention_work(d, seq), np.float32)
    args = dict(rows=rows, heads=heads, first=0, stop=heads, head_dim=d, keys=seq, scale=0.25,
                qkv_bias=None, key_bias=None, position=None, dest=dest, work=work)
    read_only = dest.copy()
    read_only.flags.writeable = False
    odd = np.zeros(seq * (heads * d + 1) * 4 + 2, np.uint8)[2:].view(np.float32)
    odd_rows = np.lib.stride_tricks.as_strided(odd, (seq, heads * d), (4 * heads * d + 2, 4))
    for bad in ({"dest": read_only}, {"dest": rows[:, 2 * heads * d:]},
                {"work": rows.reshape(-1)}, {"work": dest.reshape(-1)},
                {"dest": odd_rows}):
        with pytest.raises(ValueError, match="do not fit"):
            kernels.attention(**(args | bad))
    assert (read_only == 0).all() and (dest == 0).all()
    position = np.ones((heads, seq, seq), np.float32)
    kernels.attention(**(args | {"first": heads, "position": position}))
    assert (dest == 0).all()
    kernels.attention(**(args | {"heads": np.int64(heads), "stop": np.int32(heads),
                                 "keys": np.int64(seq)}))
    want = fused64(rows, heads, 0, heads, d, seq, 0.25, None, None, None)
    assert np.abs(dest - want).max() < 1e-5


def test_attention_into_a_read_only_output_raises_on_both_paths(path):
    batch, seq, heads, d = 2, 5, 2, 16
    qkv, mask = grouped_case(batch, seq, heads, d, True, seed=2)
    out = np.zeros((batch * seq, heads * d), np.float32)
    out.flags.writeable = False
    for bias in (None, np.ones(3 * heads * d, np.float32)):
        with pytest.raises(ValueError, match="read-only"):
            heads_attention(qkv.copy(), out, batch, seq, heads, d, KeyMask.from_mask(mask),
                            Options("plain", 0, 1), qkv_bias=bias)
    assert (out == 0).all() and path[1] == []
    x = np.ones((4, 8), np.float32)
    for call in (lambda: ops.gelu(x, out=out[:4, :8]),
                 lambda: ops.add_layer_norm(x, x.copy(), x[0], x[0], 1e-5, out=out[:4, :8])):
        with pytest.raises(ValueError, match="read-only"):
            call()
    assert (out == 0).all() and path[1] == []


def test_an_empty_batch_on_two_workers(path):
    qkv = np.zeros((0, 3 * 2 * 16), np.float32)
    out = np.zeros((0, 2 * 16), np.float32)
    assert heads_attention(qkv, out, 0, 4, 2, 16, KeyMask.from_mask(np.ones((0, 4), bool)),
                           Options("plain", 0, 2), qkv_bias=np.zeros(96, np.float32)) == "plain"


def test_a_library_that_does_not_load_leaves_the_numpy_passes(tmp_path, monkeypatch):
    """A damaged file, or one built from older sources (a function missing): no import
    error, the NumPy passes, and the reason in the description."""
    monkeypatch.setattr(kernels, "TURNED_OFF", False)
    name = f"_kernels{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    (tmp_path / name).write_bytes(b"not a library")
    lib, why = kernels._load(tmp_path)
    assert lib is None and why.startswith(f"{name} does not load (") and "reinstall" in why
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc for a library without the kernels")
    (tmp_path / "old.c").write_text("int mpiattn_gelu(void) { return 0; }\n")
    subprocess.run([gcc, "-shared", "-fPIC", str(tmp_path / "old.c"), "-o",
                    str(tmp_path / name)], check=True)
    lib, why = kernels._load(tmp_path)
    assert lib is None and why == f"{name} is built from older sources: reinstall mpiattn"
    monkeypatch.setattr(kernels, "LIB", None)
    monkeypatch.setattr(kernels, "_WHY_NOT", why)
    assert kernels.description() == f"NumPy passes ({why})"


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
@pytest.mark.parametrize("d", [8, 32])
def test_grouped_float32_attention_both_paths(path, monkeypatch, prefix, workers, seq,
                                              group_bytes, position, d):
    """float32 attention through the fused kernel or NumPy's groups of heads: every
    grouping, mask, thread count, head size and position bias, with the QKV bias handed
    in, against the float64 all-heads product of the same float32 inputs."""
    kind, calls = path
    monkeypatch.setattr(attention_module, "_GROUP_BYTES", group_bytes)
    batch, heads = 3, 7
    qkv, mask = grouped_case(batch, seq, heads, d, prefix, seed=seq)
    qkv_bias = np.random.default_rng(5).standard_normal(3 * heads * d).astype(np.float32)
    bias = (np.random.default_rng(4).standard_normal((heads, seq, seq)).astype(np.float32)
            if position else None)
    out = np.full((batch * seq, heads * d), np.nan, np.float32)
    q, k, v = ((qkv.astype(np.float64) + qkv_bias).reshape(batch, seq, 3, heads, d)[:, :, i]
               .transpose(0, 2, 1, 3) for i in range(3))
    heads_attention(qkv, out, batch, seq, heads, d, KeyMask.from_mask(mask),
                    Options("plain", 0, workers, position_bias=bias), qkv_bias=qkv_bias)
    full = mask_bias(mask, np.float64) + (0 if bias is None else bias[None])
    want = attention(q, k, v, full).transpose(0, 2, 1, 3).reshape(batch * seq, heads * d)
    assert np.abs(out - want).max() / np.abs(want).max() < 3e-6
    if kind == "compiled":
        assert calls.count("attention") == batch * max(1, -(-2 * workers // batch)
                                                       if workers > 1 else 1)
    else:
        assert calls == []


@pytest.mark.parametrize("case", ["float64", "probe", "window", "blocked"])
def test_the_qkv_bias_goes_into_the_product_where_the_kernel_does_not_run(case):
    """Every path but the fused kernel adds the handed-in QKV bias to qkv first, and gives
    what the bias added by the caller gives."""
    batch, seq, heads, d = 2, 9, 3, 8
    dtype = np.float64 if case == "float64" else np.float32
    qkv, mask = grouped_case(batch, seq, heads, d, True, seed=1)
    qkv = qkv.astype(dtype)
    qkv_bias = np.random.default_rng(2).standard_normal(3 * heads * d).astype(dtype)
    options = Options("blocked" if case == "blocked" else "plain", 4, 1,
                      window=3 if case == "window" else None)
    probe = None
    if case == "probe":
        from mpiattn.core.headstats import HeadStats
        probe = HeadStats(np, 1, 0, heads, map_sequences=(0,)).at(0)
    got, want = (np.empty((batch * seq, heads * d), dtype) for _ in range(2))
    added = qkv + qkv_bias
    keys = KeyMask.from_mask(mask)
    heads_attention(qkv, got, batch, seq, heads, d, keys, options, probe, qkv_bias=qkv_bias)
    np.testing.assert_array_equal(qkv, added)
    heads_attention(added.copy(), want, batch, seq, heads, d, keys, options, probe)
    np.testing.assert_array_equal(got, want)
