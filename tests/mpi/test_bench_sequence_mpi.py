"""``mpiattn bench`` with sequence parallelism: every rank holds its token slice, the layer
is timed at each sweep length with Ulysses and with the ring; ``/bench/sequence`` holds
(rank, seq_len) seconds, transfer seconds and bytes, peak RSS and (ring) the hidden
fraction; the file verifies and ``report`` shows the table."""

import h5py
import numpy as np
import pytest
from helpers import TINY

from mpiattn import config
from mpiattn.analysis.report import report
from mpiattn.commands.bench import bench
from mpiattn.io.formats import open as open_file
from mpiattn.io.verify import verify

pytestmark = pytest.mark.mpi(min_size=2)
SWEEP = [24, 40]


def layouts(size):
    """(parallel.sequence, parallel.tensor): the whole world, and 2 x 2 at 4 ranks."""
    return [(size, 1)] + ([(2, 2)] if size == 4 else [])


@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
@pytest.mark.parametrize("case", range(2))
def test_bench_sequence(world, shared_dir, algorithm, case, capsys):
    found = layouts(world.Get_size())
    if case >= len(found):
        pytest.skip("one layout at this rank count")
    parts, tensor = found[case]
    cfg = config.from_dict({**TINY, "model.layers": 1, "input.batch": 2,
                            "parallel.sequence": parts, "parallel.tensor": tensor,
                            "attention.sequence": algorithm})
    path = shared_dir / f"bench-seq-{algorithm}{case}.h5"
    bench(cfg, world, str(path), True, 2, SWEEP, warmup=0)
    world.Barrier()
    if world.Get_rank() != 0:
        return
    out = capsys.readouterr().out
    assert "seq      40" in out and "peak RSS" in out
    assert verify(str(path)) == []
    n = world.Get_size()
    with h5py.File(path) as f:
        g = f["bench/sequence"]
        assert g.attrs["algorithm"] == algorithm and g.attrs["parts"] == parts
        assert list(g["seq_len"][()]) == SWEEP
        assert g["layer_seconds"].shape == (2,) and np.all(g["layer_seconds"][()] > 0)
        assert np.all(g["attention_block_seconds"][()] <= g["layer_seconds"][()])
        for name in ("rank_layer_seconds", "transfer_seconds", "transfer_bytes", "peak_rss"):
            assert g[name].shape == (n, 2), name
            assert np.all(g[name][()] > 0), name
            assert [d.label for d in g[name].dims] == ["rank", "seq_len"]
        assert g["peak_rss"].attrs["units"] == "bytes"
        assert g["seconds"].shape == (n, 2, 6)  # (rank, seq_len, phase) per layer
        if algorithm == "ring":  # K/V slices of (B, widest, 2, h, d) float32 per rank
            heads = 12 // tensor
            widest = -(-40 // parts)
            assert np.all(g["transfer_bytes"][:, 1] == (parts - 1) * 2 * widest * 2 * heads
                          * 8 * 4)
            hidden = g["overlap/hidden_fraction"][()]
            assert hidden.shape == (n, 2)
            assert np.all((hidden >= 0) & (hidden <= 1))
            assert np.all(g["overlap/shift_seconds"][()] > 0)
        else:
            assert "overlap" not in g
    with open_file(path) as f:
        table = f.sequence(raw=True)
        assert list(table["seq_len"]) == SWEEP and np.all(table["peak_rss"] > 0)
        assert ("hidden_fraction" in table) == (algorithm == "ring")
    assert report([str(path)], False, None, False, False) == 0
    shown = capsys.readouterr().out
    assert f"sequence  {algorithm} over parallel.sequence = {parts}" in shown
