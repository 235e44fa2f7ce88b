"""The float64 wire on NumPy ranks (``comm.SplitSum``): blocks of rows summed in float64 by
their owner, checked, rounded and shared point to point. The result is the rank-ordered
float64 sum rounded once; a flip at any bit class is caught and healed by one retry; fewer
rows than ranks go through the Allreduce as before. Each test runs with chunks of two rows
as well (the block's checksum rows and its sum go chunk by chunk through cache)."""

import numpy as np
import pytest

from mpiattn.core import checksum
from mpiattn.core.backend import select
from mpiattn.core.checksum import Fault
from mpiattn.parallel.comm import CheckedAllreduce

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(autouse=True, params=["one-chunk", "two-row-chunks"])
def chunk(request, monkeypatch):
    if request.param == "two-row-chunks":
        monkeypatch.setattr(checksum, "SPLIT_CHUNK", 2 * 7)  # 7 columns below


def reducer(world, faults=()):
    return CheckedAllreduce(comm=world, backend=select("numpy"), faults=list(faults),
                            world_rank=world.Get_rank(),
                            group_ranks=list(range(world.Get_size())))


def partials(world, rows=13, cols=7):
    """Every rank's partial (the same on every rank, so each can compute the answer)."""
    return [np.random.default_rng([9, r]).standard_normal((rows, cols)).astype(np.float32)
            * np.float32(10.0 ** (r % 3)) for r in range(world.Get_size())]


def rank_ordered_sum(parts):
    total = parts[0].astype(np.float64)
    for p in parts[1:]:
        total += p
    return total.astype(np.float32)


def test_sum_is_the_rank_ordered_float64_sum_rounded_once(world):
    parts = partials(world)
    red = reducer(world)
    got = red(parts[world.Get_rank()].copy(), site="mlp", layer=0)
    np.testing.assert_array_equal(got, rank_ordered_sum(parts))
    (record,) = red.records
    assert record.passed and record.retries == 0 and record.ratio <= 1.0


@pytest.mark.parametrize("bit", [31, 30, 25, 22, 12, 0])
def test_a_flip_in_transit_is_caught_and_healed(world, bit):
    parts = partials(world)
    for p in parts:
        p[2, 3] = np.float32(1.25)  # the flipped element: not small next to its column
    rank = world.Get_size() - 1
    fault = Fault(rank=rank, layer=4, site="attention", index=2 * 7 + 3, bit=bit)
    red = reducer(world, [fault])
    got = red(parts[world.Get_rank()].copy(), site="attention", layer=4)
    np.testing.assert_array_equal(got, rank_ordered_sum(parts))
    (record,) = red.records
    assert record.passed and record.retries == 1


def test_a_result_flip_is_seen_by_the_hash(world):
    parts = partials(world)
    red = reducer(world, [Fault(rank=0, layer=1, site="mlp", index=5, bit=0,
                                where="result")])
    got = red(parts[world.Get_rank()].copy(), site="mlp", layer=1)
    np.testing.assert_array_equal(got, rank_ordered_sum(parts))
    assert red.records[0].retries == 1


def test_fewer_rows_than_ranks_use_the_allreduce(world):
    parts = partials(world, rows=1)
    red = reducer(world)
    got = red(parts[world.Get_rank()].copy(), site="mlp", layer=0)
    np.testing.assert_allclose(got, rank_ordered_sum(parts), rtol=1e-6)
    assert red.records[0].passed


@pytest.mark.parametrize("fires", [False, True])
def test_two_slots_in_flight_keep_their_own_payloads(world, fires):
    """``parallel.overlap``: slot 1 is posted before slot 0 completes. With faults
    configured each slot sends (and sums its own block from) a copy of its own: a fault
    that never fires costs no retry, one that fires on layer 3 costs a retry there only."""
    fault = Fault(rank=0, layer=3 if fires else 99, site="mlp", index=2, bit=30)
    red = reducer(world, [fault])
    me = world.Get_rank()
    slots = [partials(world, rows=8 + slot, cols=7) for slot in (0, 1)]
    for layer in (2, 3):
        handles = [red.start(parts[me].copy(), site="mlp", layer=layer, slot=slot)
                   for slot, parts in enumerate(slots)]
        for parts, handle in zip(slots, handles, strict=True):
            np.testing.assert_array_equal(red.finish(handle), rank_ordered_sum(parts))
    retries = [(r.layer, r.retries) for r in red.records]
    assert retries == [(2, 0), (2, 0), (3, int(fires)), (3, int(fires))]
