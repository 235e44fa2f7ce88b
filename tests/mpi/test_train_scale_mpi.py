"""Training whose per-rank work shrinks (issue 26): the vocabulary split over the head group
and the optimizer state sharded over the replicas (ZeRO-1), under MPI (N = 2..5).

- a bit flip on the first attempt of each new collective (``embed``, ``vocab``,
  ``vocab.bwd`` over the head group; ``zero``, the gathered parameter blocks, over the
  replicas) is caught and retried, and the job equals a clean one bit for bit (losses,
  held-out loss, every parameter and optimizer tensor of the final checkpoint);
- a flip on every attempt stops every rank with an IntegrityError naming the site;
- at N = 4, 2 pipeline stages x 2 head ranks with the vocabulary split: flips in the
  per-row-block tied gradient sum (``grad.tied``, the two ends of each head rank), the
  first stage's ``embed`` and the last stage's ``vocab`` and ``vocab.bwd`` are retried
  and the job equals a clean one bit for bit;
- at N = 4, a checkpoint written at 2 sequence slices x 2 head ranks (vocabulary split per
  slice) resumes at 2 stages x 2 head ranks (split over the ends) as the straight run
  continues.

(Losses equal to one process at every layout, and resumes across layouts:
``test_train_mpi``, which runs with both features on by default.)

    mpiexec -n 4 python -m pytest --with-mpi --only-mpi tests/mpi/test_train_scale_mpi.py
"""

import h5py
import numpy as np
import pytest
from helpers import resume_errors
from test_train import tiny_train
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


def test_flips_with_the_vocabulary_split_over_stages_are_retried(world, corpus_dir):
    """Ranks 0, 1: stage 0 (head ranks 0, 1: word rows 0..k-1, k..); ranks 2, 3: stage 1
    (the same row blocks of the tied decoder). Each flip is aimed at a rank whose stage
    runs the site (``fault_span`` refuses the others), so a split that were not built
    for stages would fail the job's pre-flight."""
    size, rank = world.Get_size(), world.Get_rank()
    if size != 4:
        pytest.skip("2 stages x 2 head ranks need 4 ranks")
    over = {"parallel.tensor": 2, "parallel.pipeline": 2, "parallel.microbatches": 2}
    faults = [{"rank": r, "layer": 0, "site": s, "index": i, "bit": 62, "where": "send",
               "times": 1} for r, s, i in ((3, "grad.tied", 11), (2, "grad.tied", 5),
                                           (1, "embed", 5), (2, "vocab", 3),
                                           (3, "vocab.bwd", 7))]
    out, ck = train_job(world, corpus_dir, "clean-tied", "grad", **over)
    healed, healed_ck = train_job(world, corpus_dir, "healed-tied", "grad", **over,
                                  **{"fault.inject": faults})
    if rank != 0:
        return
    with h5py.File(out) as a, h5py.File(healed) as b:
        for key in ("train/loss", "train/eval_loss", "train/grad_norm"):
            np.testing.assert_array_equal(b[key][()], a[key][()])
        rec, clean = b["checksum/collectives"][()], a["checksum/collectives"][()]
    assert rec["passed"].all() and (clean["retries"] == 0).all()
    for site in ("grad.tied", "embed", "vocab", "vocab.bwd"):
        at = rec[site_names(rec) == site.encode()]
        retried = int((at["retries"] > 0).sum())
        print(f"pipeline 2 x tensor 2, {site}: {retried} of {len(at)} records retried")
        assert len(at) and retried >= 1, site
    with h5py.File(ck) as a, h5py.File(healed_ck) as b:
        want, got = state(a), state(b)
    assert sorted(got) == sorted(want) and len(want) > 10
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_sequence_checkpoint_resumes_over_stages(world, corpus_dir):
    from mpiattn.commands.train import train

    if world.Get_size() != 4:
        pytest.skip("2 x 2 layouts need 4 ranks")
    base = {"train.steps": 4, "train.checkpoint_every": 2, "train.eval_batches": 1}
    layouts = {"seq": {"parallel.sequence": 2, "parallel.tensor": 2,
                       "attention.sequence": "ulysses"},
               "pipe": {"parallel.pipeline": 2, "parallel.tensor": 2,
                        "parallel.microbatches": 2}}

    def job(name, layout, resume=None):
        ck = str(corpus_dir / f"{name}-{{step}}.h5")
        cfg = tiny_train(corpus_dir, **base, **layouts[layout], **{"train.checkpoint": ck})
        train(cfg, world, str(corpus_dir / f"{name}.h5"), True, resume=resume)
        world.Barrier()
        return ck

    straight = job("vs-straight", "seq")
    job("vs-resumed", "pipe", resume=straight.format(step=2))
    if world.Get_rank() != 0:
        return
    loss, params, adam_v = resume_errors(
        corpus_dir / "vs-straight.h5", corpus_dir / "vs-resumed.h5",
        corpus_dir / "vs-straight-4.h5", corpus_dir / "vs-resumed-4.h5")
    print(f"sequence 2 x tensor 2 -> pipeline 2 x tensor 2 at step 2: losses {loss:.1e},"
          f" params {params:.1e}, adam v {adam_v:.1e}")
    assert max(loss, params, adam_v) <= 1e-10
