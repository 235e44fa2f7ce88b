"""NomicBERT folders (#25: nomic-embed-text-v1/v1.5, RoPE, SwiGLU) against Nomic's own
model code (``tests/oracles/nomic_bert``, loaded as a user's folder loads it:
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` and
``SentenceTransformer(folder, trust_remote_code=True)``, local files only).

Random ``NomicBertModel`` weights (5 heads of 4 on 1-3 head ranks: 5, 3+2, 2+2+1; 3
layers; n_inner 200 rounded up to 256 by its code; 30522 words padded to 30528), float64
and float32, without biases (as nomic-embed-text) and with all five, token types 0 and 1;
plain and blocked attention; a sequence group (ring, Ulysses) as threads; mean pooling +
Normalize against sentence-transformers; ``mpiattn run`` under mpiexec (2 head ranks x
2 pipeline stages, 3 data replicas; a missing tensor: one line, exit 2, no file). What
is not built is one line.

Nomic's code computes the RoPE angles in float32 whatever the model's dtype
(``_update_cos_sin_cache``), so its float64 output is the exact rotation only to ~1e-8
(measured below); the float64 oracle gets float64 angles (``exact_nomic_rope``, the
rotation itself unchanged), float32 runs are compared with the code as it is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_folders import (
    build_nomic,
    forward,
    model_cfg,
    nomic_config,
    nomic_hidden_states,
    nomic_st_encode,
)

from mpiattn import config
from mpiattn.commands.placement import check_sequence
from mpiattn.core.attention import Options
from mpiattn.core.reference import relative_error
from mpiattn.core.shard import head_shard
from mpiattn.errors import InputError
from mpiattn.io.families import FAMILIES
from mpiattn.io.weights import open_source

TOL = {"float64": 1e-12, "float32": 1e-5}
SEQ = 24
ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
LINES = ["A man is playing a guitar.", "", " ".join(["the quick brown fox"] * 8),
         "naïve café — déjà vu", "The cat sleeps.", "Hi"]
MODULES = [("Pooling", {"pooling_mode": "mean"}), ("Normalize", None)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (folder, ids, mask, types, {dtype: the oracle's last hidden state})."""
    pytest.importorskip("einops")
    pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("nomic")
    rng = np.random.default_rng(6)
    ids = rng.integers(1000, 5000, size=(3, SEQ))
    mask = np.ones(ids.shape, dtype=bool)
    mask[1, 15:] = mask[2, 3:] = False
    ids = np.where(mask, ids, 0)
    types = np.where(rng.random(ids.shape) < 0.3, 1, 0)
    out = {}
    for name, dtype, biases in (("plain", "float64", False), ("biases", "float32", True)):
        folder = build_nomic(root / f"nomic-{name}", dtype, seed=3, modules=MODULES,
                             biases=biases)
        want = {d: nomic_hidden_states(folder, ids, mask, d, types, exact=d == "float64")
                for d in ("float64", "float32")}
        if name == "plain":  # Nomic's own float64, its angles in float32: measured
            want["own-float64"] = nomic_hidden_states(folder, ids, mask, "float64", types,
                                                      exact=False)
        out[name] = (folder, ids, mask, types, want)
    return out


@pytest.mark.parametrize("name", ["plain", "biases"])
def test_equals_nomic_code_on_1_to_3_head_ranks_plain_and_blocked(folders, name):
    """Every token's last hidden state (token types 0 and 1) against Nomic's
    ``NomicBertModel``: float64 <= 1e-12, float32 <= 1e-5, 1-3 head ranks, plain and
    blocked attention (blocks of 5)."""
    folder, ids, mask, types, want = folders[name]
    cfg = model_cfg(folder, "float64", SEQ)
    assert (cfg.model.ffn, cfg.model.vocab, cfg.model.type_vocab) == (256, 30528, 2)
    for dtype in ("float64", "float32"):
        cfg = model_cfg(folder, dtype, SEQ)
        for impl in ("plain", "blocked"):
            for tensor in (1, 2, 3):
                got, _ = forward(cfg, ids, mask, tensor, options=Options(impl, 5),
                                 types=types)
                err = relative_error(got, want[dtype])
                print(f"NomicBERT {name} {dtype} {impl} {tensor} head ranks: {err:.1e}")
                assert err <= TOL[dtype], (dtype, impl, tensor, err)
    if "own-float64" in want:
        own = relative_error(want["own-float64"], want["float64"])
        print(f"Nomic's float64 (float32 angles) against the exact rotation: {own:.1e}")
        assert 1e-11 < own < 1e-5


def test_rope_base_gate_order_and_token_types_reach_the_output(folders):
    """The comparison could fail: another RoPE base, fc11 and fc12 swapped (silu on the
    wrong half), GELU for SiLU, or all token types 0 each move the output far beyond
    the tolerances."""
    folder, ids, mask, types, want = folders["plain"]
    cfg = model_cfg(folder, "float64", SEQ)
    layers = [open_source(0, cfg.model, np.float64).layer(i, head_shard(5, 4, 256, 1, 0))
              for i in range(3)]
    assert {(p.rope_theta, p.prenorm, p.act) for p in layers} == {(1000.0, False, "silu")}
    assert not any(p.b_qkv.any() or p.b_1.any() or p.b_2.any() for p in layers)

    def base(ps: list) -> None:
        for p in ps:
            p.rope_theta = 10_000.0

    def swapped(ps: list) -> None:
        for p in ps:
            f = p.w_1.shape[1] // 2
            p.w_1 = np.ascontiguousarray(np.concatenate([p.w_1[:, f:], p.w_1[:, :f]], 1))

    def gelu(ps: list) -> None:
        for p in ps:
            p.act = "gelu"

    for edit in (base, swapped, gelu):
        got, _ = forward(cfg, ids, mask, edit=edit, types=types)
        assert relative_error(got, want["float64"]) > 1e-3, edit.__name__
    got, _ = forward(cfg, ids, mask)
    assert relative_error(got, want["float64"]) > 1e-3  # types all 0


@pytest.mark.parametrize(("sequence", "parts", "tensor", "dtype"),
                         [("ring", 3, 1, "float64"), ("ulysses", 2, 2, "float32")])
def test_sequence_group_rotates_each_slice_from_its_position(folders, sequence, parts,
                                                             tensor, dtype):
    """Tokens split over a sequence group (8 + 8 + 8; 12 + 12 x 2 head ranks): each rank
    rotates its slice from the slice's first position; the result is the oracle's."""
    folder, ids, mask, types, want = folders["plain"]
    cfg = model_cfg(folder, dtype, SEQ)
    got, skipped = forward(cfg, ids, mask, tensor, sequence, parts, Options("blocked", 5),
                           types=types)
    err = relative_error(got, want[dtype])
    print(f"NomicBERT {sequence} {parts} x {tensor} head ranks {dtype}: {err:.1e}")
    assert err <= TOL[dtype], err
    assert not any(skipped)  # no window: every ring step holds keys in reach


def test_sentence_transformers_encode(folders):
    """``SentenceTransformer(folder, trust_remote_code=True).encode`` (mean pooling,
    Normalize) equals mpiattn's pipeline on the folder at 2 head ranks, float64."""
    from mpiattn.inputs.textstream import SentenceTokenizer, model_max_length
    from mpiattn.io.stmodules import sentence_pipeline

    folder = folders["plain"][0]
    cfg = model_cfg(folder, "float64", SEQ)
    limit, _ = model_max_length(folder, cfg.model.max_positions)
    assert limit == 24
    tok = SentenceTokenizer(folder / "tokenizer.json", limit, cfg.model.vocab, 1)
    ids, mask, _ = tok.encode(LINES, 0).padded(np.arange(len(LINES)))
    hidden, _ = forward(cfg, ids, mask, tensor=2)
    got = sentence_pipeline(str(folder), cfg.model.hidden)(hidden, mask)
    want = nomic_st_encode(folder, LINES, "float64")
    err = relative_error(got, want)
    print(f"NomicBERT sentence-transformers float64: {err:.1e}")
    assert got.shape == want.shape == (len(LINES), 20) and err <= TOL["float64"], err
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_shape_follows_its_code():
    """model.* as NomicBertModel builds it: GPT2Config's defaults for absent keys, the
    MLP width rounded up to 256 (int(8 n_embd / 3) without n_inner), the vocabulary
    rounded up to pad_vocab_size_multiple."""
    family = FAMILIES["nomic_bert"]
    assert family.shape(nomic_config()) == {
        "layers": 3, "heads": 5, "hidden": 20, "ffn": 256, "vocab": 30528, "type_vocab": 2,
        "max_positions": 8192, "layer_norm_eps": 1e-12}
    bare = family.shape({"model_type": "nomic_bert", "n_embd": 768, "n_inner": None})
    assert (bare["ffn"], bare["vocab"], bare["layers"], bare["layer_norm_eps"]) == \
        (2048, 50257, 12, 1e-5)  # int(8 * 768 / 3) = 2048; GPT2Config's defaults


def test_what_is_not_built_is_one_line(folders, tmp_path):
    """A missing tensor, each setting nomic-embed-text does not use, another activation,
    training: one line (``InputError``/``ConfigError``) before any work."""
    from safetensors.numpy import load_file, save_file

    base = folders["plain"][0]
    cases = {}
    folder = shutil.copytree(base, tmp_path / "missing")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layers.1.mlp.fc12.weight"]
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    cases[folder] = "tensor 'encoder.layers.1.mlp.fc12.weight' is missing (a NomicBERT"
    hf = json.loads((base / "config.json").read_text())
    for name, edit, want in (
            ("ntk", {"rotary_scaling_factor": 2}, "rotary_scaling_factor = 2; mpiattn builds"
             " NomicBERT as nomic-embed-text-v1/v1.5 use it (rotary_scaling_factor = null)"),
            ("interleaved", {"rotary_emb_interleaved": True}, "rotary_emb_interleaved = true"),
            ("fraction", {"rotary_emb_fraction": 0.5}, "rotary_emb_fraction = 0.5"),
            ("absent", {"rotary_emb_fraction": None}, "rotary_emb_fraction = 0.0"),
            ("prenorm", {"prenorm": True}, "prenorm = true"),
            ("act", {"activation_function": "gelu"},
             "activation_function = 'gelu'; mpiattn runs NomicBERT with 'swiglu' only")):
        folder = shutil.copytree(base, tmp_path / name)
        changed = {**hf, **edit}
        if name == "absent":
            del changed["rotary_emb_fraction"]
        (folder / "config.json").write_text(json.dumps(changed))
        cases[folder] = want
    for folder, want in cases.items():
        with pytest.raises(InputError) as err:
            cfg = model_cfg(folder, "float64", SEQ)
            source = open_source(0, cfg.model, np.float64)
            source.embeddings()
            [source.layer(i, head_shard(5, 4, 256, 1, 0)) for i in range(3)]
        assert "\n" not in str(err.value) and want in str(err.value), str(err.value)
    with pytest.raises(config.ConfigError, match="is a NomicBERT model: mpiattn train"):
        check_sequence(model_cfg(base, "float32", SEQ), 1, SEQ, "train")  # train's pre-flight


def run(ranks: int, cwd: Path, *sets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "mpiattn", "run", "-o", "out.h5",
           *(arg for s in sets for arg in ("--set", s))]
    cmd = [MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not found")
def test_run_under_mpiexec_and_a_missing_tensor(folders, tmp_path):
    """``mpiattn run`` on the folder, float64, 5 heads on 2 head ranks (3 + 2) x 2
    pipeline stages with blocked attention, and 3 data replicas (batches of 2 lines): the
    pooled rows are ``SentenceTransformer(folder, trust_remote_code=True).encode(lines)``
    to 1e-12. The folder without one tensor (2 ranks), or with dynamic NTK RoPE scaling
    (1 rank): one line from rank 0, exit 2 on every rank, no file."""
    import h5py
    from safetensors.numpy import load_file, save_file

    folder = folders["plain"][0]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    want = nomic_st_encode(folder, LINES, "float64")
    for ranks, sets in ((4, ["parallel.tensor=2", "parallel.pipeline=2",
                             'attention.impl="blocked"', "attention.block=5"]),
                        (3, ["parallel.tensor=1", "input.batch=2"])):
        good = tmp_path / f"good{ranks}"
        good.mkdir()
        done = run(ranks, good, f'model.weights="{folder}"', f'input.text="{text}"',
                   'dtype="float64"', *sets)
        assert done.returncode == 0, done.stderr
        with h5py.File(good / "out.h5") as f:
            got = f["output/pooled"][()]
            assert f["output/pooled"].attrs["modules"] == \
                "Transformer > Pooling(mean) > Normalize"
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"NomicBERT run at {ranks} ranks {sets}: {err:.1e}")
        assert got.shape == (len(LINES), 20) and err <= 1e-12, err

    broken = shutil.copytree(folder, tmp_path / "model")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["encoder.layers.2.attn.out_proj.weight"]
    (broken / "model.safetensors").unlink()
    save_file(tensors, str(broken / "model.safetensors"))
    done = run(2, tmp_path, f'model.weights="{broken}"', f'input.text="{text}"')
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpiattn: error")]
    assert len(lines) == 1 and "tensor 'encoder.layers.2.attn.out_proj.weight' is missing" \
        " (a NomicBERT" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out.h5").exists()

    scaled = shutil.copytree(folder, tmp_path / "scaled")  # v1.5's long-context setting
    hf = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**hf, "rotary_scaling_factor": 2}))
    done = run(1, tmp_path, f'model.weights="{scaled}"', f'input.text="{text}"')
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpiattn: error")]
    assert len(lines) == 1 and "rotary_scaling_factor = 2; mpiattn builds NomicBERT" \
        in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out.h5").exists()
