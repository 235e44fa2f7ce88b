"""Pipeline stages in ``mpiattn run``: every layout of stages x head ranks x replicas that
fits the world equals the one-process reference, with uneven layer splits and several
micro-batches; a bit flipped in a message between stages is caught, resent, and the output
is bit-identical to a clean run."""

import h5py
import numpy as np
import pytest
from helpers import TINY, TOL

from mpiattn import config
from mpiattn.commands.runner import run
from mpiattn.core import reference
from mpiattn.core.pipeline import stage_layers
from mpiattn.inputs.data import load_batch
from mpiattn.io.collectives import site_names
from mpiattn.io.weights import open_source

pytestmark = pytest.mark.mpi(min_size=2)

LAYERS = 5  # uneven on 2, 3 and 4 stages


def layouts(size):
    """(stages, tensor, micro-batches) with stages x tensor dividing the world."""
    out = []
    for stages in range(2, min(size, LAYERS) + 1):
        if size % stages:
            continue
        per_stage = size // stages
        for tensor in sorted({1, per_stage}):
            out.append((stages, tensor, 1 + (stages + tensor) % 3))
    return out


def job(world, folder, name, **flat):
    cfg = config.from_dict({**TINY, "model.layers": LAYERS, "input.batch": 6, **flat})
    run(cfg, world, str(folder / name), True)
    world.Barrier()
    return cfg, folder / name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stages_equal_the_reference(world, shared_dir, dtype):
    size = world.Get_size()
    for n, (stages, tensor, micro) in enumerate(layouts(size)):
        cfg, path = job(world, shared_dir, f"pp{n}-{dtype}.h5", dtype=dtype,
                        **{"parallel.pipeline": stages, "parallel.tensor": tensor,
                           "parallel.microbatches": micro})
        if world.Get_rank() != 0:
            continue
        batch = load_batch(cfg)
        attn, hidden = reference.forward(batch.ids, batch.mask,
                                         open_source(cfg.seed, cfg.model, cfg.dtype), cfg.model)
        with h5py.File(path) as f:
            worst = max(max(reference.relative_error(f[f"layers/{i:02d}/attention"][()],
                                                     attn[i]),
                            reference.relative_error(f[f"layers/{i:02d}/hidden"][()],
                                                     hidden[i]))
                        for i in range(LAYERS))
            assert f.attrs["pipeline_parallel"] == stages
            assert list(f["timings/seconds"].attrs["phases"])[-2:] == ["p2p", "bubble"]
            sites = site_names(f["checksum/collectives"][()])
            assert (sites == b"activations").sum() == (stages - 1) * micro * (size // stages)
        print(f"{size} ranks = {stages} stages x {tensor} head x {size // stages // tensor}"
              f" data, {micro} micro-batches, {dtype}: max rel error {worst:.1e}")
        assert worst <= TOL[dtype]


def test_layers_split_like_heads():
    assert [len(stage_layers(12, 5, s)) for s in range(5)] == [3, 3, 2, 2, 2]
    assert [stage_layers(5, 2, s) for s in range(2)] == [range(0, 3), range(3, 5)]


def test_a_flip_between_stages_is_resent_to_the_clean_result(world, shared_dir):
    stages = 2 if world.Get_size() % 2 == 0 else world.Get_size()
    flat = {"dtype": "float64", "parallel.pipeline": stages, "parallel.microbatches": 2}
    _, clean = job(world, shared_dir, "pp-clean.h5", **flat)
    for where, rank in (("send", 0), ("result", world.Get_size() - 1)):
        flip = [{"rank": rank, "layer": stage_layers(LAYERS, stages, 0)[-1] if where == "send"
                 else stage_layers(LAYERS, stages, stages - 1)[0] - 1,
                 "site": "activations", "index": 11, "bit": 60, "where": where}]
        _, healed = job(world, shared_dir, f"pp-{where}.h5", **flat, **{"fault.inject": flip})
        if world.Get_rank() == 0:
            with h5py.File(clean) as a, h5py.File(healed) as b:
                for i in range(LAYERS):
                    np.testing.assert_array_equal(a[f"layers/{i:02d}/hidden"][()],
                                                  b[f"layers/{i:02d}/hidden"][()])
                table = b["checksum/collectives"][()]
                retried = table[table["retries"] > 0]  # the flip hits each micro-batch once
                assert len(retried) == 2 and set(site_names(retried)) == {b"activations"}
                assert retried["passed"].all() and (retried["retries"] == 1).all()
