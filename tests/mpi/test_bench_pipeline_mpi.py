"""``mpiattn bench`` with pipeline stages: the pipelined forward is timed, per rank its
stage, its phases (``p2p`` and ``bubble`` among them) and its bubble fraction go to the
file, with GPipe's ideal (P-1)/(M+P-1); the file verifies; ``report`` shows the phases."""

import h5py
import numpy as np
import pytest
from helpers import TINY

from mpiattn import config
from mpiattn.analysis.report import report
from mpiattn.commands.bench import bench
from mpiattn.io.verify import verify

pytestmark = pytest.mark.mpi(min_size=2)


def layouts(size):
    """(stages, tensor, micro-batches): pipeline 2 (and 2 x 2 heads at 4 ranks and more)."""
    out = [(2, 1, 1), (2, 1, 3)] if size == 2 else []
    if size % 4 == 0:
        out.append((2, 2, 1))
    if size in (3, 5):
        out.append((size, 1, 2))
    return out or [(2, size // 2, 1)]


@pytest.mark.parametrize("case", range(3))
def test_bench_pipeline(world, shared_dir, case, capsys):
    found = layouts(world.Get_size())
    if case >= len(found):
        pytest.skip("fewer layouts at this rank count")
    stages, tensor, micro = found[case]
    cfg = config.from_dict({**TINY, "model.layers": max(4, stages), "input.batch": 6,
                            "parallel.pipeline": stages, "parallel.tensor": tensor,
                            "parallel.microbatches": micro})
    path = shared_dir / f"bench-pp{case}.h5"
    bench(cfg, world, str(path), True, 3, [])
    world.Barrier()
    if world.Get_rank() != 0:
        return
    out = capsys.readouterr().out
    assert "measured vs" in out and "ideal" in out
    assert verify(str(path)) == []
    with h5py.File(path) as f:
        g = f["bench/pipeline"]
        ideal = (stages - 1) / (micro + stages - 1)
        assert g.attrs["ideal_bubble_fraction"] == pytest.approx(ideal)
        assert g.attrs["stages"] == stages and g.attrs["microbatches"] == micro
        stage = g["stage"][()]
        assert sorted(set(stage.tolist())) == list(range(stages))
        fractions = g["bubble_fraction"][()]
        assert fractions.shape == (world.Get_size(),)
        assert np.all((fractions >= 0) & (fractions <= 1))
        assert 0 <= g.attrs["bubble_fraction"] <= 1
        assert g.attrs["time_per_layer_s"] > 0
        phases = list(f["bench/phases/seconds"].attrs["phases"])
        assert phases[-2:] == ["p2p", "bubble"]
        seconds = f["bench/phases/seconds"][()]
        last = stage == stages - 1
        if micro == 1:  # the last stage waits for every earlier stage's work
            assert np.all(seconds[last, phases.index("bubble")] > 0)
            assert np.all(fractions[last] > 0)
        assert np.all(seconds[stage < stages - 1, phases.index("p2p")] > 0)
    assert report([str(path)], False, None, False, False) == 0
    assert "bubble" in capsys.readouterr().out
