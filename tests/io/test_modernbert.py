"""ModernBERT folders (#25, the rotary family) in one process: transformers' own
``ModernBertConfig`` with random weights (5 heads of 4 on 1-3 head ranks: 2+2+1, 4 layers
of which 0 and 3 global, a window of 8 tokens (+-4) on sequences of 24), float64 and
float32, plain and blocked attention, a sequence group (ring and Ulysses) as threads,
and sentence-transformers' mean pooling; what is not built is one line.

The float64 oracle is transformers with its RoPE computed in float64 (``exact_rope``):
transformers rounds the angles and the rotation to float32 even in a float64 model (its
own float64 output is ~1e-8 off the exact rotation, measured below). float32 runs are
compared with transformers unchanged. Only real tokens are compared: a padding query
with no real key within its window has no defined output (transformers: NaN or uniform,
by attention implementation; mpiattn: 0)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from model_folders import build, exact_rope, forward, hidden_states, model_cfg, st_encode

from mpiattn import config
from mpiattn.commands.placement import check_sequence
from mpiattn.core.attention import KeyMask, Options
from mpiattn.core.reference import relative_error
from mpiattn.core.shard import head_shard
from mpiattn.errors import InputError
from mpiattn.io.weights import open_source

TOL = {"float64": 1e-12, "float32": 1e-5}
SEQ = 24
BIASES = {"norm_bias": True, "attention_bias": True, "mlp_bias": True}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (folder, ids, mask, {dtype: transformers' last hidden state})."""
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("modernbert")
    rng = np.random.default_rng(5)
    ids = rng.integers(1000, 5000, size=(3, SEQ))
    mask = np.ones(ids.shape, dtype=bool)
    mask[1, 15:] = mask[2, 3:] = False  # padding far beyond a window's reach
    ids = np.where(mask, ids, 0)
    out = {}
    for name, dtype, extra in (("plain", "float64", {}), ("biases", "float32", BIASES)):
        folder = build(root / name, "modernbert", dtype, seed=3,
                       modules=[("Pooling", {"pooling_mode": "mean"})], **extra)
        with exact_rope():
            want64 = hidden_states(folder, ids, mask, "float64")
        want = {"float64": want64, "float32": hidden_states(folder, ids, mask, "float32")}
        if name == "plain":  # transformers' own float64, its RoPE in float32: measured
            want["transformers-float64"] = hidden_states(folder, ids, mask, "float64")
        out[name] = (folder, ids, mask, want)
    return out


@pytest.mark.parametrize("name", ["plain", "biases"])
def test_equals_transformers_on_1_to_3_head_ranks_plain_and_blocked(folders, name):
    """Real tokens' last hidden state against transformers' AutoModel: float64 <= 1e-12,
    float32 <= 1e-5, 1-3 head ranks (5 heads: 5, 3+2, 2+2+1), plain and blocked attention
    (blocks of 5: the window's edges cut through blocks, some blocks are skipped)."""
    folder, ids, mask, want = folders[name]
    for dtype in ("float64", "float32"):
        cfg = model_cfg(folder, dtype)
        for impl in ("plain", "blocked"):
            for tensor in (1, 2, 3):
                got, _ = forward(cfg, ids, mask, tensor, options=Options(impl, 5))
                err = relative_error(got[mask], want[dtype][mask])
                print(f"{name} {dtype} {impl} {tensor} head ranks: {err:.1e}")
                assert err <= TOL[dtype], (dtype, impl, tensor, err)
                assert np.isfinite(got).all()  # padding rows out of every key's reach: 0
    if "transformers-float64" in want:
        hf_own = relative_error(want["transformers-float64"][mask], want["float64"][mask])
        print(f"transformers' float64 (float32 RoPE) against the exact rotation: {hf_own:.1e}")
        assert 1e-11 < hf_own < 1e-6


def test_window_and_both_bases_reach_the_output(folders):
    """The comparison above could fail: without the window, or with one RoPE base for
    every layer, the output moves far beyond the tolerances."""
    folder, ids, mask, want = folders["plain"]
    cfg = model_cfg(folder, "float64")
    layers = open_source(0, cfg.model, np.float64)
    kinds = [(p.window, p.rope_theta) for p in (layers.layer(i, head_shard(5, 4, 14, 1, 0))
                                                 for i in range(4))]
    assert kinds == [(None, 160000.0), (4, 10000.0), (4, 10000.0), (None, 160000.0)]

    def no_window(ps: list) -> None:
        for p in ps:
            p.window = None

    def one_base(ps: list) -> None:
        for p in ps:
            p.rope_theta = 10_000.0

    for edit in (no_window, one_base):
        got, _ = forward(cfg, ids, mask, edit=edit)
        assert relative_error(got[mask], want["float64"][mask]) > 1e-3, edit.__name__


@pytest.mark.parametrize(("sequence", "parts", "tensor", "dtype"),
                         [("ring", 3, 1, "float64"), ("ring", 2, 2, "float32"),
                          ("ulysses", 2, 2, "float64")])
def test_sequence_group_keeps_positions_and_window(folders, sequence, parts, tensor, dtype):
    """Tokens split over a sequence group (8 + 8 + 8, or 12 + 12) x head ranks: each rank
    rotates its slice from the slice's first position, and the window holds across
    slices. In the ring of 3, the first and last ranks' slices (0-7, 16-23) are beyond
    each other's reach (+-4): in each of the 2 local layers those 2 steps are skipped,
    counted, and the result is unchanged."""
    folder, ids, mask, want = folders["plain"]
    cfg = model_cfg(folder, dtype)
    got, skipped = forward(cfg, ids, mask, tensor, sequence, parts, Options("blocked", 5))
    err = relative_error(got[mask], want[dtype][mask])
    print(f"{sequence} {parts} sequence x {tensor} head ranks {dtype}: {err:.1e}, skipped"
          f" {skipped}")
    assert err <= TOL[dtype], err
    if sequence == "ring" and parts == 3:
        assert skipped == [2, 0, 2]  # ranks 0 and 2, once per local layer
    elif sequence == "ring":
        assert skipped == [0, 0, 0, 0]  # 12 + 12: every step has keys within reach


def test_sentence_transformers_mean_pooling(folders):
    """``SentenceTransformer(folder).encode`` (mean pooling) equals mpiattn's pipeline on
    the folder at 2 head ranks, float64 (sentence-transformers with the exact RoPE)."""
    pytest.importorskip("sentence_transformers")
    from mpiattn.inputs.textstream import SentenceTokenizer, model_max_length
    from mpiattn.io.stmodules import sentence_pipeline

    folder = folders["plain"][0]
    lines = ["A man is playing a guitar.", "",
             " ".join(["the quick brown fox jumps over the lazy dog"] * 3), "Hi there."]
    cfg = model_cfg(folder, "float64")
    limit, _ = model_max_length(folder, cfg.model.max_positions)
    assert limit == 24
    tok = SentenceTokenizer(folder / "tokenizer.json", limit, cfg.model.vocab, 1)
    ids, mask, _ = tok.encode(lines, 0).padded(np.arange(len(lines)))
    assert ids.shape[1] == 24  # the long line spans 3 windows
    hidden, _ = forward(cfg, ids, mask, tensor=2)
    got = sentence_pipeline(str(folder), cfg.model.hidden)(hidden, mask)
    with exact_rope():
        want = st_encode(folder, lines, "float64")
    err = relative_error(got, want)
    print(f"sentence-transformers float64: {err:.1e}")
    assert got.shape == want.shape == (4, 20) and err <= TOL["float64"], err


def test_what_is_not_built_is_one_line(folders, tmp_path):
    """A missing tensor, a scaled RoPE, an activation not built, training: one line."""
    from safetensors.numpy import load_file, save_file

    base = folders["plain"][0]
    cases = {}
    folder = shutil.copytree(base, tmp_path / "missing")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["layers.2.mlp.Wi.weight"]
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    cases[folder] = "tensor 'layers.2.mlp.Wi.weight' is missing (a ModernBERT model needs it"
    hf = json.loads((base / "config.json").read_text())
    for name, edit, want in (
            ("scaled", {"rope_parameters": {**hf["rope_parameters"], "full_attention": {
                "rope_type": "linear", "rope_theta": 160000.0, "factor": 2.0}}},
             "rope_type = 'linear'; mpiattn builds 'default' RoPE only"),
            ("act", {"hidden_activation": "gelu_pytorch_tanh"},
             "hidden_activation = 'gelu_pytorch_tanh'; mpiattn runs ModernBERT with exact")):
        folder = shutil.copytree(base, tmp_path / name)
        (folder / "config.json").write_text(json.dumps({**hf, **edit}))
        cases[folder] = want
    for folder, want in cases.items():
        with pytest.raises(InputError) as err:
            cfg = model_cfg(folder, "float64")
            source = open_source(0, cfg.model, np.float64)
            source.embeddings()
            [source.layer(i, head_shard(5, 4, 14, 1, 0)) for i in range(4)]
        assert "\n" not in str(err.value) and want in str(err.value), str(err.value)
    with pytest.raises(config.ConfigError, match="is a ModernBERT model: mpiattn train"):
        check_sequence(model_cfg(base, "float32"), 1, SEQ, "train")  # train's pre-flight
    check_sequence(model_cfg(base, "float32"), 1, SEQ, "run")


def test_window_in_every_attention_path_at_once():
    """One head, plain (batched and per head) and blocked (blocks of 3) under a window of
    +-2 with prefix padding: softmax over |i - j| <= 2 real keys, padding rows 0; the
    attention map of ``output.attention_maps`` is those probabilities."""
    from mpiattn.core import attention as attention_module
    from mpiattn.core.attention import heads_attention
    from mpiattn.core.headstats import HeadStats

    rng = np.random.default_rng(1)
    batch, seq, d = 2, 11, 4
    qkv = rng.standard_normal((batch * seq, 3 * d))
    mask = np.ones((batch, seq), dtype=bool)
    mask[1, 4:] = False
    q, k, v = (qkv.reshape(batch, seq, 3, d)[:, :, i] for i in range(3))
    i = np.arange(seq)
    allowed = (np.abs(i[:, None] - i[None, :]) <= 2)[None] & mask[:, None, :]
    s = np.where(allowed, q @ k.swapaxes(1, 2) / 2.0, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))
        want = p @ v
    for impl, batched in (("plain", True), ("plain", False), ("blocked", False)):
        stats = HeadStats(np, layers=1, first_head=0, heads=1, map_sequences=(1,))
        old = attention_module._BATCHED_SCORES
        attention_module._BATCHED_SCORES = old if batched else 0
        try:
            out = np.empty((batch * seq, d))
            heads_attention(qkv, out, batch, seq, 1, d, KeyMask.from_mask(mask),
                            Options(impl, 3, window=2), stats.at(0))
        finally:
            attention_module._BATCHED_SCORES = old
        np.testing.assert_allclose(out.reshape(batch, seq, d), want, rtol=1e-12, atol=1e-14)
        assert not out.reshape(batch, seq, d)[1, 7:].any()  # out of every real key's reach
        np.testing.assert_allclose(stats.maps[(1, 0)][0], p[1], rtol=1e-12, atol=1e-14)


def test_both_spellings_of_the_config_give_the_same_layers(folders):
    """transformers 5 writes ``layer_types`` and ``rope_parameters``; ModernBERT-base's own
    config.json (transformers 4.48) has ``global_attn_every_n_layers``,
    ``global_rope_theta``, ``local_rope_theta``: both read as the same layers."""
    from mpiattn.io.families import rotary_settings

    saved = json.loads((folders["plain"][0] / "config.json").read_text())
    assert "layer_types" in saved and "rope_parameters" in saved
    old = {"num_hidden_layers": 4, "num_attention_heads": 5, "hidden_size": 20,
           "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
           "local_rope_theta": 10000.0, "local_attention": 8}
    assert rotary_settings(saved) == rotary_settings(old)
    base = {"num_hidden_layers": 22, "num_attention_heads": 12, "hidden_size": 768}
    r = rotary_settings(base)  # ModernBERT-base's defaults: global every 3rd, window 128
    assert r.windows[:4] == (None, 64, 64, None) and r.thetas[:2] == (160000.0, 10000.0)
    assert not (r.norm_bias or r.attention_bias or r.mlp_bias)


def test_a_masked_lm_folder_reads_its_model_prefix(tmp_path):
    """ModernBERT checkpoints are published as ``ModernBertForMaskedLM`` (ModernBERT-base
    itself): its encoder lives under ``model.`` beside the MLM head, which the encoder
    ignores; the hidden states are AutoModel's from that folder."""
    import torch
    import transformers as tf
    from model_folders import TOKENIZER, hf_config, minilm
    from safetensors import safe_open

    torch.manual_seed(4)
    model = tf.ModernBertForMaskedLM(hf_config("modernbert")).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("Wqkv.weight"):
                p.mul_(25.0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    for name in TOKENIZER:
        shutil.copy(minilm() / name, tmp_path / name)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert "model.layers.1.attn.Wqkv.weight" in set(f.keys())
    rng = np.random.default_rng(2)
    ids = rng.integers(1000, 5000, size=(2, SEQ))
    mask = np.ones(ids.shape, dtype=bool)
    mask[1, 10:] = False
    ids = np.where(mask, ids, 0)
    with exact_rope():
        want = hidden_states(tmp_path, ids, mask, "float64")
    got, _ = forward(model_cfg(tmp_path, "float64"), ids, mask, tensor=2)
    assert relative_error(got[mask], want[mask]) <= TOL["float64"]
