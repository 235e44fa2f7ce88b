"""Checked ring shifts on N ranks: each rank receives the previous rank's array, n shifts
bring it home, shifts on different channels travel at once, a bit flipped in transit or in
a received copy is healed by one resend, a fault that persists stops every rank, and each
shift leaves one record."""

import numpy as np
import pytest

from mpiattn.core.checksum import Fault
from mpiattn.errors import IntegrityError
from mpiattn.parallel.transfers import CheckedRing, FaultPlan, RetryPolicy

pytestmark = pytest.mark.mpi(min_size=2)


def slice_of(rank: int, shape=(2, 3, 4), dtype=np.float64, seed=0) -> np.ndarray:
    return np.random.default_rng([seed, rank]).standard_normal(shape).astype(dtype)


def make(world, faults=(), retries=2, on_mismatch="retry"):
    return CheckedRing(world, RetryPolicy(on_mismatch, retries),
                       FaultPlan(list(faults), world.Get_rank()))


def shift(ring, x, site="kv", layer=0, channel=0):
    return ring.finish(ring.start(x, site=site, layer=layer, channel=channel))


@pytest.mark.parametrize(("shape", "dtype"), [((2, 3, 4), np.float64), ((2, 3, 4), np.float32),
                                              ((2, 1, 3, 2, 5), np.float32)])
def test_shift_delivers_the_previous_ranks_array(world, shape, dtype):
    size, rank = world.Get_size(), world.Get_rank()
    ring = make(world)
    out = shift(ring, slice_of(rank, shape, dtype), layer=3)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_array_equal(out, slice_of((rank - 1) % size, shape, dtype))
    (record,) = ring.records
    assert record.passed and record.retries == 0 and record.layer == 3 and record.site == "kv"


def test_n_shifts_bring_the_array_home(world):
    size, rank = world.Get_size(), world.Get_rank()
    ring = make(world)
    x = slice_of(rank)
    for step in range(1, size + 1):
        x = shift(ring, x)
        np.testing.assert_array_equal(x, slice_of((rank - step) % size))
    assert len(ring.records) == size and all(r.passed for r in ring.records)


@pytest.mark.parametrize("order", ["started", "reversed"])
def test_two_channels_in_flight_at_once(world, order):
    size, rank = world.Get_size(), world.Get_rank()
    ring = make(world)
    kv, dkv = slice_of(rank, seed=1), slice_of(rank, (5,), seed=2)
    a = ring.start(kv, site="kv", layer=0, channel=0)
    b = ring.start(dkv, site="dkv", layer=0, channel=1)
    if order == "started":
        got_a, got_b = ring.finish(a), ring.finish(b)
    else:
        got_b, got_a = ring.finish(b), ring.finish(a)
    np.testing.assert_array_equal(got_a, slice_of((rank - 1) % size, seed=1))
    np.testing.assert_array_equal(got_b, slice_of((rank - 1) % size, (5,), seed=2))
    assert [r.site for r in ring.records] == (["kv", "dkv"] if order == "started"
                                               else ["dkv", "kv"])


def test_channels_are_bounded(world):
    with pytest.raises(ValueError, match="channel 8"):
        make(world).start(slice_of(0), site="kv", layer=0, channel=8)


@pytest.mark.parametrize("where", ["send", "result"])
def test_a_flip_is_healed_by_one_resend(world, where):
    size, rank = world.Get_size(), world.Get_rank()
    clean = shift(make(world), slice_of(rank), layer=2)
    flip = Fault(rank=size - 1, layer=2, site="kv", index=7, bit=40, where=where)
    ring = make(world, [flip])
    x = slice_of(rank)
    healed = shift(ring, x, layer=2)
    np.testing.assert_array_equal(healed, clean)
    np.testing.assert_array_equal(x, slice_of(rank))  # the caller's payload is untouched
    (record,) = ring.records
    assert record.passed and record.retries == 1 and record.layer == 2


def test_a_fault_that_persists_stops_every_rank(world):
    size = world.Get_size()
    flip = Fault(rank=1, layer=4, site="kv", index=0, bit=3, times=10)  # rank 1's send
    ring = make(world, [flip], retries=2)
    with pytest.raises(IntegrityError, match=rf"ring shift at layer 4 site 'kv' .*"
                                             rf"sender->receiver 1->{2 % size}; gave up after 2"):
        shift(ring, slice_of(world.Get_rank()), layer=4)
    (record,) = ring.records
    assert record.passed is False and record.retries == 2


def test_abort_policy_does_not_retry(world):
    flip = Fault(rank=0, layer=0, site="kv", index=1, bit=1, where="result")
    ring = make(world, [flip], on_mismatch="abort")
    with pytest.raises(IntegrityError, match=rf"{world.Get_size() - 1}->0; gave up after 0"):
        shift(ring, slice_of(world.Get_rank()))
    assert ring.records[-1].passed is False and ring.records[-1].retries == 0


def test_the_wait_is_watched(world, monkeypatch):
    """Isend/Irecv return at once, so a watched communicator never sees the wait:
    ``finish`` reports it to the watchdog itself, naming the two neighbours."""
    import contextlib

    from mpiattn.parallel import watchdog

    seen = []

    @contextlib.contextmanager
    def waiting(operation, peers=""):
        seen.append((operation, peers))
        yield

    monkeypatch.setattr(watchdog, "waiting", waiting)
    size, rank = world.Get_size(), world.Get_rank()
    shift(make(world), slice_of(rank), channel=3)
    neighbours = sorted({(rank - 1) % size, (rank + 1) % size})
    assert seen == [("Waitall (ring shift, channel 3)", watchdog.rank_ranges(neighbours))]


def test_polling_a_large_shift_completes_it_before_the_wait(world):
    """``poll`` (MPI_Testall) moves a rendezvous-sized message while the caller computes:
    after enough polls the requests are done, and ``finish`` still checks and records it."""
    import time

    size, rank = world.Get_size(), world.Get_rank()
    ring = make(world)
    big = slice_of(rank, (256, 1024))  # 2 MiB: beyond every eager limit
    flight = ring.start(big, site="kv", layer=0)
    deadline = time.monotonic() + 120  # a bound on a hang, not a speed: load slows polls
    while any(flight.requests) and time.monotonic() < deadline:  # a request is true until done
        ring.poll(flight)
    assert not any(flight.requests)  # completed by the polls alone
    np.testing.assert_array_equal(ring.finish(flight), slice_of((rank - 1) % size, (256, 1024)))
    assert ring.records[-1].passed
