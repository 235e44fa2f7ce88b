"""Training whose per-rank work shrinks (issue 26): the vocabulary split over the head group
and the optimizer state sharded over the replicas (ZeRO-1), under MPI (N = 2..5).

- a bit flip on the first attempt of each new collective (``embed``, ``vocab``,
  ``vocab.bwd`` over the head group; ``zero``, the gathered parameter blocks, over the
  replicas) is caught and retried, and the job equals a clean one bit for bit (losses,
  held-out loss, every parameter and optimizer tensor of the final checkpoint);
- a flip on every attempt stops every rank with an IntegrityError naming the site.

(Losses equal to one process at every layout, and resumes across layouts:
``test_train_mpi``, which runs with both features on by default.)

    mpiexec -n 4 python -m pytest --with-mpi --only-mpi tests/mpi/test_train_scale_mpi.py
"""

import h5py
import numpy as np
import pytest
from test_train_faults_mpi import STEPS, state, train_job

from mpiattn.errors import IntegrityError
from mpiattn.io.collectives import site_names

pytestmark = pytest.mark.mpi(min_size=2)

HEAD_SITES = ("embed", "vocab", "vocab.bwd")


def layout(sites, size):
    """parallel.tensor that gives the sites' group two ranks or more (2 x 2 at N = 4)."""
    if size == 4:
        return 2
    return 1 if sites == ("zero",) else size


def flips(sites, rank, times=1):
    return [{"rank": rank, "layer": 0, "site": s, "index": 5, "bit": 62, "where": "send",
             "times": times} for s in sites]


@pytest.mark.parametrize("sites", [HEAD_SITES, ("zero",)])
def test_flips_in_the_new_collectives_are_retried(world, corpus_dir, sites):
    size, rank = world.Get_size(), world.Get_rank()
    tensor = layout(sites, size)
    over = {"parallel.tensor": tensor}
    name = sites[0].replace(".", "")
    out, ck = train_job(world, corpus_dir, f"clean-{name}", "grad", **over)
    healed, healed_ck = train_job(world, corpus_dir, f"healed-{name}", "grad", **over,
                                  **{"fault.inject": flips(sites, size - 1)})
    if rank != 0:
        return
    with h5py.File(out) as a, h5py.File(healed) as b:
        for key in ("train/loss", "train/eval_loss", "train/grad_norm"):
            np.testing.assert_array_equal(b[key][()], a[key][()])
        rec, clean = b["checksum/collectives"][()], a["checksum/collectives"][()]
    assert rec["passed"].all() and (clean["retries"] == 0).all()
    for site in sites:
        at = rec[site_names(rec) == site.encode()]
        was = clean[site_names(clean) == site.encode()]
        print(f"{size} ranks, tensor {tensor}, {site}: {(at['retries'] > 0).sum()} of"
              f" {len(at)} records retried")
        # one record per group and call: the groups are the replicas' head groups, or the
        # head ranks' data groups (zero); the fault's rank is in one of them, where it
        # fires on every first attempt
        groups = tensor if site == "zero" else size // tensor
        assert len(at) == len(was) >= STEPS * groups
        assert (at["retries"] <= 1).all() and (at["retries"] == 1).sum() == len(at) // groups
    with h5py.File(ck) as a, h5py.File(healed_ck) as b:
        want, got = state(a), state(b)
    assert sorted(got) == sorted(want) and len(want) > 10
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("site", ["vocab", "zero"])
def test_persistent_flip_in_a_new_collective_stops_every_rank(world, corpus_dir, site):
    """The site's group is the whole world here, so every rank raises."""
    size = world.Get_size()
    tensor = 1 if site == "zero" else size
    with pytest.raises(IntegrityError) as info:
        train_job(world, corpus_dir, f"bad-{site}", "grad", **{"parallel.tensor": tensor},
                  **{"fault.inject": flips((site,), size - 1, times=99)})
    text = str(info.value)
    assert info.value.exit_code == 3
    assert f"site '{site}'" in text and "gave up after 2 retries" in text, text
    world.Barrier()
    assert not (corpus_dir / f"bad-{site}.h5").exists()
