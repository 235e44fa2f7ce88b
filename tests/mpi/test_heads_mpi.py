"""Per-head attention statistics and maps of ``mpiattn run`` on N ranks (uneven head
splits, data-parallel replicas, pipeline stages) equal a one-process computation from the
reference's probabilities."""

import h5py
import numpy as np
import pytest
from helpers import TINY, TOL, dim_names, direct_head_stats

from mpiattn import config
from mpiattn.commands.runner import run
from mpiattn.core import reference
from mpiattn.errors import ConfigError
from mpiattn.inputs.data import load_batch
from mpiattn.io.verify import verify
from mpiattn.io.weights import open_source

pytestmark = pytest.mark.mpi(min_size=2)

SEVEN = {"model.heads": 7, "model.hidden": 56, "input.batch": 5, "dtype": "float64",
         "output.head_stats": True, "output.attention_maps": [4, 1]}


def layouts(size):
    """(name, overrides): all ranks on 7 heads (4,3 / 3,2,2 / 2,2,2,1 / 2,2,1,1,1), all on
    the batch, and with an even world two pipeline stages (micro-batches, blocked kernel)."""
    out = [("heads", {"parallel.tensor": size}),
           ("data", {"parallel.tensor": 1, "attention.impl": "blocked", "attention.block": 7})]
    if size % 2 == 0:
        out.append(("pipeline", {"parallel.pipeline": 2, "parallel.microbatches": 2,
                                 "parallel.tensor": size // 2, "parallel.overlap": 2}))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_head_stats_equal_one_process_computation(world, shared_dir, dtype):
    size = world.Get_size()
    for name, extra in layouts(size):
        cfg = config.from_dict({**TINY, **SEVEN, "dtype": dtype, **extra})
        path = shared_dir / f"heads-{name}-{dtype}.h5"
        run(cfg, world, str(path), True)
        world.Barrier()
        if world.Get_rank() != 0:
            continue
        batch = load_batch(cfg)
        probs: list = []
        reference.forward(batch.ids, batch.mask, open_source(cfg.seed, cfg.model, "float64"),
                          cfg.model, probabilities=probs)
        with h5py.File(path) as f:
            g = f["heads"]
            entropy, distance, maps = g["entropy"][()], g["distance"][()], g["maps"][()]
            assert dim_names(g["entropy"]) == ["layer", "head"]
            assert g["entropy"].attrs["units"] == g["distance"].attrs["units"] == "1"
            assert "nats" in g["entropy"].attrs["long_name"]
            assert "token positions" in g["distance"].attrs["long_name"]
            assert g.attrs["query_tokens"] == batch.mask.sum()
            assert list(g["sequences"][()]) == [4, 1]
            assert maps.dtype == np.dtype(dtype)
            partition = [int(n) for n in f.attrs["head_partition"]]
        worst = 0.0
        for layer in range(cfg.model.layers):
            want_h, want_d = direct_head_stats(probs[layer], batch.mask)
            worst = max(worst, reference.relative_error(entropy[layer], want_h),
                        reference.relative_error(distance[layer], want_d),
                        *(reference.relative_error(maps[i, layer], probs[layer][seq])
                          for i, seq in enumerate((4, 1))))
        print(f"size={size} {name} heads per rank {partition} {dtype}: max rel error"
              f" {worst:.2e}")
        assert worst <= TOL[dtype]
        assert verify(path) == []


def test_maps_alone_and_bad_index(world, shared_dir):
    """Maps without statistics; an index past the batch stops every rank before work."""
    cfg = config.from_dict({**TINY, **SEVEN, "output.head_stats": False,
                            "output.attention_maps": [0]})
    path = shared_dir / "maps.h5"
    run(cfg, world, str(path), True)
    world.Barrier()
    if world.Get_rank() == 0:
        with h5py.File(path) as f:
            assert "entropy" not in f["heads"] and f["heads/maps"].shape[:2] == (1, 2)
        assert verify(path) == []
    cfg = config.from_dict({**TINY, **SEVEN, "output.attention_maps": [5]})
    with pytest.raises(ConfigError, match=r"sequence\(s\) \[5\], but the input has 5"):
        run(cfg, world, str(shared_dir / "bad.h5"), True)
