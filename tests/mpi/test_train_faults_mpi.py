"""Bit flips in training's backward and gradient Allreduces (N = 2..5 ranks).

A flip on the first attempt of a collective is caught, the collective is retried, and the
job's losses, held-out loss, parameters and optimizer state equal a clean run's bit for
bit; a flip on every attempt ends every rank with an IntegrityError (exit code 3) and
leaves no output. (The command line's exit code and abort of the other replicas:
``test_failure_matrix``.)

    mpiexec -n 3 python -m pytest --with-mpi --only-mpi tests/mpi/test_train_faults_mpi.py
"""

import h5py
import numpy as np
import pytest
from test_train import tiny_train

from mpiattn.errors import IntegrityError
from mpiattn.io.collectives import site_names

pytestmark = pytest.mark.mpi(min_size=2)

STEPS = 3  # every step reduces at each site once: a fault with times = 1 fires in each


def tensor_for(site, size):
    """parallel.tensor that gives the site's group two ranks or more at this world size:
    heads for the backward sites, replicas for ``grad`` (2 x 2 at N = 4)."""
    if site == "grad":
        return 2 if size == 4 else 1
    return 2 if size == 4 else size


def train_job(world, folder, name, site, **over):
    """Train STEPS steps; (output, final checkpoint)."""
    from mpiattn.commands.train import train

    flat = {"train.steps": STEPS, "parallel.tensor": tensor_for(site, world.Get_size()),
            "train.checkpoint": str(folder / f"{name}-{{step}}.h5"),
            "train.checkpoint_every": STEPS, **over}
    train(tiny_train(folder, **flat), world, str(folder / f"{name}.h5"), True)
    world.Barrier()
    return folder / f"{name}.h5", folder / f"{name}-{STEPS}.h5"


def state(f):
    """Every parameter and optimizer tensor of a checkpoint, by its path."""
    out = {}
    for group in ("params", "optimizer"):
        f[group].visititems(lambda name, obj, g=group: out.__setitem__(f"{g}/{name}", obj[()])
                            if isinstance(obj, h5py.Dataset) else None)
    return out


def flip(site, rank, times=1, where="send"):
    layer = 0 if site == "grad" else 1  # the only gradient bucket; the model's last layer
    return {"fault.inject": [{"rank": rank, "layer": layer, "site": site, "index": 7,
                              "bit": 62, "where": where, "times": times}]}


@pytest.mark.parametrize("where", ["send", "result"])
@pytest.mark.parametrize("site", ["attention.bwd", "mlp.bwd", "grad"])
def test_one_flip_is_retried_to_the_clean_training(world, corpus_dir, site, where):
    size, rank = world.Get_size(), world.Get_rank()
    out, ck = train_job(world, corpus_dir, "clean", site)
    healed_out, healed_ck = train_job(world, corpus_dir, "healed", site,
                                      **flip(site, size - 1, where=where))
    if rank != 0:
        return
    with h5py.File(out) as a, h5py.File(healed_out) as b:
        for name in ("train/loss", "train/eval_loss", "train/grad_norm"):
            np.testing.assert_array_equal(b[name][()], a[name][()])
        rec = b["checksum/collectives"][()]
        clean = a["checksum/collectives"][()]
        assert "bit = 62" in b.attrs["config"]  # the injection is on record
    at = rec[site_names(rec) == site.encode()]
    retried = at[at["retries"] > 0]
    print(f"{size} ranks, tensor {tensor_for(site, size)}, {site} {where}: {len(retried)} of"
          f" {len(at)} records retried")
    assert len(retried) == STEPS and (retried["retries"] == 1).all()
    assert rec["passed"].all() and (rec["retries"] > 0).sum() == STEPS
    assert len(rec) == len(clean) and (clean["retries"] == 0).all()
    with h5py.File(ck) as a, h5py.File(healed_ck) as b:
        want, got = state(a), state(b)
    assert sorted(got) == sorted(want) and len(want) > 10
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("site", ["mlp.bwd", "attention.bwd", "grad"])
def test_persistent_flip_stops_every_rank(world, corpus_dir, site):
    """The site's group is the whole world here, so every rank raises (with replicas
    outside the group the command line aborts them)."""
    size = world.Get_size()
    tensor = 1 if site == "grad" else size
    with pytest.raises(IntegrityError) as info:
        train_job(world, corpus_dir, f"bad-{site}", site, **{"parallel.tensor": tensor},
                  **flip(site, size - 1, times=99))
    text = str(info.value)
    assert info.value.exit_code == 3
    assert f"site '{site}'" in text and "gave up after 2 retries" in text, text
    world.Barrier()
    assert not (corpus_dir / f"bad-{site}.h5").exists()
    assert not list(corpus_dir.glob(f"bad-{site}-*.h5"))  # no checkpoint either
