"""Memory and undefined-behaviour safety of the compiled kernels (``mpiattn/core/_kernels.c``)
and of the operations that dispatch to them: arrays the kernels cannot take go to the
NumPy passes (which raise), and the C file, built with AddressSanitizer and UBSan, runs
every kernel on edge shapes and values (NaN, infinities, no keys) without a report."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpiattn.core import kernels, ops

SOURCE = Path(kernels.__file__).with_name("_kernels.c")


def test_gelu_into_a_smaller_out_raises_on_both_paths(path):
    """An ``out`` with fewer elements than ``x`` is refused, never written past its end."""
    x = np.ones((4, 8), np.float32)
    guard = np.full(32, 7.0, np.float32)
    with pytest.raises(ValueError):
        ops.gelu(x, out=guard[:16].reshape(2, 8))
    assert (guard[16:] == 7).all()


def test_gelu_into_an_out_of_another_shape_and_the_same_size(path):
    x = np.linspace(-3, 3, 32, dtype=np.float32).reshape(4, 8)
    out = ops.gelu(x, out=np.empty(32, np.float32))
    np.testing.assert_array_equal(out.reshape(4, 8), ops._gelu_blocks(x, np.empty_like(x), None))


def test_add_layer_norm_without_gain_raises_on_both_paths(path):
    """No gain or shift is a TypeError of the NumPy passes, not a NULL pointer in C."""
    x = np.ones((4, 8), np.float32)
    with pytest.raises(TypeError):
        ops.add_layer_norm(x, x.copy(), None, None, 1e-5)


_EDGES = r"""
import ctypes, sys
import numpy as np
from mpiattn.core import kernels, ops
from mpiattn.core.attention import KeyMask, Options, heads_attention

kernels.LIB = kernels.bind(ctypes.CDLL(sys.argv[1]))
f32 = np.float32
special = np.array([np.nan, np.inf, -np.inf, 0, -0.0, 1e30, -1e30, 3.4e38, -88, -104], f32)
for shape in [(1, 1), (1, 10), (3, 17), (2, 0), (0, 5)]:
    x = np.resize(special, shape).astype(f32)
    ops.gelu(x, bias=np.resize(special[::-1], shape[1:]).astype(f32))
    if shape[1]:
        g = np.ones(shape[1], f32)
        ops.add_layer_norm(x, x.copy(), g, g, 1e-12, bias=g, total=np.empty_like(x))
for seq, heads, d, keys in [(1, 1, 1, 1), (1, 1, 1, 0), (9, 2, 17, 9), (33, 3, 48, 20),
                             (8, 1, 80, 8), (40, 2, 32, 33)]:
    rows = np.resize(special, (seq, 3 * heads * d)).astype(f32)
    dest = np.empty((seq, heads * d), f32)
    for extras in (False, True):
        bias = np.resize(special, 3 * heads * d).astype(f32) if extras else None
        key_bias = np.resize(special, keys).astype(f32) if extras else None
        position = np.resize(special, (heads, seq, seq)).astype(f32) if extras else None
        work = np.empty(kernels.attention_work(d, keys), f32)
        kernels.attention(rows, heads, 0, heads, d, keys, 0.5, bias, key_bias, position,
                          dest, work)
        kernels.attention(rows, heads, heads - 1, heads, d, keys, 0.5, bias, key_bias,
                          position, dest, work)
    assert keys or np.isnan(dest).all()  # no keys: 0 / 0
rng = np.random.default_rng(0)
for batch, seq, heads, d in [(1, 1, 1, 1), (3, 1, 2, 3), (2, 5, 3, 17)]:
    qkv = rng.standard_normal((batch * seq, 3 * heads * d)).astype(f32)
    qkv[0, 0] = np.nan
    mask = np.ones((batch, seq), bool)
    mask[-1] = False  # a sequence with no keys
    out = np.empty((batch * seq, heads * d), f32)
    heads_attention(qkv, out, batch, seq, heads, d, KeyMask.from_mask(mask),
                    Options("plain", 0, 2))
    assert np.isnan(out[-seq:]).all()
print("clean")
"""


def test_every_kernel_on_edges_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """NaN once reached a float-to-int conversion (undefined in C), and a softmax with no
    keys read a row that is not there: both are reports here, as is any read or write
    outside the arrays by the fused attention's tiles and tails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    runtime = [subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True,
                              text=True).stdout.strip() for name in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(r) and os.path.exists(r) for r in runtime):
        pytest.skip("no sanitizer runtimes")
    lib = tmp_path / "kernels_asan.so"
    built = subprocess.run(
        [gcc, "-O1", "-g", "-std=gnu99", "-ffp-contract=fast", "-fno-trapping-math", "-fPIC",
         "-shared", "-fsanitize=address,undefined,float-cast-overflow",
         "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", str(SOURCE), "-o", str(lib)],
        capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"the sanitized build failed: {built.stderr[-500:]}")
    env = dict(os.environ, LD_PRELOAD=" ".join(runtime), ASAN_OPTIONS="detect_leaks=0",
               MPIATTN_KERNELS="numpy")  # the installed library stays out; ours goes in
    done = subprocess.run([sys.executable, "-c", _EDGES, str(lib)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]
