"""Where ``fault.inject`` may aim, per command (no MPI): run and bench refuse the training
sites in one line naming their own; train takes them and checks each one's layer (for
``grad`` the gradient bucket, for the one-number sums 0) and that its group sums anything.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny
from test_train import ROOT, tiny_train

from mpiattn.commands.runner import check_inputs
from mpiattn.commands.train import (
    BUCKET_COLS,
    BUCKET_ROWS,
    TRAIN_SITES,
    Buckets,
    bucket_count,
    check_training,
    fault_span,
    init_params,
    shard_elements,
    split_vocab,
    vocab_split,
)
from mpiattn.core import mlm
from mpiattn.core.shard import head_shard
from mpiattn.errors import ConfigError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for name, lines in (("train.txt", 120), ("heldout.txt", 30)):
        text = (ROOT / "data/corpus" / name).read_text(encoding="utf-8").splitlines()[:lines]
        (folder / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    return folder


def flip(site: str, layer: int = 0, rank: int = 1) -> dict:
    return {"fault.inject": [{"rank": rank, "layer": layer, "site": site, "index": 0,
                              "bit": 30}]}


def train_check(folder, world: int, tensor: int, **fault) -> None:
    cfg = tiny_train(folder, **{"parallel.tensor": tensor}, **fault,
                     **{"train.checkpoint": str(folder / "never-{step}.h5")})
    check_training(cfg, world, None, False)


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("site", ["grad", "attention.bwd", "loss"])
def test_run_and_bench_refuse_training_sites(command, site):
    with pytest.raises(ConfigError) as info:
        check_inputs(tiny(**flip(site)), 2, 0, command)
    assert str(info.value) == (f"fault.inject[0].site = '{site}' is not a site of mpiattn"
                               f" {command}: use one of attention, mlp, activations,"
                               " alltoall.qkv, alltoall.out, ring.kv")


def test_run_takes_its_own_sites():
    check_inputs(tiny(**flip("mlp", layer=1)), 2, 0)


@pytest.mark.parametrize(("site", "tensor"), [("attention.bwd", 2), ("mlp.bwd", 4),
                                              ("grad", 1), ("grad", 2), ("loss", 2),
                                              ("eval", 1), ("grad_norm", 2), ("mlp", 2),
                                              ("embed", 4), ("vocab", 2), ("vocab.bwd", 2),
                                              ("zero", 1), ("zero", 2)])
def test_train_takes_its_sites(corpus, site, tensor):
    train_check(corpus, 4, tensor, **flip(site, rank=3))


@pytest.mark.parametrize(("site", "layer", "tensor", "text"), [
    ("grad", 1, 1, "layer = 1 but rank 1 sums its gradients in 1 bucket(s), and a 'grad'"
                   " fault's layer is the bucket index (0..0)"),
    ("grad", 0, 4, "site = 'grad': parallel.tensor = 4 of 4 ranks leaves one replica, so"
                   " nothing is summed there: lower parallel.tensor"),
    ("loss", 1, 2, "layer = 1 but site 'loss' sums one number a step (0..0)"),
    ("mlp.bwd", 2, 2, "layer = 2 but the model has 2 layers (0..1)"),
    ("attention.bwd", 0, 1, "site = 'attention.bwd': parallel.tensor = 1 puts every head on"
                            " one rank, so nothing is summed there: raise parallel.tensor"),
    ("activations", 0, 2, "site = 'activations': parallel.pipeline = 1 keeps every layer on"
                          " one stage, so nothing moves between stages: raise"
                          " parallel.pipeline"),
    ("vocab", 0, 1, "site = 'vocab': the vocabulary is split over the head group only with"
                    " parallel.tensor >= 2 and parallel.vocab = true: raise parallel.tensor"),
    ("vocab.bwd", 1, 2, "layer = 1 but site 'vocab.bwd' sums once a step (a micro-batch) and"
                        " once a held-out batch (0..0)"),
    ("zero", 0, 4, "site = 'zero': the optimizer state is sharded (ZeRO-1) only over two"
                   " replicas or more with parallel.zero = true, without sequence slices:"
                   " lower parallel.tensor"),
    ("attention.fwd", 0, 2, "site = 'attention.fwd' is not a site of mpiattn train: use one"
                            f" of {', '.join(TRAIN_SITES)}"),
])
def test_train_refuses_faults_that_cannot_fire(corpus, site, layer, tensor, text):
    with pytest.raises(ConfigError) as info:
        train_check(corpus, 4, tensor, **flip(site, layer))
    assert str(info.value) == f"fault.inject[0].{text}"


def test_vocab_fault_sites_follow_the_stages(tmp_path):
    """With the vocabulary split over stages or slices, ``embed`` runs on the first stage
    and ``vocab``/``vocab.bwd`` on the last: a fault aimed elsewhere is refused (4 ranks:
    0, 1 stage 0; 2, 3 stage 1); without the split every vocabulary site is refused."""
    piped = tiny_train(tmp_path, **{"parallel.pipeline": 2, "parallel.tensor": 2})
    span = fault_span(piped, 4, 2)
    assert span("embed", 1)[0] == 1 and span("vocab", 2)[0] == span("vocab.bwd", 3)[0] == 1
    count, why = span("embed", 2)
    assert count == 0 and "stage 1" in why and "stage 0" in why
    count, why = span("vocab", 0)
    assert count == 0 and "last stage, 1" in why
    sliced = fault_span(tiny_train(tmp_path, **{"parallel.sequence": 2,
                                                "parallel.tensor": 2}), 4, 2)
    assert sliced("embed", 3)[0] == sliced("vocab", 0)[0] == 1
    whole = fault_span(tiny_train(tmp_path, **{"parallel.pipeline": 2, "parallel.tensor": 2,
                                               "parallel.vocab": False}), 4, 2)
    assert whole("embed", 0)[0] == 0


def test_a_bit_outside_the_element_is_refused_before_the_job():
    cfg = tiny(dtype="float32", **flip("mlp"))
    cfg.fault.inject[0]["bit"] = 40
    with pytest.raises(ConfigError) as info:
        check_inputs(cfg, 2, 0)
    assert str(info.value) == "fault.inject[0].bit = 40 but a float32 element has 32 bits (0..31)"


@pytest.mark.parametrize(("tensor", "index"), [(1, 0), (2, 1), (3, 2)])
def test_shard_elements_counts_the_trained_parameters(corpus, tensor, index):
    cfg = tiny_train(corpus)
    m = cfg.model
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, tensor, index)
    held = sum(a.size for _, a, _ in mlm.named(init_params(cfg, shard, 80)))
    assert shard_elements(m, 80, shard) == held
    split = vocab_split(cfg, 80, tensor, index)  # the word rows split over the head group
    if split is not None:
        held = sum(a.size for _, a, _ in mlm.named(split_vocab(init_params(cfg, shard, 80),
                                                               split)))
        assert shard_elements(m, 80, shard, split.count) == held < shard_elements(m, 80, shard)


@pytest.mark.parametrize("elements", [1, BUCKET_ROWS * BUCKET_COLS,
                                      BUCKET_ROWS * BUCKET_COLS + 1])
def test_bucket_count_is_what_buckets_reduce(elements):
    seen = []
    Buckets([np.zeros(elements, np.float32)], np).allreduce(
        [np.zeros(elements, np.float32)], lambda v, site, layer: seen.append(layer) or v)
    assert seen == list(range(bucket_count(elements)))
