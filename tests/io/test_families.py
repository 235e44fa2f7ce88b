"""Users' own model folders (#25): every family computes what transformers computes for
it, the folder's sentence-transformers modules give what ``SentenceTransformer.encode``
gives, float16/bfloat16 weights widen exactly, and anything not built is one line.

The folders are built once per session with transformers' own config classes (tiny
random models, 3 heads so that 2 ranks split them unevenly) and ``save_pretrained``
(``model_folders``); head ranks are threads here (``helpers.ThreadGroup``); the command
line and MPI layouts are in ``test_families_cli.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ThreadGroup, run_ranks
from model_folders import build, hidden_states, minilm, st_encode, st_model

from mpiattn import config
from mpiattn.commands.placement import apply_checkpoint_shape
from mpiattn.core.model import encoder_forward
from mpiattn.core.reference import relative_error
from mpiattn.core.shard import head_shard
from mpiattn.errors import InputError
from mpiattn.inputs.textstream import SentenceTokenizer, model_max_length
from mpiattn.io.families import family_of
from mpiattn.io.stmodules import read_pipeline, sentence_pipeline
from mpiattn.io.tensorfile import TensorFile, widen_bf16
from mpiattn.io.weights import open_source

TOL = {"float64": 1e-12, "float32": 1e-5}
ROOT = Path(__file__).resolve().parents[2]
LINES = ["A man is playing a guitar.", "", "Someone plays an acoustic guitar on the stage"
         " of a small club tonight.", "naïve café — déjà vu", "The cat sleeps."]
# (folder name, family, saved dtype, extra config)
FAMILIES = [("bert", "bert", "float64", {}), ("roberta", "roberta", "float64", {}),
            ("xlm-roberta", "xlm-roberta", "float64", {}),
            ("camembert", "camembert", "float32", {"pad_token_id": 0}),
            ("electra", "electra", "float64", {}),
            ("electra-noproj", "electra", "float64", {"embedding_size": 12}),
            ("distilbert", "distilbert", "float64", {}), ("mpnet", "mpnet", "float64", {}),
            ("bert-bf16", "bert", "bfloat16", {}), ("roberta-fp16", "roberta", "float16", {})]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """name -> folder, each built on first use (about 0.3 s each)."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}
    spec = {name: (family, dtype, extra) for name, family, dtype, extra in FAMILIES}

    def get(name: str) -> Path:
        if name not in built:
            family, dtype, extra = spec[name]
            built[name] = build(root / name, family, dtype, seed=len(built), **extra)
        return built[name]

    return get


def with_modules(base: Path, target: Path, modules: list | None, **files: object) -> Path:
    """A copy of ``base`` with other sentence-transformers files."""
    from model_folders import write_modules

    target.mkdir()
    for item in base.iterdir():
        if item.is_file() and item.name not in ("modules.json", "sentence_bert_config.json"):
            shutil.copy(item, target / item.name)
    if modules is not None:
        hidden = json.loads((base / "config.json").read_text()).get("hidden_size", 12)
        write_modules(target, modules, hidden)
    for name, content in files.items():
        (target / name).write_text(json.dumps(content))
    return target


def model_cfg(folder: Path, dtype: str) -> config.Config:
    cfg = config.from_dict({"model.weights": str(folder), "dtype": dtype,
                            "input.seq_len": 16})
    apply_checkpoint_shape(cfg)
    return cfg


def forward(cfg: config.Config, ids: np.ndarray, mask: np.ndarray, ranks: int) -> np.ndarray:
    """The last hidden state (B, S, H) when ``ranks`` threads share the heads (every
    thread's copy must be the same)."""
    m = cfg.model
    source = open_source(cfg.seed, m, np.dtype(cfg.dtype))
    group, out = ThreadGroup(ranks), [None] * ranks

    def work(i: int) -> None:
        shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, ranks, i)
        emb = source.embeddings()
        emb.relative_bias = source.relative_bias(shard)  # MPNet: this rank's columns
        out[i] = encoder_forward(ids, mask, emb,
                                 [source.layer(n, shard) for n in range(m.layers)],
                                 group.member(i), m.layer_norm_eps)

    run_ranks(work, [(i,) for i in range(ranks)], [group])
    assert all(np.array_equal(out[0], o) for o in out[1:])
    return out[0]


def token_batch(pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids (3, 11) with uneven lengths, padding written as the model's pad id."""
    rng = np.random.default_rng(5)
    ids = rng.integers(1000, 5000, size=(3, 11))
    mask = np.ones(ids.shape, dtype=bool)
    mask[1, 7:] = mask[2, 2:] = False
    return np.where(mask, ids, pad), mask


@pytest.mark.parametrize("name", [f[0] for f in FAMILIES])
def test_every_family_equals_transformers_on_1_to_3_ranks(folders, name):
    """Last hidden state of every token (padding too: it is written as the model's pad
    id, as tokenizers pad) against transformers' AutoModel, float64 and float32."""
    folder = folders(name)
    hf = json.loads((folder / "config.json").read_text())
    ids, mask = token_batch(hf.get("pad_token_id", 0) or 0)
    want = hidden_states(folder, ids, mask, "float64")
    for dtype in ("float64", "float32"):
        cfg = model_cfg(folder, dtype)
        for ranks in (1, 2, 3):
            got = forward(cfg, ids, mask, ranks)
            err = relative_error(got, want)
            print(f"{name} {dtype} {ranks} ranks: {err:.1e}")
            assert err <= TOL[dtype], (dtype, ranks, err)


def test_roberta_family_shape_reads_positions_after_padding_idx(folders):
    cfg = model_cfg(folders("roberta"), "float64")
    assert cfg.model.max_positions == 40  # 42 rows - (padding_idx 1 + 1)
    assert cfg.model.type_vocab == 1
    emb = open_source(0, cfg.model, np.float64).embeddings()
    assert emb.position.shape == (42, 12) and emb.padding_idx == 1
    cfg = model_cfg(folders("distilbert"), "float64")
    assert (cfg.model.hidden, cfg.model.heads, cfg.model.ffn, cfg.model.layers) == (12, 3, 20, 2)
    emb = open_source(0, cfg.model, np.float64).embeddings()
    assert not emb.token_type.any() and emb.token_type.shape == (1, 12)
    emb = open_source(0, model_cfg(folders("electra"), "float64").model,
                      np.float64).embeddings()
    assert emb.word.shape == (30522, 8) and emb.project_w.shape == (8, 12)


def test_half_precision_weights_widen_exactly(folders):
    """bfloat16 is the upper half of a float32: every one of the 2^16 patterns widens as
    torch widens it; float16 and bfloat16 folders read what transformers reads."""
    import torch

    bits = np.arange(1 << 16, dtype=np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    got = widen_bf16(bits)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all()
    for name in ("bert-bf16", "roberta-fp16"):
        f = TensorFile(folders(name) / "model.safetensors")
        key = "embeddings.word_embeddings.weight"
        assert f.dtype(key) in ("BF16", "F16") and f.read(key).dtype == np.float32
        assert f.read(key, (slice(3, 5),)).shape == (2, 12)


BASE = "roberta"  # the model under every pipeline case
PIPELINES = {
    "cls-normalize": [("Pooling", {"pooling_mode": "cls"}), ("Normalize", None)],
    "mean": [("Pooling", {"pooling_mode_mean_tokens": True})],
    "max": [("Pooling", {"pooling_mode": "max"})],
    "mean_sqrt_len_tokens": [("Pooling", {"pooling_mode": "mean_sqrt_len_tokens"})],
    "weightedmean": [("Pooling", {"pooling_mode": "weightedmean"})],
    "lasttoken-normalize": [("Pooling", {"pooling_mode": "lasttoken"}), ("Normalize", None)],
    "legacy-three-modes": [("Pooling", {"pooling_mode_mean_tokens": True,
                                        "pooling_mode_max_tokens": True,
                                        "pooling_mode_cls_token": True})],
    "dense-tanh-identity-normalize": [
        ("Pooling", {"pooling_mode": "mean"}), ("Dense", {"out_features": 7, "seed": 1}),
        ("Dense", {"out_features": 5, "seed": 2, "bias": False,
                   "activation_function": "torch.nn.modules.linear.Identity"}),
        ("Normalize", None)],
    "no-modules-json": None,
    "mpnet-mean-normalize": [("Pooling", {"pooling_mode": "mean"}), ("Normalize", None)],
}


def st_inputs(folder: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    tok = SentenceTokenizer(folder / "tokenizer.json", limit, 30522, 1)
    toks = tok.encode(LINES, 0)
    ids, mask, _ = toks.padded(np.arange(len(LINES)))
    return ids, mask


@pytest.mark.parametrize("case", list(PIPELINES))
def test_sentence_transformers_modules_as_the_folder_lists_them(folders, tmp_path, case):
    """Each pooling mode, Dense layers and Normalize present or absent: the pooled rows
    equal ``SentenceTransformer(folder).encode`` (float64 model, float32 Dense weights)."""
    base = folders("mpnet" if case.startswith("mpnet") else BASE)
    folder = with_modules(base, tmp_path / case, PIPELINES[case])
    cfg = model_cfg(folder, "float64")
    limit, source = model_max_length(folder, cfg.model.max_positions)
    assert (limit, source) == ((24, "sentence_bert_config.json max_seq_length")
                               if PIPELINES[case] else (40, "model.max_positions"))
    ids, mask = st_inputs(folder, limit)
    pipe = sentence_pipeline(str(folder), cfg.model.hidden)
    got = pipe(forward(cfg, ids, mask, 2), mask)
    want = st_encode(folder, LINES)
    assert got.shape == want.shape == (len(LINES), pipe.width(12))
    assert relative_error(got, want) <= TOL["float64"], relative_error(got, want)
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1.0) == ("normalize" in case)
    if case == "no-modules-json":
        assert pipe.describe() == "Transformer > Pooling(mean)"
        assert "sentence-transformers' default" in pipe.source


PROMPTS = {"prompts": {"query": "query: ", "passage": "a passage of text: ", "none": ""},
           "default_prompt_name": "passage"}


@pytest.mark.parametrize("include", [False, True])
def test_prompts_are_put_before_every_line_as_encode_does(folders, tmp_path, include):
    """``input.prompt`` (and the folder's default_prompt_name without it) gives
    ``encode(lines, prompt_name=...)``; with include_prompt = false the prompt's tokens
    (counted on the prompt alone, as sentence-transformers counts them) are not pooled.
    2 head ranks; an unknown name is one line listing the folder's prompts."""
    folder = with_modules(folders(BASE), tmp_path / "prompts",
                          [("Pooling", {"pooling_mode": ["cls", "mean"],
                                        "include_prompt": include})],
                          **{"config_sentence_transformers.json": PROMPTS})
    cfg = model_cfg(folder, "float64")
    model = st_model(folder)
    limit, _ = model_max_length(folder, cfg.model.max_positions)
    for name, st_name in (("query", "query"), ("", None), ("none", "none")):
        pipe = sentence_pipeline(str(folder), cfg.model.hidden, name)
        tok = SentenceTokenizer(folder / "tokenizer.json", limit, 30522, 1, pipe.prompt)
        pipe.set_prompt_length(tok.prompt_length)
        ids, mask, _ = tok.encode(LINES, 0).padded(np.arange(len(LINES)))
        got = pipe(forward(cfg, ids, mask, 2 if name else 1), mask)
        want = model.encode(LINES, convert_to_numpy=True, batch_size=4, prompt_name=st_name)
        assert relative_error(got, want) <= TOL["float64"], (name, relative_error(got, want))
        assert pipe.prompt_name == {"": "passage"}.get(name, name if name != "none" else "")
    assert tok.prompt_length == 0 and pipe.prompt == ""  # an empty prompt is none
    cut = sentence_pipeline(str(folder), 12, "query")
    cut.set_prompt_length(3)
    assert cut.prompt == "query: " and cut.describe().endswith(
        "Pooling(cls+mean, prompt excluded)" if not include else "Pooling(cls+mean)")
    with pytest.raises(config.ConfigError) as err:
        sentence_pipeline(str(folder), 12, "qeury")
    assert "input.prompt = 'qeury' is not a prompt of" in str(err.value)
    assert "prompts: 'query', 'passage', 'none')" in str(err.value)


def test_minilm_saved_as_roberta_gives_minilm_embeddings(folders, tmp_path, sentence_model):
    """Real weights under another family: all-MiniLM-L6-v2 as a RobertaModel (its
    position table moved down two rows, padding_idx 1). transformers and
    sentence-transformers give MiniLM's embeddings for that folder; so does mpiattn, at 2
    head ranks (12 heads), float32."""
    from safetensors.numpy import load_file, save_file

    src, folder = minilm(), tmp_path / "minilm-roberta"
    shutil.copytree(src, folder, ignore=lambda d, names: [n for n in names
                                                          if n.endswith((".safetensors",
                                                                         ".onnx", ".bin"))])
    tensors = load_file(str(src / "model.safetensors"))
    table = tensors["embeddings.position_embeddings.weight"]
    tensors["embeddings.position_embeddings.weight"] = np.concatenate(
        [np.zeros((2, table.shape[1]), table.dtype), table])
    tensors.pop("embeddings.position_ids", None)
    save_file(tensors, str(folder / "model.safetensors"))
    hf = json.loads((src / "config.json").read_text())
    hf.update(model_type="roberta", architectures=["RobertaModel"], pad_token_id=1,
              max_position_embeddings=table.shape[0] + 2)
    (folder / "config.json").write_text(json.dumps(hf))
    assert family_of(folder).name == "RoBERTa"
    lines = (ROOT / "data/sentences.txt").read_text(encoding="utf-8").splitlines()[:8]
    cfg = model_cfg(folder, "float32")
    assert cfg.model.max_positions == 512
    tok = SentenceTokenizer(folder / "tokenizer.json", 256, cfg.model.vocab, 2)
    ids, mask, _ = tok.encode(lines, 0).padded(np.arange(len(lines)))
    got = read_pipeline(folder)(forward(cfg, ids, mask, 2), mask)
    want = sentence_model.encode(lines, convert_to_numpy=True)  # MiniLM itself
    from sentence_transformers import SentenceTransformer

    as_roberta = SentenceTransformer(str(folder), device="cpu").encode(lines)
    assert np.abs(as_roberta - want).max() <= 1e-5  # the construction is an oracle
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()


@pytest.mark.parametrize("case", ["deberta", "no-type", "no-tensor", "pooling", "module",
                                  "prompt",
                                  "dense-bin", "int-weights", "activation"])
def test_what_is_not_built_is_one_line(folders, tmp_path, case):
    """Unknown architecture, a missing tensor, a pooling mode, module, default prompt,
    pickled Dense layer, integer weights, activation that are not built: one line naming
    what was found and what is built."""
    from safetensors.numpy import load_file, save_file

    folder = with_modules(folders(BASE), tmp_path / case,
                          [("Pooling", {"pooling_mode": "mean"}),
                           ("Dense", {"out_features": 4, "seed": 3})])
    if case == "deberta":
        hf = json.loads((folder / "config.json").read_text())
        hf.update(model_type="deberta-v2", architectures=["DebertaV2Model"])
        (folder / "config.json").write_text(json.dumps(hf))
        want = ("model_type 'deberta-v2' (DebertaV2Model) is not supported; mpiattn runs"
                " model_type bert")
    elif case == "no-type":  # no BERT guess: a hand-written config.json names its type
        hf = json.loads((folder / "config.json").read_text())
        del hf["model_type"], hf["architectures"]
        (folder / "config.json").write_text(json.dumps(hf))
        want = ("names neither model_type nor architectures: add \"model_type\" (mpiattn"
                " runs bert, roberta")
        assert json.loads((minilm() / "config.json").read_text())["model_type"] == "bert"
    elif case in ("no-tensor", "int-weights"):
        tensors = load_file(str(folder / "model.safetensors"))
        key = "encoder.layer.1.attention.self.key.bias"
        if case == "no-tensor":
            del tensors[key]
            want = f"tensor '{key}' is missing (a RoBERTa model needs it"
        else:
            tensors[key] = tensors[key].astype(np.int32)
            want = f"tensor '{key}' is stored as I32; mpiattn reads floating-point"
        (folder / "model.safetensors").unlink()
        save_file(tensors, str(folder / "model.safetensors"))
    elif case == "pooling":
        (folder / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode": "attention"}))
        want = "pooling mode 'attention' is not built; mpiattn pools cls, max, mean"
    elif case == "module":
        entries = json.loads((folder / "modules.json").read_text())
        entries[2]["type"] = "sentence_transformers.models.LayerNorm"
        (folder / "modules.json").write_text(json.dumps(entries))
        want = "module 'LayerNorm' is not built; mpiattn runs Transformer, Pooling, Dense"
    elif case == "prompt":
        (folder / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": {"query": "query: "}, "default_prompt_name": "doc"}))
        want = "default_prompt_name = 'doc' is not one of its prompts ('query')"
    elif case == "dense-bin":
        (folder / "2_Dense/model.safetensors").rename(folder / "2_Dense/pytorch_model.bin")
        want = "is a PyTorch pickle, which mpiattn does not read"
    else:
        hf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**hf, "hidden_act": "gelu_new"}))
        want = "hidden_act = 'gelu_new'; mpiattn runs RoBERTa with exact (erf) 'gelu' only"
    with pytest.raises(InputError) as err:
        cfg = model_cfg(folder, "float64")
        sentence_pipeline(str(folder), cfg.model.hidden)
        source = open_source(0, cfg.model, np.float64)
        source.embeddings()
        [source.layer(i, head_shard(3, 4, 20, 1, 0)) for i in range(2)]
    line = str(err.value)
    assert "\n" not in line and want in line, line


def test_mpnet_refuses_what_its_bias_is_not_built_for(folders):
    """MPNet's relative position bias is built for plain attention without sequence
    parallelism: the others are one line before any work."""
    folder = folders("mpnet")
    for key, value, want in (("parallel.sequence", 2, "parallel.sequence > 1 is not built"),
                             ("attention.impl", "blocked", 'attention.impl = "blocked" is')):
        cfg = config.from_dict({"model.weights": str(folder), "input.seq_len": 16,
                                key: value})
        with pytest.raises(config.ConfigError, match=want):
            apply_checkpoint_shape(cfg)


def test_without_modules_json_the_tokenizer_limit_is_sentence_transformers(folders, tmp_path):
    """No modules.json: sentence-transformers cuts at the tokenizer's model_max_length
    (capped at the positions), not at sentence_bert_config.json; so does mpiattn."""
    from sentence_transformers import SentenceTransformer

    folder = with_modules(folders(BASE), tmp_path / "plain", None,
                          **{"sentence_bert_config.json": {"max_seq_length": 30}})
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": 17}))
    want = SentenceTransformer(str(folder), device="cpu").max_seq_length
    assert model_max_length(folder, 40) == (want, "tokenizer_config.json model_max_length")
    assert want == 17


def test_training_other_families_is_one_line(folders):
    """train's pre-flight (``check_sequence(..., "train")``) refuses a family it has no
    names for, naming those it trains; DistilBERT trains as the BERT it equals, the
    RoBERTa family as itself."""
    from mpiattn.commands.placement import check_sequence

    for name in ("electra", "mpnet"):
        cfg = model_cfg(folders(name), "float32")
        with pytest.raises(config.ConfigError, match="mpiattn train fine-tunes BERT,"
                           " DistilBERT, RoBERTa, XLM-RoBERTa and CamemBERT models"):
            check_sequence(cfg, 1, 16, "train")
        check_sequence(cfg, 1, 16, "run")
    for name in ("distilbert", "roberta", "camembert"):
        check_sequence(model_cfg(folders(name), "float32"), 1, 16, "train")


@pytest.mark.parametrize("batched", [True, False])
def test_position_bias_reaches_outputs_and_attention_maps(monkeypatch, batched):
    """MPNet's (h, S, S) bias in both CPU attention paths: the output and the maps of
    output.attention_maps are softmax(q k^T / sqrt(d) + bias + mask) and its product."""
    from mpiattn.core import attention as attention_module
    from mpiattn.core.attention import KeyMask, Options, heads_attention
    from mpiattn.core.headstats import HeadStats
    from mpiattn.core.ops import relative_buckets

    if not batched:
        monkeypatch.setattr(attention_module, "_BATCHED_SCORES", 0)
    rng = np.random.default_rng(2)
    batch, seq, heads, d = 2, 19, 3, 4
    qkv = rng.standard_normal((batch * seq, 3 * heads * d))
    mask = np.ones((batch, seq), dtype=bool)
    mask[1, 11:] = False
    position = rng.standard_normal((32, heads))[relative_buckets(seq, np)].transpose(2, 0, 1)
    stats = HeadStats(np, layers=1, first_head=0, heads=heads, map_sequences=(1,))
    out = np.empty((batch * seq, heads * d))
    heads_attention(qkv, out, batch, seq, heads, d, KeyMask.from_mask(mask),
                    Options("plain", position_bias=position), stats.at(0))
    q, k, v = (qkv.reshape(batch, seq, 3, heads, d)[:, :, i].transpose(0, 2, 1, 3)
               for i in range(3))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(d) + position[None]
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(stats.maps[(1, 0)], probs[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.reshape(batch, seq, heads, d).transpose(0, 2, 1, 3),
                               probs @ v, rtol=1e-10, atol=1e-12)


def test_roberta_special_tokens_are_read_by_their_role():
    """Training and export read BERT's specials ([PAD], [UNK], [CLS], [SEP], [MASK]) or, in
    a RoBERTa-family tokenizer, <pad>, <unk>, <s>, </s>, <mask>."""
    from tokenizers import Tokenizer, models

    from mpiattn.inputs.corpus import SPECIALS
    from mpiattn.io.hf import special_id

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "hi": 4, "<mask>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    assert [special_id(tok, name) for name in SPECIALS] == [1, 3, 0, 2, 5]
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "<pad>": 1}, unk_token="[PAD]"))
    assert (special_id(tok, "[PAD]"), special_id(tok, "[CLS]")) == (0, None)
