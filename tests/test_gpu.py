"""The CuPy path: detection runs everywhere; numerics only where a CUDA device exists."""

import numpy as np
import pytest
from helpers import TOL, tiny

from mpiattn import backend, reference
from mpiattn.data import load_batch
from mpiattn.errors import ConfigError
from mpiattn.weights import open_source

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

    from mpiattn.model import LocalReduce, encoder_forward
    from mpiattn.shard import head_shard

    cfg = tiny(dtype=dtype)
    m = cfg.model
    batch = load_batch(cfg)
    source = open_source(cfg.seed, m, dtype)
    want = reference.forward(batch.ids, batch.mask, source, m)[1][-1]
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
    to_dev = cupy.asarray
    emb = type(source.embeddings())(*(to_dev(a) for a in vars(source.embeddings()).values()))
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

    from mpiattn import checksum

    part = cupy.asarray(np.random.default_rng(0).standard_normal((64, 16)), dtype=cupy.float32)
    buf = cupy.empty((66, 16), cupy.float64)
    checksum.append_checksums(part, buf)
    assert isinstance(buf, cupy.ndarray)
    assert checksum.residual_ratio(buf, 1)[2] <= 1.0
    host = cupy.asnumpy(part)
    assert checksum.digest64(part) == checksum.digest64(host)
