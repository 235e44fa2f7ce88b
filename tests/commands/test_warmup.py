"""The warm-up pass (``warmup``): work arrays made at the batch's size before the timed
forward, and the forward's numbers unchanged by it."""

import numpy as np
from helpers import tiny

from mpiattn.commands.warmup import warm_up
from mpiattn.core.attention import KeyMask, Options
from mpiattn.core.model import LocalReduce, layer_forward
from mpiattn.core.shard import head_shard
from mpiattn.io.weights import SeededWeights


def test_warm_up_makes_the_work_arrays_the_forward_uses_and_changes_no_number():
    m = tiny().model
    layer = SeededWeights(2, m, "float32").layer(0, head_shard(m.heads, m.hidden // m.heads,
                                                               m.ffn, 1, 0))
    batch, seq = 3, 16
    x = np.random.default_rng(0).standard_normal((batch, seq, m.hidden)).astype(np.float32)
    mask = KeyMask([seq] * batch)
    cold = layer_forward(x, layer, mask, LocalReduce(np), 0, 1e-12, options=Options())

    options = Options()
    warm_up(layer, options, LocalReduce(np), batch, seq, m.hidden, np.float32, 1e-12)
    assert options._scratch, "the warm-up pass made no work array"
    made = {key: buf for key, buf in options._scratch.items()}
    warm = layer_forward(x, layer, mask, LocalReduce(np), 0, 1e-12, options=options)
    for key, buf in options._scratch.items():  # big enough already: none was replaced
        assert buf is made[key], key
    for a, b in zip(cold, warm, strict=True):
        np.testing.assert_array_equal(a, b)
