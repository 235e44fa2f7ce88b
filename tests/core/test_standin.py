"""The CuPy path on the CuPy stand-in (tests/standin): the stand-in refuses what CuPy
refuses, and the whole job runs on it with the NumPy backend's numbers (docs/gpu-standin.md).
"""

import collections
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests/standin"


@pytest.fixture(scope="module")
def cupy():
    """The stand-in's ``cupy`` for this module's tests; gone from the session afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("cupy", "cupyx")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(STANDIN))
    import cupy as standin

    assert standin.__standin__ == "mpiattn"
    yield standin
    sys.path.remove(str(STANDIN))
    from mpiattn.core import checksum, headstats

    for cache in (checksum._ones, checksum._tables, headstats._DISTANCES):  # keyed "cupy"
        for key in [k for k in cache if k[0] == "cupy"]:
            del cache[key]
    for k in [k for k in sys.modules if k.split(".")[0] in ("cupy", "cupyx")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_device_arrays_refuse_implicit_conversion(cupy, tmp_path):
    a = cupy.arange(6, dtype=cupy.float64).reshape(2, 3)
    assert not isinstance(a, np.ndarray)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(3)
    with pytest.raises(TypeError, match="Unsupported type"):
        cupy.exp(np.ones(3))
    with pytest.raises(TypeError):
        np.linalg.norm(a)  # a NumPy function CuPy does not provide
    with pytest.raises(TypeError, match="only size-1"):
        float(a)
    with h5py.File(tmp_path / "x.h5", "w") as f, pytest.raises(TypeError):
        f["x"] = a
    with pytest.raises(AttributeError):
        cupy.fft  # noqa: B018  (not used by mpiattn: not in the stand-in)
    with pytest.raises(AttributeError):
        a.searchsorted  # noqa: B018
    assert type(np.exp(a)) is cupy.ndarray and type(a.sum()) is cupy.ndarray  # 0-d, as CuPy


# every public name of the stand-in, looked up in the real CuPy (which imports without a GPU)
_COMPARE = """
import importlib, json, sys
try:
    real = {m: importlib.import_module(m) for m in ("cupy", "cupyx", "cupyx.scipy.special")}
except ImportError:
    print(json.dumps({"skip": True}))
    sys.exit(0)
for k in [k for k in sys.modules if k.split(".")[0] in ("cupy", "cupyx")]:
    del sys.modules[k]
sys.path.insert(0, sys.argv[1])
import cupy, cupyx, cupyx.scipy.special
mine = {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy.special": cupyx.scipy.special,
        "cupy.cuda": cupy.cuda, "cupy.cuda.runtime": cupy.cuda.runtime,
        "cupy.ndarray": cupy.ndarray, "cupy.cuda.Device": cupy.cuda.Device,
        "cupy.cuda.Stream": cupy.cuda.Stream, "cupy.cuda.Event": cupy.cuda.Event}
real.update({"cupy.cuda": real["cupy"].cuda, "cupy.cuda.runtime": real["cupy"].cuda.runtime,
             "cupy.ndarray": real["cupy"].ndarray, "cupy.cuda.Device": real["cupy"].cuda.Device,
             "cupy.cuda.Stream": real["cupy"].cuda.Stream,
             "cupy.cuda.Event": real["cupy"].cuda.Event})
own = {"annotations", "Any", "os", "time", "standin"}  # imports; the stand-in's record
lacking = [f"{where}.{name}" for where, obj in mine.items() for name in vars(obj)
           if not name.startswith("_") and name not in own
           and not isinstance(vars(obj)[name], type(sys))  # submodules: checked above
           and not hasattr(real[where], name)]
print(json.dumps({"lacking": lacking, "checked": sum(len(vars(o)) for o in mine.values())}))
"""


def test_the_standin_offers_nothing_cupy_lacks():
    """Each public name of the stand-in exists in the real CuPy, when CuPy is installed
    (it imports without a GPU): the stand-in is never more lenient in what it offers."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", _COMPARE, str(STANDIN)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    if result.get("skip"):
        pytest.skip("the real CuPy is not installed (pip install 'mpiattn[gpu]')")
    assert result["checked"] > 50 and result["lacking"] == []


def test_explicit_copies_and_memory_are_recorded(cupy):
    import cupyx

    rec = cupy.standin.record
    rec.reset()
    a = cupy.zeros((4, 4), dtype=cupy.float32)
    assert rec.peak_bytes[0] >= 64 and rec.allocations[0] == 1
    pinned = cupyx.empty_pinned((4, 4), dtype=np.float32)
    a.get(out=pinned)
    host = cupy.asnumpy(a + 1)
    assert float(a.sum()) == 0.0 and host.sum() == 16
    kinds = [(t.kind, t.pinned) for t in rec.d2h()]
    assert kinds == [("get", True), ("asnumpy", False), ("scalar", False)]
    assert all(t.caller.startswith("test_standin:") for t in rec.d2h())
    live = rec.live_bytes[0]
    del a
    assert rec.live_bytes[0] == live - 64
    assert cupy.get_default_memory_pool().total_bytes() == rec.peak_bytes[0]


def test_mpi_gets_device_buffers_only_cuda_aware_and_synchronised(cupy, monkeypatch):
    from mpi4py import MPI

    send = cupy.arange(4, dtype=cupy.float64)
    recv = cupy.zeros(4, dtype=cupy.float64)
    rec = cupy.standin.record
    rec.reset()
    monkeypatch.setenv("CUPY_STANDIN_CUDA_AWARE", "0")
    with pytest.raises(TypeError):  # a host-only MPI would read device addresses
        MPI.COMM_SELF.Allreduce(send, recv, op=MPI.SUM)
    assert rec.mpi_refused == 1 and rec.mpi_device_buffers == 0
    monkeypatch.setenv("CUPY_STANDIN_CUDA_AWARE", "1")
    with pytest.raises(TypeError):  # written by a stream not synchronised since
        MPI.COMM_SELF.Allreduce(send, recv, op=MPI.SUM)
    with pytest.raises(RuntimeError, match="not synchronised"):
        send.__cuda_array_interface__  # noqa: B018  (the reason mpi4py does not show)
    cupy.cuda.get_current_stream().synchronize()
    MPI.COMM_SELF.Allreduce(send, recv, op=MPI.SUM)
    assert cupy.asnumpy(recv).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert rec.mpi_refused == 3 and rec.mpi_device_buffers > 0


def test_devices_streams_events_and_runtime(cupy, monkeypatch):
    monkeypatch.setenv("CUPY_STANDIN_DEVICES", "2")
    assert cupy.cuda.runtime.getDeviceCount() == 2
    assert cupy.cuda.runtime.getDeviceProperties(1)["name"] == b"CuPy stand-in 1 (NumPy)"
    with pytest.raises(cupy.cuda.runtime.CUDARuntimeError):
        cupy.cuda.Device(2)
    with cupy.cuda.Device(1):
        b = cupy.ones(3)
    a = cupy.ones(3)
    with pytest.raises(ValueError, match="different from the current device"):
        a + b
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    a *= 2
    end.record()
    with pytest.raises(cupy.cuda.runtime.CUDARuntimeError, match="not ready"):
        cupy.cuda.get_elapsed_time(start, end)
    end.synchronize()
    start.synchronize()
    assert cupy.cuda.get_elapsed_time(start, end) >= 0.0


def test_phase_times_are_cuda_events_read_after_one_sync(cupy):
    """On CuPy the phase timer records an event pair per interval and reads them all
    after one synchronise when its seconds are read; no host clock is involved."""
    from mpiattn.core.model import PhaseTimer
    from mpiattn.core.timing import EVENTS, Timer

    rec = cupy.standin.record
    rec.reset()
    clock = Timer(cupy, clock=lambda: pytest.fail("a host clock read on the CuPy path"))
    assert clock.method == EVENTS
    timer = PhaseTimer(clock, ("attention", "sequence"))
    a = cupy.ones((64, 64))
    with timer("attention"):
        a = a @ a
        with timer("sequence"):
            a = a + 1
    assert rec.events == {"mpiattn.core.timing:mark": 4} and rec.elapsed == {}
    assert not cupy.cuda.get_current_stream().done  # the work is still queued
    syncs = rec.syncs
    seconds = timer.seconds
    assert rec.syncs == syncs + 1 and rec.elapsed == {"mpiattn.core.timing:elapsed": 2}
    assert seconds.keys() == {(0, "attention"), (0, "sequence")}
    assert all(v >= 0.0 for v in seconds.values()) and clock.intervals == 2
    assert timer.intervals == {(0, "attention"): 1, (0, "sequence"): 1}


@pytest.mark.parametrize("aware", [False, True])
def test_allgather_moves_device_blocks_direct_or_pinned(cupy, monkeypatch, aware):
    """ZeRO-1's gather (``CheckedAllgather``) of a device block: with CUDA-aware MPI no
    copy of the block at all, MPI reads device buffers, and the digests (sent and
    recomputed) come back in one copy; otherwise one pinned copy out and one back. A
    corrupted arrival is caught and sent again either way."""
    from mpi4py import MPI

    from mpiattn.core.checksum import Fault
    from mpiattn.parallel.transfers import CheckedAllgather, FaultPlan

    monkeypatch.setenv("CUPY_STANDIN_CUDA_AWARE", "1" if aware else "0")
    flip = Fault(rank=0, layer=1, site="zero", index=3, bit=30, where="result")
    gather = CheckedAllgather(MPI.COMM_SELF, faults=FaultPlan([flip], 0), cuda_aware=aware)
    block = cupy.arange(10, dtype=cupy.float32) * 0.5
    rec = cupy.standin.record
    for layer, attempts in ((0, 1), (1, 2)):  # layer 1: the flip, then the resend
        rec.reset()
        out = gather(block, site="zero", layer=layer)
        assert type(out) is cupy.ndarray and out.shape == (1, 10)
        assert cupy.asnumpy(out).tolist() == [[0.5 * i for i in range(10)]]
        moved = collections.Counter(f"{t.kind} {t.caller} {'pinned' if t.pinned else ''}"
                                    for t in rec.transfers if t.kind != "scalar"
                                    and t.caller.startswith("mpiattn.")
                                    and not t.caller.endswith(":_odd_constants"))  # cached
        if aware:
            assert moved == {"get mpiattn.parallel.transfers:_arrival_digests ": attempts}
            assert rec.mpi_device_buffers > 0 and not rec.d2h("scalar")
        else:
            assert moved == {"get mpiattn.parallel.transfers:_wire pinned": 1,
                             "asarray mpiattn.parallel.transfers:_arrived pinned": 1}
            assert rec.mpi_device_buffers == 0
    assert [(r.layer, r.retries, r.passed) for r in gather.records] == [(0, 0, True),
                                                                        (1, 1, True)]


def test_device_digests_equal_the_host_ones(cupy):
    """``digest64`` on the device (wrapping uint64 sums, one read) and ``digests64`` (one
    copy for a set of blocks) give the host's digests: a tail of odd bytes, several chunks."""
    from mpiattn.core import checksum

    rng = np.random.default_rng(6)
    for x in (rng.standard_normal(5).astype(np.float32),  # 20 bytes: a tail
              rng.standard_normal(checksum._CHUNK * 2 + 3)):  # two chunks and a tail
        assert checksum.digest64(cupy.asarray(x)) == checksum.digest64(x)
    blocks = rng.standard_normal((3, 4, 5))
    rec = cupy.standin.record
    rec.reset()
    got = checksum.digests64(cupy.asarray(blocks))
    np.testing.assert_array_equal(got, checksum.digests64(blocks))
    assert [t.kind for t in rec.d2h()] == ["get"]  # one copy for the three digests


def test_pooling_modes_on_the_standin_equal_numpy(cupy):
    """Every sentence-transformers pooling mode (and all at once, concatenated), Dense with
    each activation and Normalize on device arrays: float64 bit for bit with NumPy, on a
    batch with padding and an all-padding row."""
    from mpiattn.core.pooling import ACTIVATIONS, POOLING_MODES, Dense, Normalize, Pool

    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((3, 7, 5))
    mask = np.ones((3, 7), dtype=bool)
    mask[1, 4:] = False
    mask[2, :] = False  # nothing real: every mode's guard
    w, b = rng.standard_normal((5, 4)), rng.standard_normal(4)
    on_device = cupy.asarray(hidden), cupy.asarray(mask)
    for modes in [(m,) for m in POOLING_MODES] + [POOLING_MODES]:
        want = Pool(modes)(hidden, mask)
        got = Pool(modes)(*on_device)
        assert isinstance(got, cupy.ndarray), modes
        np.testing.assert_array_equal(got.get(), want, err_msg=str(modes))
    pooled = Pool(("mean",))(hidden, mask)
    for activation in ACTIVATIONS:
        step = Dense(w, b, activation)
        want, got = Normalize()(step(pooled)), Normalize()(step(cupy.asarray(pooled)))
        np.testing.assert_array_equal(got.get(), want, err_msg=activation)


def test_mpnet_relative_bias_on_the_standin_equals_numpy(cupy):
    """MPNet's relative position buckets (past the 128-token distance cap): bit for bit with
    NumPy; its bias in attention, batched (the rule on a GPU) against NumPy's groups of
    heads: float64 within rounding."""
    import types

    from mpiattn.core.attention import KeyMask, Options, heads_attention
    from mpiattn.core.model import with_relative_bias
    from mpiattn.core.ops import relative_buckets

    got = relative_buckets(300, cupy)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_array_equal(got.get(), relative_buckets(300, np))
    rng = np.random.default_rng(5)
    batch, seq, heads, d = 2, 11, 3, 4
    table = rng.standard_normal((32, heads))
    qkv = rng.standard_normal((batch * seq, 3 * heads * d))
    mask = np.ones((batch, seq), dtype=bool)
    mask[1, 7:] = False
    host = with_relative_bias(Options("plain"), types.SimpleNamespace(relative_bias=table), seq)
    device = with_relative_bias(Options("plain"),
                                types.SimpleNamespace(relative_bias=cupy.asarray(table)), seq)
    np.testing.assert_array_equal(device.position_bias.get(), host.position_bias)
    want = np.empty((batch * seq, heads * d))  # NumPy: groups of heads, at every length
    heads_attention(qkv, want, batch, seq, heads, d, KeyMask.from_mask(mask), host)
    out = cupy.empty((batch * seq, heads * d))  # the device: all heads batched
    heads_attention(cupy.asarray(qkv), out, batch, seq, heads, d,
                    KeyMask.from_mask(cupy.asarray(mask)), device)
    np.testing.assert_allclose(out.get(), want, rtol=1e-13, atol=1e-15)


def test_backend_selects_the_standin(cupy, monkeypatch):
    from mpiattn.core import backend
    from mpiattn.parallel.comm import cuda_aware_mpi

    monkeypatch.setattr(backend, "nvidia_driver_present", lambda: False)
    chosen = backend.select("cupy")
    assert chosen.is_gpu and chosen.xp is cupy
    assert chosen.device == "cuda:0 CuPy stand-in 0 (NumPy)"
    monkeypatch.delenv(backend.STANDIN_ENV, raising=False)
    assert backend.select("auto").name == "numpy"  # no driver, no switch: NumPy
    monkeypatch.setenv(backend.STANDIN_ENV, "1")
    assert backend.select("auto").name == "cupy"
    monkeypatch.setenv("CUPY_STANDIN_CUDA_AWARE", "1")
    assert cuda_aware_mpi()  # the simulated library answers
    monkeypatch.setenv("CUPY_STANDIN_DEVICES", "0")
    assert backend.select("auto").name == "numpy"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_tests_pass_on_the_standin(cupy, dtype):
    """tests/commands/test_gpu.py's device tests, which skip without a GPU, on the stand-in."""
    import test_gpu

    test_gpu.test_sharded_layer_on_gpu_equals_reference(dtype)
    test_gpu.test_checksum_arithmetic_stays_on_device()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the stand-in runs NumPy
def test_rotary_layers_on_the_standin(cupy):
    """ModernBERT's layers (RoPE with two bases, GeGLU, pre-LayerNorm, a window of +-2 in
    plain and blocked attention, padding out of every key's reach) and NomicBERT's
    (post-LayerNorm, SwiGLU, token types) on device arrays: the NumPy backend's numbers,
    and no call CuPy lacks or implicit host copy."""
    from mpiattn.core.attention import Options
    from mpiattn.core.model import Embeddings, LocalReduce, RotaryLayerShard, encoder_forward

    rng = np.random.default_rng(0)
    h, d, f, vocab = 12, 4, 10, 50

    def w(*shape: int) -> np.ndarray:
        return 0.5 * rng.standard_normal(shape)

    def layer(i: int) -> RotaryLayerShard:
        return RotaryLayerShard(
            w_qkv=w(h, 3 * h), b_qkv=w(3 * h), w_o=w(h, h), b_o=w(h),
            ln1_g=None if i == 0 else 1 + w(h), ln1_b=None if i == 0 else w(h),
            w_1=w(h, 2 * f), b_1=w(2 * f), w_2=w(f, h), b_2=w(h), ln2_g=1 + w(h),
            ln2_b=w(h), head_dim=d, rope_theta=(160_000.0, 10_000.0)[i], window=(None, 2)[i],
            final_g=1 + w(h) if i else None, final_b=w(h) if i else None)

    def nomic(_: int) -> RotaryLayerShard:
        return RotaryLayerShard(
            w_qkv=w(h, 3 * h), b_qkv=w(3 * h), w_o=w(h, h), b_o=w(h), ln1_g=1 + w(h),
            ln1_b=w(h), w_1=w(h, 2 * f), b_1=w(2 * f), w_2=w(f, h), b_2=w(h), ln2_g=1 + w(h),
            ln2_b=w(h), head_dim=d, rope_theta=1000.0, prenorm=False, act="silu")

    def device(obj: object) -> object:
        return type(obj)(**{k: cupy.asarray(v) if isinstance(v, np.ndarray) else v
                            for k, v in vars(obj).items()})

    models = [(Embeddings(w(vocab, h), None, None, 1 + w(h), w(h)), [layer(0), layer(1)]),
              (Embeddings(w(vocab, h), None, w(2, h), 1 + w(h), w(h)), [nomic(0), nomic(1)])]
    ids = rng.integers(0, vocab, (2, 9))
    types = rng.integers(0, 2, (2, 9))
    mask = np.ones(ids.shape, dtype=bool)
    mask[1, 3:] = False  # queries 6-8 of sequence 1 reach no real key
    for (emb, layers), impl in itertools.product(models, ("plain", "blocked")):
        want = encoder_forward(ids, mask, emb, layers, LocalReduce(np), 1e-5,
                               options=Options(impl, 4), types=types)
        got = encoder_forward(cupy.asarray(ids), cupy.asarray(mask), device(emb),
                              [device(p) for p in layers], LocalReduce(cupy), 1e-5,
                              options=Options(impl, 4), types=cupy.asarray(types))
        got = cupy.asnumpy(got)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got[mask], want[mask], rtol=1e-12, atol=1e-12)

# --- the whole job on 2 ranks, one launch (tests/standin_matrix.py) -------------------------

# CuPy-path lines that the matrix does not reach, by what the line holds, and why
NOT_REACHED = {
    "mpiattn/config.py": ("cuda_aware", '"backend"', "comm.cuda_aware"),  # declarations
    "mpiattn/commands/placement.py": ("cuda_aware: bool",),  # a field declaration
    "mpiattn/commands/seqbench.py": ("cumulative high-water",),  # the CPU's RSS branch
    "mpiattn/io/formats/common.py": ("cuda_aware: str",),  # a field declaration
    "mpiattn/commands/info.py": ("cupy",),  # `mpiattn info`: package metadata, no device
    "mpiattn/core/backend.py": ("raise ConfigError", "use auto, numpy or cupy",  # errors
                                'if name == "cupy":'),
    "mpiattn/parallel/comm.py": ("MPIX_Query_cuda_support", "restype", "bool(query())"),
}
ALLOWED_COPIES = {  # device -> host array copies, by the function that asks for them
    "mpiattn.parallel.comm:post": "staging of the checked Allreduce (not CUDA-aware)",
    "mpiattn.core.checksum:device_verdict": "a checked Allreduce's verdict: 1 copy for all",
    "mpiattn.core.checksum:digests64": "an all-to-all's block digests, one copy per set",
    "mpiattn.core.optim:squared_norms": "the gradient norm's two sums, one copy a step",
    "mpiattn.parallel.transfers:_wire": "p2p, all-to-all, ring, Allgather: pinned staging",
    "mpiattn.parallel.transfers:_arrival_digests": "a ring shift's or an Allgather's digests"
                                                   " (sent, recomputed): one copy (aware)",
    "mpiattn.commands.runner:on_layer": "per-layer outputs written to HDF5",
    "mpiattn.commands.runner:_run": "the pooled output",
    "mpiattn.commands.runner:gather_tokens": "token slices gathered for the output",
    "mpiattn.commands.encode:_forward": "pooled sentence embeddings of a text micro-batch",
    "mpiattn.core.headstats:host": "per-head statistics for the output file, once a run",
    "mpiattn.core.headstats:host_maps": "attention maps for the output file, once a run",
    "mpiattn.core.attention:from_mask": "the mask's lengths and prefix test, one copy a forward",
    "mpiattn.parallel.comm:check_finite": "a layer's two non-finite flags, one copy",
    "mpiattn.commands.train:_sum": "the step's loss and token counts",
    "mpiattn.commands.train:gather": "parameters for the checkpoint and export",
}


ALLOWED_UPLOADS = {  # host -> device copies, by the function that asks for them (a new one
    # is a new copy: once per run or forward, or staging, never once per layer)
    "mpiattn.parallel.comm:wait": "the staged Allreduce result back (not CUDA-aware)",
    "mpiattn.commands.placement:load_shards": "weights, once",
    "mpiattn.commands.runner:_run": "the batch's ids and mask, once",
    "mpiattn.core.attention:device_lengths": "a prefix mask's key lengths, once per forward",
    "mpiattn.core.checksum:_odd_constants": "the digest's constants, once (cached)",
    "mpiattn.commands.encode:_forward": "a text micro-batch's ids and mask",
    "mpiattn.commands.bench:_bench": "the benchmark's input, once",
    "mpiattn.commands.seqbench:bench_sequence": "the sweep's input, once per length",
    "mpiattn.commands.seqbench:ring_overlap": "the overlap's input, once per length",
    "mpiattn.commands.train:_device": "a training step's batch",
    "mpiattn.commands.train:_pipeline": "a pipelined step's positions and targets",
    "mpiattn.commands.train:_sum": "the step's loss and token counts, to be summed",
    "mpiattn.commands.train:build": "the initial parameters, once",
    "mpiattn.parallel.transfers:_arrived": "all-to-all, ring, Allgather: pinned staging back",
    "mpiattn.parallel.transfers:recv": "pipeline p2p: pinned staging back (not aware)",
}
# host clock reads while device work is queued (the stand-in's streams tell), and why they
# are harmless; any other is an interval that misses, or gains, device work
ALLOWED_CLOCKS = {
    "mpiattn.parallel.comm:start": "CheckedAllreduce.seconds, which no file reports",
    "mpiattn.parallel.comm:finish": "CheckedAllreduce.seconds, which no file reports",
    "mpiattn.commands.runner:_run": "the setup interval opens: earlier work is setup too",
    "mpiattn.commands.encode:__init__": "the setup interval opens: earlier work is setup too",
    "mpiattn.commands.encode:_progress": "the progress bar's tokens/s",
}


def launch(out, ranks, *args):
    """tests/standin_matrix.py on ``ranks`` ranks with the stand-in; its matrix.json."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{STANDIN}", OMP_NUM_THREADS="1")
    for name in ("MPIATTN_CUPY_STANDIN", "CUPY_STANDIN_DEVICES", "CUPY_STANDIN_CUDA_AWARE",
                 "CUPY_STANDIN_RECORD"):
        env.pop(name, None)
    done = subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpi4py",
                           str(ROOT / "tests/standin_matrix.py"), str(out), *args],
                          env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "matrix.json").read_text())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("standin"), 2)


def test_uneven_heads_on_three_ranks(tmp_path):
    """4 heads on 3 ranks (2, 1, 1): the same numbers, staging or device buffers."""
    small = launch(tmp_path, 3, "small")
    assert small["ranks"] == 3
    for job in ("run64", "run64-aware"):
        assert small[job]["diff"]["rel"] <= 1e-12
        assert small[job]["devices"] == ["cuda:0 CuPy stand-in 0 (NumPy)"] * 3
    for seen in small["run64"]["ranks"]:
        assert seen["copies"]["get mpiattn.parallel.comm:post pinned"] == 2 * 3
        assert seen["mpi_device_buffers"] == 0
    for seen in small["run64-aware"]["ranks"]:
        assert not any("comm:post" in key for key in seen["copies"])
        assert seen["mpi_device_buffers"] > 0


def test_outputs_equal_the_numpy_backend(matrix):
    # plain attention without statistics: NumPy runs groups of heads, the device one batched
    # product (within rounding); otherwise the same operations on both (bit for bit)
    for job, tol, count, same_ops in (
            ("run64", 1e-12, 4, False), ("run64-aware", 1e-12, 4, False),
            ("run32", 1e-5, 7, True),  # per-head statistics and a map: batched
            ("pipeline", 1e-12, 4, True), ("pipeline-aware", 1e-12, 4, True),  # blocked
            ("ulysses", 1e-12, 4, False), ("ulysses-aware", 1e-12, 4, False),  # plain
            ("ring", 1e-12, 4, True), ("ring-aware", 1e-12, 4, True)):
        diff = matrix[job]["diff"]
        print(f"{job}: max rel difference {diff['rel']:.2e} over {diff['count']} datasets")
        assert diff["count"] == count and diff["rel"] <= tol, job
        assert ("layers/00/attention" in diff["equal"]) == same_ops, job
    if "text" in matrix:  # a text corpus through real weights (mpiattn[model] installed)
        assert matrix["text"]["diff"]["rel"] <= 1e-5
    fault = matrix["fault"]  # a flipped bit in a device partial: caught, retried, clean
    assert fault["diff"]["rel"] <= 1e-12 and fault["retries"] == [0, 0, 1, 0]
    train = matrix["train"]["diff"]  # forward, backward, AdamW: float32 losses, bit for bit
    assert train["count"] == 4 and len(train["equal"]) == 4
    # 2 pipeline stages, device buffers to MPI, against the head-parallel NumPy training
    staged = matrix["train-pipeline-aware"]
    assert staged["diff"]["rel"] <= 1e-6 and "train/loss" in staged["diff"]["equal"]
    assert all(seen["mpi_device_buffers"] > 0 for seen in staged["ranks"])
    assert matrix["export_equal"] is True


def test_device_to_host_copies_are_staging_and_outputs_only(matrix):
    layers, warm_up = 2, 1  # each layer (and the warm-up pass) has two checked Allreduces
    for job in ("run64", "run64-aware", "run32", "pipeline", "ulysses", "ring", "bench",
                "train", "fault", "pipeline-aware", "ulysses-aware", "ring-aware",
                "train-pipeline-aware", "seqbench", "train-zero-aware",
                *(["text"] if "text" in matrix else [])):
        for rank, seen in enumerate(matrix[job]["ranks"]):
            callers = {key.split()[1] for key in seen["copies"]}
            assert callers <= ALLOWED_COPIES.keys(), (job, rank, seen["copies"])
            callers = {key.split()[1] for key in seen["uploads"]}
            assert callers <= ALLOWED_UPLOADS.keys(), (job, rank, seen["uploads"])
            for key in seen["copies"]:
                if key.split()[1] == "mpiattn.parallel.comm:post":
                    assert key.endswith(" pinned"), key  # staging is pinned
    for job in ("run64", "run32"):
        for seen in matrix[job]["ranks"]:
            staged = seen["copies"]["get mpiattn.parallel.comm:post pinned"]
            assert staged == 2 * (layers + warm_up) and seen["mpi_device_buffers"] == 0
            verdicts = seen["copies"]["get mpiattn.core.checksum:device_verdict pageable"]
            assert verdicts == staged  # one copy per checked Allreduce, not four reads
            assert seen["uploads"]["set mpiattn.parallel.comm:wait pinned"] == staged
            assert seen["uploads"]["asarray mpiattn.commands.runner:_run pageable"] == 2
    for job in ("run64", *(["text"] if "text" in matrix else [])):  # not once per layer
        for seen in matrix[job]["ranks"]:  # the mask's lengths and prefix test: one copy a
            forwards = seen["copies"]["get mpiattn.core.attention:from_mask pageable"]
            assert forwards == 1 or job != "run64"  # forward; the lengths stay on the device
            assert "asarray mpiattn.core.attention:device_lengths pageable" not in seen["uploads"]
            assert "mpiattn.core.attention:from_mask" not in seen["reads"]
            # a layer's two non-finite flags (attention, mlp): one copy, no blocking read
            flags = seen["copies"]["get mpiattn.parallel.comm:check_finite pageable"]
            depth = {"run64": layers, "text": 6}[job]  # all-MiniLM-L6-v2: 6 layers
            assert flags == depth * forwards, (job, flags, forwards)
            assert "mpiattn.parallel.comm:check_finite" not in seen["reads"]
    for seen in matrix["run32"]["ranks"]:  # statistics (3 arrays) and 2 maps: copied once
        assert seen["copies"]["get mpiattn.core.headstats:host pageable"] == 3
        assert seen["copies"]["get mpiattn.core.headstats:host_maps pageable"] == 2
    rank0 = matrix["run64"]["ranks"][0]["copies"]
    assert rank0["get mpiattn.commands.runner:on_layer pageable"] == 2 * layers  # attn, hidden
    for seen in matrix["run64-aware"]["ranks"]:  # CUDA-aware: device buffers, no staging
        assert not any("comm:post" in key for key in seen["copies"])
        assert seen["mpi_device_buffers"] > 0 and seen["pinned_bytes"] == 0


STAGE = "get mpiattn.parallel.transfers:_wire pinned"
DIGESTS = "get mpiattn.parallel.transfers:_arrival_digests pageable"


def test_moved_data_goes_device_direct_with_cuda_aware_mpi(matrix):
    """Pipeline p2p, Ulysses all-to-all and ring shifts (2 layers, 2 ranks): staged
    through pinned host buffers, one copy out and one in per transfer, when MPI is not
    CUDA-aware; with it, no copy at all, MPI reads device buffers, and the digests are
    read from the device once per digest set."""
    layers = 2
    staged = {"pipeline": [1, 0], "ulysses": [2 * layers] * 2, "ring": [layers] * 2}
    back = {"pipeline": ("set mpiattn.parallel.transfers:recv pinned", [0, 1]),
            "ulysses": ("asarray mpiattn.parallel.transfers:_arrived pinned", [2 * layers] * 2),
            "ring": ("asarray mpiattn.parallel.transfers:_arrived pinned", [layers] * 2)}
    for job, out in staged.items():
        key, into = back[job]
        for rank, seen in enumerate(matrix[job]["ranks"]):
            assert seen["copies"].get(STAGE, 0) == out[rank], (job, rank, seen["copies"])
            assert seen["uploads"].get(key, 0) == into[rank], (job, rank, seen["uploads"])
            assert seen["mpi_device_buffers"] == 0 and seen["pinned_bytes"] > 0
            assert "mpiattn.core.checksum:digest64" not in seen["reads"]  # hashed on the host
        for rank, seen in enumerate(matrix[f"{job}-aware"]["ranks"]):
            moved = [k for k in (*seen["copies"], *seen["uploads"])
                     if "transfers:" in k and DIGESTS not in k]
            assert not moved, (job, rank, moved)
            assert seen["mpi_device_buffers"] > 0 and seen["pinned_bytes"] == 0, (job, rank)
    for seen in matrix["ulysses-aware"]["ranks"]:  # sent and received digests: 2 copies
        assert seen["copies"]["get mpiattn.core.checksum:digests64 pageable"] == 2 * 2 * layers
    ring = matrix["ring-aware"]  # a received slice corrupted once: every rank resends it
    assert ring["retries"] == [0, 1, 0, 1] and ring["diff"]["rel"] <= 1e-12
    for seen in ring["ranks"]:  # per shift the sender's digest and the arrival's in one
        assert seen["copies"][DIGESTS] == layers + 1  # copy (+ the resent one), no read
        assert "mpiattn.core.checksum:digest64" not in seen["reads"]
    zero = matrix["train-zero-aware"]  # ZeRO-1 over 2 replicas: blocks device to device;
    assert zero["diff"]["rel"] <= 1e-6  # the losses summed over replicas: float32 rounding
    for rank, seen in enumerate(zero["ranks"]):
        moved = [k for k in (*seen["copies"], *seen["uploads"])
                 if "transfers:" in k and DIGESTS not in k]
        assert not moved and seen["pinned_bytes"] == 0, (rank, moved)
        assert seen["mpi_device_buffers"] > 0 and seen["copies"][DIGESTS] >= 2  # a step
    assert [seen["reads"].get("mpiattn.core.checksum:digest64", 0)  # the sender's digest
            for seen in matrix["pipeline-aware"]["ranks"]] == [0, 1]  # is a device word


def test_blocking_reads_merge_per_collective(matrix):
    """A checked Allreduce on a device reads its verdict (checksum figures, non-finite
    flag, hash) in one copy and nothing else; a training step reads its gradient norm's
    sums in one copy (not one read per tensor)."""
    for job, collectives in (("run64", 6), ("run64-aware", 6), ("fault", 7)):
        for seen in matrix[job]["ranks"]:
            assert seen["copies"]["get mpiattn.core.checksum:device_verdict pageable"] == (
                collectives)
            extra = {k for k in seen["reads"] if k.startswith(("mpiattn.parallel.comm:_",
                                                               "mpiattn.core.checksum"))}
            assert not extra, (job, seen["reads"])
    for seen in matrix["train"]["ranks"]:
        assert seen["copies"]["get mpiattn.core.optim:squared_norms pageable"] == 2  # steps
        assert "mpiattn.core.optim:squared_norms" not in seen["reads"]


def test_timings_never_close_around_queued_device_work(matrix):
    """Every interval a file reports is read after a synchronisation of the stream
    (setup, forward, steps, bench repeats, the busy time of text runs)."""
    assert set(matrix["unsynced_clock"]) <= ALLOWED_CLOCKS.keys(), matrix["unsynced_clock"]


CUPY_TIMED = ("run64", "run64-aware", "run32", "pipeline", "ulysses", "ring", "fault",
              "bench", "train", "pipeline-aware", "ulysses-aware", "ring-aware",
              "train-pipeline-aware", "seqbench", "train-zero-aware")


def test_phase_times_come_from_cuda_events(matrix):
    """Every phase of a CuPy job is timed by CUDA events (the stand-in saw two or more
    recorded in each interval), every event pair is read after a synchronise, the file
    says so, and no timer read a host clock (only bench's Allreduce sweep on host buffers)."""
    for job in (*CUPY_TIMED, *(["text"] if "text" in matrix else [])):
        assert matrix[job]["attrs"]["timing"] == "cuda events", job
        for rank, seen in enumerate(matrix[job]["ranks"]):
            marks = seen["events"].get("mpiattn.core.timing:mark", 0)
            reads = seen["elapsed"].get("mpiattn.core.timing:elapsed", 0)
            assert marks > 0 and reads > 0, (job, rank)
            if job == "seqbench":  # each layer's start bounds the layer and its block
                assert marks == 2 * reads - 3, (job, rank, marks, reads)  # 1 + 2 repeats
            elif not job.startswith("train"):  # a step's five marks bound four phases
                assert marks == 2 * reads, (job, rank, marks, reads)
                assert seen["phases"], (job, rank)
            for phase, (intervals, with_events) in seen["phases"].items():
                assert intervals == with_events > 0, (job, rank, phase)
            host = {who for who in seen["clock_reads"]
                    if who.startswith(("mpiattn.core.", "mpiattn.commands.benchkit",
                                       "mpiattn.commands.seqbench"))}
            assert host <= ({"mpiattn.core.timing:_host_clock"} if job == "bench" else set()), (
                job, rank, host)


def test_the_run_file_records_the_device(matrix):
    assert matrix["run64"]["devices"] == ["cuda:0 CuPy stand-in 0 (NumPy)"] * 2
    assert matrix["run64"]["attrs"] == {"backend": "cupy", "timing": "cuda events",
                                        "cuda_aware": "no (pinned host staging)"}
    assert matrix["run64-aware"]["attrs"]["cuda_aware"] == "yes"
    assert "float64, cupy (CUDA-aware MPI: yes)" in matrix["report"]
    assert ("devices   cuda:0 CuPy stand-in 0 (NumPy); times from cuda events"
            in matrix["report"])
    assert ("1 input(s) ran on CuPy devices (cuda:0 CuPy stand-in 0 (NumPy)); CUDA-aware MPI:"
            " yes; times from cuda events") in matrix["plan_notes"]
    assert all(r["peak_bytes"] > 0 for r in matrix["run64"]["ranks"])
    assert matrix["auto"] == "cupy"  # MPIATTN_CUPY_STANDIN=1 lets auto see the stand-in


def test_the_standin_offers_only_what_mpiattn_uses(matrix, cupy):
    """Each function, ufunc and array method of the stand-in is called by a job of the
    matrix or named as ``xp.NAME`` in the package: a name nobody uses is not offered."""
    named, called = set(), set()
    for path in (ROOT / "mpiattn").rglob("*.py"):
        text = path.read_text()
        named |= set(re.findall(r"\bxp\.([A-Za-z_0-9]+)", text))
        called |= {f"ndarray.{m}" for m in re.findall(r"\.([a-z_]+)\(", text)}
    offered = {*cupy._UFUNCS, *cupy._FUNCTION_NAMES, *cupy._CREATION,
               *(f"ndarray.{m}" for m in cupy._METHODS)}
    # a method only the in-process tests reach (pooling's lasttoken) is called by name
    unused = {n for n in offered if n not in matrix["api"] and n.split(".")[-1] not in named
              and n not in called}
    assert not unused, f"the stand-in offers what mpiattn does not use: {sorted(unused)}"


def test_every_cupy_branch_of_the_package_is_reached(matrix):
    lines = matrix["branch_lines"]
    missed = sorted(set(lines["targets"]) - set(lines["hit"]))
    assert len(lines["targets"]) >= 50  # the CuPy path is found at all
    unexplained = []
    for where in missed:
        path, number = where.rsplit(":", 1)
        text = (ROOT / path).read_text().splitlines()[int(number) - 1]
        if not any(s in text for s in NOT_REACHED.get(path, ())):
            unexplained.append(f"{where}: {text.strip()}")
    assert not unexplained, "CuPy-path lines no stand-in job reaches:\n" + "\n".join(unexplained)
    assert re.search(r"comm\.py:\d+", " ".join(lines["hit"]))
