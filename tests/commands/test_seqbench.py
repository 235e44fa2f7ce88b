"""The sequence-parallel bench's pieces without MPI: the hidden-fraction formula, the
transfer stopwatch, the no-communication ring, the sweep check, and /bench/sequence
written and read back (dimensions, units, the reader's table)."""

import h5py
import numpy as np
import pytest
from helpers import tiny

from mpiattn.commands.seqbench import (
    LocalRing,
    TimedTransfer,
    check_sweep,
    hidden_fraction,
    peak_rss,
)
from mpiattn.core.timing import Timer
from mpiattn.errors import ConfigError
from mpiattn.io import formats as files
from mpiattn.io.formats.bench import SequenceBenchResult, write_sequence_bench


def test_hidden_fraction():
    assert hidden_fraction(10.0, 10.0, 2.0) == 1.0  # the transfers cost nothing extra
    assert hidden_fraction(12.0, 10.0, 2.0) == 0.0  # all of it exposed
    assert hidden_fraction(11.0, 10.0, 2.0) == pytest.approx(0.5)
    assert hidden_fraction(9.0, 10.0, 2.0) == 1.0  # noise: clipped
    assert hidden_fraction(20.0, 10.0, 2.0) == 0.0
    assert np.isnan(hidden_fraction(1.0, 1.0, 0.0))


class Echo:
    def __init__(self):
        self.records = ["r"]

    def __call__(self, blocks, *, site, layer):
        return blocks

    def start(self, payload, *, site, layer, channel=0):
        return payload

    def poll(self, shift):
        self.polled = shift

    def finish(self, shift):
        return shift


def test_timed_transfer_counts_sent_bytes_and_intervals():
    """Each call is an interval of the clock's marks (CUDA events on CuPy), kept until the
    layer is done; a fake host clock ticking 1 s a read gives each 1 s."""
    ticks = iter(range(100))
    t = TimedTransfer(Echo(), Timer(clock=lambda: float(next(ticks))))
    blocks = np.zeros((4, 10), np.float32)  # 4 ranks: 3 of the 4 blocks leave
    t(blocks, site="alltoall.qkv", layer=0)
    assert t.sent == 3 * 40
    t.finish(t.start(np.zeros(5, np.float64), site="ring.kv", layer=0))
    assert t.sent == 3 * 40 + 40 and t.records == ["r"]
    assert t.clock.elapsed(t.spans) == [1.0, 1.0, 1.0]  # Alltoall, start, finish
    t.poll("shift")  # the ring's block loops reach the real transfer's poll through it
    assert t.inner.polled == "shift"
    t.reset()
    assert t.spans == [] and t.sent == 0


def test_local_ring_returns_a_copy():
    a = np.arange(6.0)
    got = LocalRing().finish(LocalRing().start(a, site="ring.kv", layer=0))
    assert np.array_equal(got, a) and got is not a


def test_check_sweep():
    cfg = tiny(parallel__sequence=4)
    assert check_sweep(cfg, []) == [24]
    assert check_sweep(cfg, [40, 8, 40]) == [8, 40]
    with pytest.raises(ConfigError, match="--sweep length 3"):
        check_sweep(cfg, [3, 8])


def test_peak_rss_is_positive():
    assert peak_rss() > 1 << 20


@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_written_and_read_back(tmp_path, algorithm):
    ranks, seqs = 3, np.array([16, 64])
    per = np.arange(1.0, 7.0).reshape(ranks, 2)
    ring = algorithm == "ring"
    r = SequenceBenchResult(
        algorithm, ranks, seqs, np.array([1.0, 2.0]), np.array([0.5, 1.5]),
        np.array([1e9, 4e9]), np.array([5e8, 3e9]), per, per / 2, per * 1e9, per / 10,
        (per * 1000).astype(np.int64), (per * 2**30).astype(np.int64), "VmHWM reset per point",
        np.ones((ranks, 2, 6)), per if ring else per * np.nan, per / 2, per / 4,
        np.full((ranks, 2), 0.25 if ring else np.nan), 1, 3, "abft")
    path = tmp_path / "b.h5"
    with h5py.File(path, "w") as fh:
        fh.attrs["command"] = "bench"
        write_sequence_bench(fh, r)
    with h5py.File(path) as fh:
        g = fh["bench/sequence"]
        assert [d.label for d in g["peak_rss"].dims] == ["rank", "seq_len"]
        assert g["peak_rss"].attrs["units"] == "bytes"
        assert g["layer_flops_per_second"].attrs["units"] == "1/s"
        assert g["transfer_seconds"].attrs["units"] == "s"
        assert list(g["seq_len"][()]) == [16, 64]
        assert ("overlap" in g) == ring
    with files.open(path) as f:
        table = f.sequence(raw=True)
        assert f.sequence_attrs()["algorithm"] == algorithm
    assert list(table["seq_len"]) == [16, 64]
    assert np.allclose(table["layer_flops_per_second"], [1e9, 2e9])
    assert np.allclose(table["peak_rss"], per[-1] * 2**30)  # the largest rank
    assert np.allclose(table["transfer_share"], (per / 10 / per).mean(axis=0))
    assert ("hidden_fraction" in table) == ring
