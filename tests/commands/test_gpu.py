"""The CuPy path: detection runs everywhere; numerics only where a CUDA device exists."""

import numpy as np
import pytest
from helpers import TOL, tiny

from mpiattn.core import backend, reference
from mpiattn.errors import ConfigError
from mpiattn.inputs.data import load_batch
from mpiattn.io.weights import open_source

HAS_GPU = backend.cupy_device_count() > 0
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CuPy and a CUDA device")


def test_auto_falls_back_to_numpy_without_a_device():
    if HAS_GPU:
        pytest.skip("a device is present")
    assert backend.select("auto").name == "numpy"
    with pytest.raises(ConfigError, match="no CUDA device"):
        backend.select("cupy")


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sharded_layer_on_gpu_equals_reference(dtype):
    import cupy

    from mpiattn.core.model import LocalReduce, encoder_forward
    from mpiattn.core.shard import head_shard

    cfg = tiny(dtype=dtype)
    m = cfg.model
    batch = load_batch(cfg)
    source = open_source(cfg.seed, m, dtype)
    want = reference.forward(batch.ids, batch.mask, source, m)[1][-1]
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
    to_dev = cupy.asarray
    emb = type(source.embeddings())(*(to_dev(a) if isinstance(a, np.ndarray) else a
                                      for a in vars(source.embeddings()).values()))
    layers = []
    for i in range(m.layers):
        lp = source.layer(i, shard)
        layers.append(type(lp)(**{k: v if k == "head_dim" else to_dev(v)
                                  for k, v in vars(lp).items()}))
    got = encoder_forward(to_dev(batch.ids), to_dev(batch.mask), emb, layers,
                          LocalReduce(cupy), m.layer_norm_eps)
    assert reference.relative_error(cupy.asnumpy(got), want) <= TOL[dtype]


@gpu
def test_checksum_arithmetic_stays_on_device():
    import cupy

    from mpiattn.core import checksum

    part = cupy.asarray(np.random.default_rng(0).standard_normal((64, 16)), dtype=cupy.float32)
    buf = cupy.empty((66, 16), cupy.float64)
    checksum.append_checksums(part, buf)
    assert isinstance(buf, cupy.ndarray)
    assert checksum.residual_ratio(buf, 1)[2] <= 1.0
    host = cupy.asnumpy(part)
    assert checksum.digest64(part) == checksum.digest64(host)


def test_auto_does_not_import_cupy_without_a_driver(monkeypatch):
    """On a CPU node ``auto`` never imports CuPy (its import alone is ~150 MiB per rank)."""
    import subprocess
    import sys

    code = ("import sys; from mpiattn.core import backend; backend.nvidia_driver_present = lambda:"
            " False; b = backend.select('auto'); print(b.name, 'cupy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240)
    assert done.stdout.split() == ["numpy", "False"], done.stderr


def test_a_device_that_fails_its_test_computation_falls_back_in_one_line(monkeypatch,
                                                                          capsys):
    monkeypatch.setattr(backend, "nvidia_driver_present", lambda: True)
    monkeypatch.setattr(backend, "cupy_device_count", lambda: 2)
    monkeypatch.setattr(backend, "probe_device",
                        lambda index: f"OSError: libcublas.so.12 not found (device {index})")
    assert backend.select("auto", local_rank=3).name == "numpy"
    assert capsys.readouterr().err == ""  # only local rank 0 says it
    assert backend.select("auto", local_rank=0).name == "numpy"
    line = capsys.readouterr().err.strip()
    assert line.startswith("mpiattn: note: CUDA device 0 fails") and "libcublas" in line
    assert "\n" not in line
    with pytest.raises(ConfigError, match="device 1 fails a test computation.*libcublas"):
        backend.select("cupy", local_rank=1)


@pytest.mark.skipif(HAS_GPU, reason="a device is present")
def test_probe_reports_why_a_device_cannot_compute():
    reason = backend.probe_device(0)
    assert reason is not None and "\n" not in reason and len(reason) <= 200


@pytest.mark.parametrize("library", ["cublas", "curand", "nvrtc"])
def test_cupys_cuda_libraries_load_without_a_device(library):
    """The gpu extra brings the CUDA libraries CuPy's GEMMs, random numbers and compiled
    kernels load (cupy-cuda13x[ctk]); without them the first GEMM on a GPU node fails."""
    cupy = pytest.importorskip("cupy")
    if getattr(cupy, "__standin__", None):
        pytest.skip("the CuPy stand-in (tests/standin) has no CUDA libraries")
    module = getattr(cupy.cuda, library)
    version = module.getVersion(0) if library == "cublas" else module.getVersion()
    assert version
