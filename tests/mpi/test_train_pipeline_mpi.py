"""Training with pipeline stages (1F1B) on N ranks (N = 2..5): losses and resumes equal
one process.

    mpiexec -n 3 python -m pytest --with-mpi --only-mpi tests/mpi/test_train_pipeline_mpi.py
"""

from pathlib import Path

import h5py
import pytest
from helpers import resume_errors
from test_grad import rel_err
from test_train import tiny_train

from mpiattn.io.collectives import site_names

pytestmark = pytest.mark.mpi(min_size=2)


def layouts(size):
    """(pipeline, tensor, layers) layouts that fit the world (the rest of the ranks are
    replicas): 2 stages x the rest on heads (2 x 2 at N = 4), 3 stages of 5 layers
    (2, 2, 1), 2 stages of 5 layers x 2 replicas, 5 stages of one layer each."""
    out = []
    if size % 2 == 0:
        out.append((2, size // 2, 2))
    if size % 3 == 0:
        out.append((3, 1, 5))
    if size == 4:
        out.append((2, 1, 5))
    if size == 5:
        out.append((5, 1, 5))
    return out


def run_train(world, folder, name, resume=None, **over):
    from mpiattn.commands.train import train

    cfg = tiny_train(folder, **over)
    train(cfg, world, str(folder / name), True, resume=resume)
    world.Barrier()
    return folder / name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stages_equal_one_process(world, corpus_dir, dtype):
    from mpi4py import MPI

    from mpiattn.commands.train import train

    size, rank = world.Get_size(), world.Get_rank()
    tol = {"float64": 1e-10, "float32": 1e-5}[dtype]
    for stages, tensor, layers in layouts(size):
        over = {"dtype": dtype, "model.layers": layers, "parallel.microbatches": 3}
        ref = corpus_dir / f"ref-{dtype}-{layers}.h5"
        if rank == 0 and not ref.exists():
            train(tiny_train(corpus_dir, **over), MPI.COMM_SELF, str(ref), True)
        world.Barrier()
        path = run_train(world, corpus_dir, f"p{stages}t{tensor}-{dtype}.h5", **over,
                         **{"parallel.pipeline": stages, "parallel.tensor": tensor})
        if rank == 0:
            with h5py.File(path) as f, h5py.File(ref) as r:
                err = rel_err(f["train/loss"][()], r["train/loss"][()])
                nerr = rel_err(f["train/grad_norm"][()], r["train/grad_norm"][()])
                eerr = rel_err(f["train/eval_loss"][()], r["train/eval_loss"][()])
                assert f["train/loss"].shape == (20,)
            print(f"{dtype} pipeline={stages} x tensor={tensor}, {layers} layers: 20 losses"
                  f" {err:.1e}, norms {nerr:.1e}, held-out {eerr:.1e}")
            assert max(err, nerr, eerr) <= tol


def test_resume_with_another_pipeline_size(world, corpus_dir):
    size, rank = world.Get_size(), world.Get_rank()
    stages = 3 if size % 3 == 0 else 2 if size % 2 == 0 else size
    over = {"train.steps": 8, "train.checkpoint_every": 4, "model.layers": 5,
            "parallel.microbatches": 4}
    run_train(world, corpus_dir, "straight.h5", **over,
              **{"train.checkpoint": str(corpus_dir / "s-{step}.h5")})
    ck = corpus_dir / "p-{step}.h5"
    run_train(world, corpus_dir, "staged.h5", **over, **{"parallel.pipeline": stages,
                                                        "train.checkpoint": str(ck)})
    for after in sorted({1} | ({4} if size == 4 else set())):  # 1: heads on every rank
        rk = corpus_dir / f"r{after}-{{step}}.h5"
        run_train(world, corpus_dir, f"resumed{after}.h5", resume=str(ck).format(step=4),
                  **over, **{"parallel.pipeline": after, "train.checkpoint": str(rk)})
        if rank != 0:
            continue
        loss_err, perr, serr = resume_errors(
            corpus_dir / "straight.h5", corpus_dir / f"resumed{after}.h5",
            corpus_dir / "s-8.h5", Path(str(rk).format(step=8)))
        print(f"pipeline {stages} -> {after} at step 4: losses {loss_err:.1e}, params"
              f" {perr:.1e}, adam v {serr:.1e}")
        assert loss_err <= 1e-12 and perr <= 1e-12 and serr <= 1e-12


def test_flipped_bits_between_stages_are_resent(world, corpus_dir):
    """A bit flipped in every activation sent forward, every gradient sent back and the tied
    embedding's gradient: each is caught, resent, and the losses equal a clean run's."""
    from mpiattn.core.pipeline import stage_layers

    size, rank = world.Get_size(), world.Get_rank()
    stages = 2 if size % 2 == 0 else size
    per_stage = size // stages  # parallel.tensor = 0: every rank of a stage on the heads
    boundary = stage_layers(5, stages, 0).stop - 1  # the last layer of stage 0
    over = {"train.steps": 4, "model.layers": 5, "parallel.microbatches": 3,
            "parallel.pipeline": stages}
    faults = [{"rank": 0, "layer": boundary, "site": "activations", "index": 3, "bit": 30},
              {"rank": per_stage, "layer": boundary, "site": "activations.bwd", "index": 5,
               "bit": 30},
              {"rank": 0, "layer": 0, "site": "grad.tied", "index": 7, "bit": 62}]
    clean = run_train(world, corpus_dir, "clean.h5", **over)
    hit = run_train(world, corpus_dir, "hit.h5", **over, **{"fault.inject": faults})
    if rank == 0:
        with h5py.File(clean) as a, h5py.File(hit) as b:
            assert (a["train/loss"][()] == b["train/loss"][()]).all()
            assert (a["train/grad_norm"][()] == b["train/grad_norm"][()]).all()
            records = b["checksum/collectives"][()]
        for site in (b"activations", b"activations.bwd", b"grad.tied"):
            mine = records[site_names(records) == site]
            assert mine.size and mine["passed"].all() and (mine["retries"] >= 1).any(), site
