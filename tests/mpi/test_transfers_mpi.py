"""Checked Allgather, Alltoall and point-to-point transfers on N ranks: the data arrives
intact, a bit flipped in transit or in a received copy is caught and healed by a retry, a
fault that persists stops every rank taking part, and each transfer leaves one record."""

import numpy as np
import pytest

from mpiattn.core.checksum import Fault
from mpiattn.errors import IntegrityError
from mpiattn.parallel.transfers import (
    CheckedAllgather,
    CheckedAlltoall,
    CheckedP2P,
    FaultPlan,
    RetryPolicy,
)

pytestmark = pytest.mark.mpi(min_size=2)


def block_of(rank: int, shape=(3, 5), seed=0) -> np.ndarray:
    return np.random.default_rng([seed, rank]).standard_normal(shape)


def make(kind, world, faults=(), retries=2, on_mismatch="retry"):
    return kind(world, RetryPolicy(on_mismatch, retries), FaultPlan(list(faults),
                                                                     world.Get_rank()))


@pytest.mark.parametrize("where", ["send", "result"])
def test_allgather_delivers_every_block_and_heals_a_flip(world, where):
    size, rank = world.Get_size(), world.Get_rank()
    clean = make(CheckedAllgather, world)
    out = clean(block_of(rank), site="x", layer=0)
    for r in range(size):
        np.testing.assert_array_equal(out[r], block_of(r))
    flip = Fault(rank=size - 1, layer=2, site="x", index=7, bit=40, where=where)
    healed = make(CheckedAllgather, world, [flip])
    again = healed(block_of(rank), site="x", layer=2)
    np.testing.assert_array_equal(again, out)
    (record,) = healed.records
    assert record.passed and record.retries == 1 and record.layer == 2


def test_allgather_fault_that_persists_stops_every_rank(world):
    flip = Fault(rank=0, layer=0, site="x", index=0, bit=3, times=10)
    gather = make(CheckedAllgather, world, [flip], retries=1)
    with pytest.raises(IntegrityError, match=r"hash mismatch in the Allgather .* 0->"):
        gather(block_of(world.Get_rank()), site="x", layer=0)
    assert gather.records[-1].passed is False


@pytest.mark.parametrize("where", ["send", "result"])
def test_alltoall_routes_block_j_to_rank_j_and_heals_a_flip(world, where):
    size, rank = world.Get_size(), world.Get_rank()
    mine = np.stack([block_of(rank * 100 + j) for j in range(size)])
    out = make(CheckedAlltoall, world)(mine, site="qkv", layer=1)
    for s in range(size):
        np.testing.assert_array_equal(out[s], block_of(s * 100 + rank))
    flip = Fault(rank=0, layer=1, site="qkv", index=5, bit=62, where=where)
    healed = make(CheckedAlltoall, world, [flip])
    np.testing.assert_array_equal(healed(mine, site="qkv", layer=1), out)
    assert healed.records[0].retries == 1 and healed.records[0].passed


def test_alltoall_abort_policy_does_not_retry(world):
    size, rank = world.Get_size(), world.Get_rank()
    mine = np.stack([block_of(rank * 100 + j) for j in range(size)])
    flip = Fault(rank=1, layer=0, site="qkv", index=0, bit=1)
    strict = make(CheckedAlltoall, world, [flip], on_mismatch="abort")
    with pytest.raises(IntegrityError, match="gave up after 0 retries"):
        strict(mine, site="qkv", layer=0)


@pytest.mark.parametrize("where", ["send", "result"])
def test_point_to_point_along_a_chain_heals_a_flip(world, where):
    """Every rank passes a tensor to the next, as pipeline stages do."""
    size, rank = world.Get_size(), world.Get_rank()
    flip = Fault(rank=0 if where == "send" else 1, layer=4, site="activations", index=3,
                 bit=52, where=where)
    p2p = make(CheckedP2P, world, [flip])
    x = block_of(0, (4, 6))
    if rank > 0:
        x = p2p.recv(np.empty((4, 6)), rank - 1, site="activations", layer=4) + 1.0
    if rank < size - 1:
        p2p.send(x, rank + 1, site="activations", layer=4)
    np.testing.assert_array_equal(x, block_of(0, (4, 6)) + rank)
    if rank > 0:
        (record,) = p2p.records
        assert record.passed and record.retries == (1 if rank == 1 else 0)


def test_point_to_point_fault_that_persists_ends_both_sides(world):
    rank = world.Get_rank()
    flip = Fault(rank=0, layer=0, site="activations", index=0, bit=9, times=5)
    p2p = make(CheckedP2P, world, [flip], retries=2)
    if rank == 0:
        with pytest.raises(IntegrityError, match="from rank 0 to rank 1; gave up after 2"):
            p2p.send(block_of(0), 1, site="activations", layer=0)
    elif rank == 1:
        with pytest.raises(IntegrityError, match="from rank 0 to rank 1"):
            p2p.recv(np.empty((3, 5)), 0, site="activations", layer=0)
        assert p2p.records[-1].passed is False and p2p.records[-1].retries == 2
    world.Barrier()
