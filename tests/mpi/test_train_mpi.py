"""Training on N ranks (N = 2..5): gradients, losses and resumes equal one process.

    mpiexec -n 2 python -m pytest --with-mpi tests/mpi/test_train_mpi.py
"""

from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import resume_errors
from test_grad import numeric, rel_err, tiny_batch, tiny_model
from test_train import tiny_train

from mpiattn.core import mlm, model
from mpiattn.core.backend import select
from mpiattn.core.model import LocalReduce
from mpiattn.core.shard import head_shard

pytestmark = pytest.mark.mpi(min_size=2)


def test_sharded_gradients_over_mpi(world):
    """Gradients with the heads split over the ranks (5 heads: uneven beyond 1 rank) equal
    the one-process ones, and central differences of the distributed loss."""
    from mpi4py import MPI

    from mpiattn.parallel.comm import CheckedAllreduce

    size, rank = world.Get_size(), world.Get_rank()
    tensor = min(size, 5)
    heads = world.Split(color=0 if rank < tensor else 1, key=rank)
    if rank >= tensor:
        heads.Free()
        return
    reduce = CheckedAllreduce(comm=heads, backend=select("numpy"),
                              group_ranks=list(range(tensor)), world_rank=rank)
    ids, keep, positions, targets = tiny_batch()
    shard = head_shard(5, 2, 15, tensor, rank)
    params = tiny_model(shard)

    def loss():
        return mlm.model_forward(params, ids, keep, positions, targets, 1 / 7, reduce,
                                  1e-5)[0]

    _, cache = mlm.model_forward(params, ids, keep, positions, targets, 1 / 7, reduce, 1e-5)
    grads = mlm.model_backward(cache, reduce)
    one = tiny_model(head_shard(5, 2, 15, 1, 0))
    _, c1 = mlm.model_forward(one, ids, keep, positions, targets, 1 / 7, LocalReduce(np), 1e-5)
    g1 = mlm.model_backward(c1, LocalReduce(np))
    pieces = heads.allgather(grads.layers)
    worst = 0.0
    for i in range(2):
        joined = model.join_shards([p[i] for p in pieces])
        for f in ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_g", "w_1", "b_1", "w_2", "ln2_b"):
            worst = max(worst, rel_err(getattr(joined, f), getattr(g1.layers[i], f)))
    assert worst <= 1e-12
    assert rel_err(grads.emb.word, g1.emb.word) <= 1e-12
    # finite differences: each rank in turn perturbs entries of its own shard
    fd_worst = 0.0
    for owner in range(tensor):
        for name in ("w_qkv", "w_o", "b_1", "w_2"):
            p, g = getattr(params.layers[1], name), getattr(grads.layers[1], name)
            sample = np.random.default_rng([owner, 1]).choice(p.size, 3, replace=False)
            if rank == owner:
                num = numeric(loss, p, sample)
                fd_worst = max(fd_worst, rel_err(g.reshape(-1)[sample], num))
            else:  # the same forward passes, unperturbed here
                for _ in range(2 * sample.size):
                    loss()
    fd_worst = heads.allreduce(fd_worst, op=MPI.MAX)
    heads.Free()
    if rank == 0:
        print(f"{tensor} head ranks: vs one rank {worst:.1e}, vs finite differences"
              f" {fd_worst:.1e}")
    assert fd_worst <= 1e-6


def layouts(size):
    """(tensor, data) layouts that fit the world: heads only, data only, and a mix."""
    out = [(size, 1), (1, size)]
    if size % 2 == 0 and size > 2:
        out.append((2, size // 2))
    return out


def run_train(world, folder, name, **over):
    from mpiattn.commands.train import train

    cfg = tiny_train(folder, **over)
    train(cfg, world, str(folder / name), True)
    world.Barrier()
    return folder / name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layouts_equal_one_process(world, corpus_dir, dtype):
    from mpi4py import MPI

    from mpiattn.commands.train import train

    size, rank = world.Get_size(), world.Get_rank()
    tol = {"float64": 1e-10, "float32": 1e-5}[dtype]
    ref = corpus_dir / f"ref-{dtype}.h5"
    if rank == 0:
        train(tiny_train(corpus_dir, dtype=dtype), MPI.COMM_SELF, str(ref), True)
    world.Barrier()
    for tensor, data in layouts(size):
        path = run_train(world, corpus_dir, f"l{tensor}x{data}-{dtype}.h5", dtype=dtype,
                         **{"parallel.tensor": tensor})
        if rank == 0:
            with h5py.File(path) as f, h5py.File(ref) as r:
                assert f.attrs["tensor_parallel"] == tensor
                assert f.attrs["data_parallel"] == data
                err = rel_err(f["train/loss"][()], r["train/loss"][()])
                assert f["train/loss"].shape == (20,)
                assert f["timings/seconds"].shape == (size, 20, 5)
            print(f"{dtype} tensor={tensor} x data={data}: 20 losses, max rel error {err:.1e}")
            assert err <= tol


def test_resume_with_another_tensor_size(world, corpus_dir):
    size, rank = world.Get_size(), world.Get_rank()
    from mpiattn.commands.train import train

    over = {"train.steps": 8, "train.checkpoint_every": 4, "parallel.tensor": size}
    cfg = tiny_train(corpus_dir, **over, **{"train.checkpoint": str(corpus_dir / "s-{step}.h5")})
    train(cfg, world, str(corpus_dir / "straight.h5"), True)
    world.Barrier()
    for tensor in {1, 2 if size % 2 == 0 else size}:
        ck = corpus_dir / f"r{tensor}-{{step}}.h5"
        cfg = tiny_train(corpus_dir, **{**over, "parallel.tensor": tensor,
                                        "train.checkpoint": str(ck)})
        train(cfg, world, str(corpus_dir / f"resumed{tensor}.h5"), True,
              resume=str(corpus_dir / "s-4.h5"))
        world.Barrier()
        if rank != 0:
            continue
        loss_err, perr, serr = resume_errors(
            corpus_dir / "straight.h5", corpus_dir / f"resumed{tensor}.h5",
            corpus_dir / "s-8.h5", Path(str(ck).format(step=8)))
        print(f"tensor {size} -> {tensor} at step 4: losses {loss_err:.1e}, params"
              f" {perr:.1e}, adam v {serr:.1e}")
        assert loss_err <= 1e-12 and perr <= 1e-12 and serr <= 1e-12


def test_config_errors_reach_every_rank(world, corpus_dir):
    from mpiattn.commands.train import train
    from mpiattn.errors import UserError

    cfg = tiny_train(corpus_dir, **{"train.corpus": str(corpus_dir / "missing.txt")})
    with pytest.raises(UserError, match="does not exist"):
        train(cfg, world, str(corpus_dir / "x.h5"), True)
