"""The warm-up pass through a checked Allreduce leaves no record and fires no fault: the
job's first layer still sees its configured flip, caught and healed by one retry."""

import numpy as np
import pytest
from helpers import tiny

from mpiattn.commands.warmup import warm_up
from mpiattn.core.attention import KeyMask, Options
from mpiattn.core.backend import select
from mpiattn.core.checksum import Fault
from mpiattn.core.model import layer_forward
from mpiattn.core.shard import head_shard
from mpiattn.io.weights import SeededWeights
from mpiattn.parallel.comm import CheckedAllreduce

pytestmark = pytest.mark.mpi(min_size=2)


def test_warm_up_keeps_no_record_and_leaves_layer_0_faults_to_layer_0(world):
    size, rank = world.Get_size(), world.Get_rank()
    m = tiny().model
    tensor = min(size, m.heads)
    heads = world.Split(color=0 if rank < tensor else 1, key=rank)
    if rank >= tensor:
        heads.Free()
        return
    fault = Fault(rank=0, layer=0, site="mlp", index=5, bit=27)
    reduce = CheckedAllreduce(comm=heads, backend=select("numpy"), faults=[fault],
                              world_rank=rank, group_ranks=list(range(tensor)))
    layer = SeededWeights(1, m, "float32").layer(
        0, head_shard(m.heads, m.hidden // m.heads, m.ffn, tensor, rank))
    batch, seq = 2, 8
    options = Options()
    warm_up(layer, options, reduce, batch, seq, m.hidden, np.float32, 1e-12)
    assert reduce.records == [] and reduce.seconds == 0.0
    x = np.random.default_rng(3).standard_normal((batch, seq, m.hidden)).astype(np.float32)
    layer_forward(x, layer, KeyMask([seq] * batch), reduce, 0, 1e-12, options=options)
    got = {(r.layer, r.site): (r.passed, r.retries) for r in reduce.records}
    assert got == {(0, "attention"): (True, 0), (0, "mlp"): (True, 1)}
    heads.Free()
