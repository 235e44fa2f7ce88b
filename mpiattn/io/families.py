"""Model families: which architecture a folder holds, read from its ``config.json``, and
the tensor names and ``config.json`` keys of each.

    family = family_of(folder)          # InputError (one line) when it is not built here
    shape = family.shape(config)        # model.* values
    names = family.layer_names(3, "roberta.")

The family comes from ``model_type`` (else the first of ``architectures``), never from a
guess: anything that is not in ``FAMILIES`` is refused, naming what was found and what is
supported. Every family here runs the same post-LayerNorm encoder layer (Q, K, V, output
projection, exact-erf GELU MLP); they differ in their embeddings and their names:

- BERT: positions 0..S-1, token types.
- RoBERTa, XLM-RoBERTa, CamemBERT: positions ``padding_idx + 1 + (index among the real
  tokens)``, padding at ``padding_idx`` (the table has ``padding_idx + 1`` extra rows),
  one token type; names under ``roberta.`` or none.
- DistilBERT: no token types; its own names (``transformer.layer.N.attention.q_lin``) and
  config keys (``dim``, ``n_layers``, ``n_heads``, ``hidden_dim``); LayerNorm eps 1e-12.
- ELECTRA: BERT's layers; embeddings of ``embedding_size`` projected to the hidden size
  by ``embeddings_project`` when the two differ.
- MPNet: RoBERTa positions (padding row 1), no token types, and one relative position
  bias (32 buckets, max distance 128) added to every layer's scores
  (``core.ops.relative_buckets``); its names (``encoder.layer.N.attention.attn.q``).

ModernBERT is the one family with another layer (``core.model.RotaryLayerShard``):
pre-LayerNorm, RoPE with a global and a local base (``core.rotary``), GeGLU, biases only
where its config asks (``norm_bias``, ``attention_bias``, ``mlp_bias``), a final
LayerNorm, and a sliding window of ``local_attention`` tokens (+-local_attention/2) in
every layer that is not global (``layer_types``, else every ``global_attn_every_n_layers``
-th layer from 0 is global); ``rotary_settings`` reads all that from config.json.
NomicBERT (``nomic_bert``: nomic-embed-text-v1, v1.5) runs the same rotary layer in
BERT's post-LayerNorm order (``prenorm`` false): word + token-type embeddings and
``emb_ln``, no position table, RoPE over the whole head (``rotary_emb_base``), SwiGLU
(``silu(fc12 x) * fc11 x``), biases per ``qkv_proj_bias``, ``mlp_fc1_bias``,
``mlp_fc2_bias``; ``nomic_settings`` reads it and refuses, in one line, every setting
nomic-embed-text does not use (prenorm, partial or interleaved RoPE, scaled RoPE, ...).
Its oracle is Nomic's own remote code (``tests/oracles/nomic_bert``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import hf

_BERT_KEYS = {  # config.json key -> model.* key
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "hidden_size": "hidden",
    "intermediate_size": "ffn",
    "vocab_size": "vocab",
    "type_vocab_size": "type_vocab",
    "max_position_embeddings": "max_positions",
    "layer_norm_eps": "layer_norm_eps",
}
_DISTILBERT_KEYS = {"n_layers": "layers", "n_heads": "heads", "dim": "hidden",
                    "hidden_dim": "ffn", "vocab_size": "vocab",
                    "max_position_embeddings": "max_positions"}


def _bert_embedding_names(prefix: str) -> dict[str, str]:
    e = f"{prefix}embeddings."
    return {"word": e + "word_embeddings.weight", "position": e + "position_embeddings.weight",
            "token_type": e + "token_type_embeddings.weight", "ln_g": e + "LayerNorm.weight",
            "ln_b": e + "LayerNorm.bias"}


def _bert_layer_names(index: int, prefix: str) -> dict[str, str]:
    return hf.layer_names(index, prefix)  # BERT's names are the one table of ``hf``


def _untyped_embedding_names(prefix: str) -> dict[str, str]:
    """BERT's embedding names without the token-type table (DistilBERT, MPNet)."""
    e = f"{prefix}embeddings."
    return {"word": e + "word_embeddings.weight", "position": e + "position_embeddings.weight",
            "ln_g": e + "LayerNorm.weight", "ln_b": e + "LayerNorm.bias"}


def _distilbert_layer_names(index: int, prefix: str) -> dict[str, str]:
    pre = f"{prefix}transformer.layer.{index}."
    names = {}
    for part in ("q", "k", "v"):
        names[f"{part}_w"] = f"{pre}attention.{part}_lin.weight"
        names[f"{part}_b"] = f"{pre}attention.{part}_lin.bias"
    names.update({
        "w_o": pre + "attention.out_lin.weight", "b_o": pre + "attention.out_lin.bias",
        "ln1_g": pre + "sa_layer_norm.weight", "ln1_b": pre + "sa_layer_norm.bias",
        "w_1": pre + "ffn.lin1.weight", "b_1": pre + "ffn.lin1.bias",
        "w_2": pre + "ffn.lin2.weight", "b_2": pre + "ffn.lin2.bias",
        "ln2_g": pre + "output_layer_norm.weight", "ln2_b": pre + "output_layer_norm.bias",
    })
    return names


def _mpnet_layer_names(index: int, prefix: str) -> dict[str, str]:
    pre = f"{prefix}encoder.layer.{index}."
    names = {}
    for part in ("q", "k", "v"):
        names[f"{part}_w"] = f"{pre}attention.attn.{part}.weight"
        names[f"{part}_b"] = f"{pre}attention.attn.{part}.bias"
    names.update({
        "w_o": pre + "attention.attn.o.weight", "b_o": pre + "attention.attn.o.bias",
        "ln1_g": pre + "attention.LayerNorm.weight", "ln1_b": pre + "attention.LayerNorm.bias",
        "w_1": pre + "intermediate.dense.weight", "b_1": pre + "intermediate.dense.bias",
        "w_2": pre + "output.dense.weight", "b_2": pre + "output.dense.bias",
        "ln2_g": pre + "output.LayerNorm.weight", "ln2_b": pre + "output.LayerNorm.bias",
    })
    return names


@dataclass(frozen=True)
class Family:
    """One architecture: names, config keys and the embedding kind."""

    name: str  # as users know it
    prefixes: tuple[str, ...]  # where its tensors may live ("bert.", "")
    config_keys: dict[str, str]
    embedding_names: Callable[[str], dict[str, str]]
    layer_names: Callable[[int, str], dict[str, str]]
    activation_key: str = "hidden_act"
    roberta_positions: bool = False  # positions from padding_idx (RoBERTa family)
    token_types: bool = True
    project: bool = False  # ELECTRA: embeddings_project when embedding_size != hidden
    fixed: dict[str, Any] = field(default_factory=dict)  # model.* values the family fixes
    relative_bias: str = ""  # MPNet: the shared relative position bias table's name
    fixed_padding_idx: int | None = None  # MPNet: 1 whatever pad_token_id says
    rotary: Callable[[dict, Any], Rotary] | None = None  # rotary families (ModernBERT,
    # NomicBERT): their own layer, its settings read by this (``rotary_settings``)
    activation: str = "gelu"  # the one activation built (NomicBERT: "swiglu")
    activation_default: str = "gelu"  # what a config without activation_key means
    derive: Callable[[dict], dict[str, Any]] | None = None  # model.* values computed
    # from several keys (NomicBERT's rounded MLP width and vocabulary)

    def padding_idx(self, config: dict) -> int | None:
        """RoBERTa family: the padding row of the position table (``pad_token_id``)."""
        if not self.roberta_positions:
            return None
        if self.fixed_padding_idx is not None:
            return self.fixed_padding_idx
        pad = config.get("pad_token_id", 1)
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
            raise InputError(f"config.json: pad_token_id = {pad!r}: the {self.name} position"
                             " table needs a non-negative integer padding row")
        return pad

    def position_rows(self, config: dict) -> int:
        """Rows of the position table in front of position 0 (RoBERTa: padding_idx + 1)."""
        pad = self.padding_idx(config)
        return 0 if pad is None else pad + 1

    def shape(self, config: dict) -> dict[str, Any]:
        """model.* values from ``config.json``: max_positions counts usable positions
        (RoBERTa's 514-row table gives 512)."""
        out = {ours: config[theirs] for theirs, ours in self.config_keys.items()
               if theirs in config}
        out.update(self.fixed)
        if self.derive is not None:
            out.update(self.derive(config))
        if "max_positions" in out and isinstance(out["max_positions"], int):
            out["max_positions"] -= self.position_rows(config)
        return out

    def embedding_size(self, config: dict, hidden: int) -> int:
        """Width of the embedding tables (ELECTRA's ``embedding_size``; else hidden)."""
        size = config.get("embedding_size", hidden) if self.project else hidden
        return size if isinstance(size, int) and size > 0 else hidden


_ROBERTA = dict(prefixes=("roberta.", ""), config_keys=_BERT_KEYS,
                embedding_names=_bert_embedding_names, layer_names=_bert_layer_names,
                roberta_positions=True)

FAMILIES: dict[str, Family] = {  # config.json model_type -> family
    "bert": Family("BERT", ("bert.", ""), _BERT_KEYS, _bert_embedding_names,
                   _bert_layer_names),
    "roberta": Family("RoBERTa", **_ROBERTA),
    "xlm-roberta": Family("XLM-RoBERTa", **_ROBERTA),
    "camembert": Family("CamemBERT", **_ROBERTA),
    "electra": Family("ELECTRA", ("electra.", ""), _BERT_KEYS, _bert_embedding_names,
                      _bert_layer_names, project=True),
    "distilbert": Family("DistilBERT", ("distilbert.", ""), _DISTILBERT_KEYS,
                         _untyped_embedding_names, _distilbert_layer_names,
                         activation_key="activation", token_types=False,
                         fixed={"type_vocab": 1, "layer_norm_eps": 1e-12}),
}
FAMILIES["mpnet"] = Family(
    "MPNet", ("mpnet.", ""), _BERT_KEYS, _untyped_embedding_names, _mpnet_layer_names,
    roberta_positions=True, token_types=False, fixed={"type_vocab": 1},
    relative_bias="encoder.relative_attention_bias.weight", fixed_padding_idx=1)
_MODERNBERT_KEYS = {"num_hidden_layers": "layers", "num_attention_heads": "heads",
                    "hidden_size": "hidden", "intermediate_size": "ffn", "vocab_size": "vocab",
                    "max_position_embeddings": "max_positions", "norm_eps": "layer_norm_eps"}


def _modernbert_embedding_names(prefix: str) -> dict[str, str]:
    e = f"{prefix}embeddings."
    return {"word": e + "tok_embeddings.weight", "ln_g": e + "norm.weight",
            "ln_b": e + "norm.bias"}


def _modernbert_layer_names(index: int, prefix: str) -> dict[str, str]:
    pre = f"{prefix}layers.{index}."
    names = {"qkv_w": "attn.Wqkv.weight", "qkv_b": "attn.Wqkv.bias", "w_o": "attn.Wo.weight",
             "b_o": "attn.Wo.bias", "ln1_g": "attn_norm.weight", "ln1_b": "attn_norm.bias",
             "ln2_g": "mlp_norm.weight", "ln2_b": "mlp_norm.bias", "w_1": "mlp.Wi.weight",
             "b_1": "mlp.Wi.bias", "w_2": "mlp.Wo.weight", "b_2": "mlp.Wo.bias"}
    out = {k: pre + v for k, v in names.items()}
    out.update(final_g=f"{prefix}final_norm.weight", final_b=f"{prefix}final_norm.bias")
    return out


_ARCHITECTURES = {"NomicBert": "nomic_bert", "ModernBert": "modernbert", "MPNet": "mpnet",
                  "Bert": "bert", "Roberta": "roberta", "XLMRoberta": "xlm-roberta",
                  "Camembert": "camembert", "Electra": "electra", "DistilBert": "distilbert"}
_DECODER_AWARE = ("BERT", "RoBERTa", "XLM-RoBERTa", "CamemBERT", "ELECTRA")  # causal
# attention in transformers when config.json says is_decoder (the others ignore the key)
ROBERTA_NAMES = ("RoBERTa", "XLM-RoBERTa", "CamemBERT")  # RobertaForMaskedLM's names


def model_type(config: dict) -> str | None:
    """``model_type``, else the family of the first of ``architectures`` (``BertModel``)."""
    kind = config.get("model_type")
    if isinstance(kind, str) and kind:
        return kind
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        for stem in sorted(_ARCHITECTURES, key=len, reverse=True):
            if arch[0].startswith(stem) and arch[0][len(stem):][:1].isupper():
                return _ARCHITECTURES[stem]
        return arch[0]
    return None


def read_config(folder: Path) -> dict | None:
    """A folder's ``config.json`` as a dict, None when there is none."""
    from .safefile import read_json

    path = folder / "config.json"
    if not os.path.lexists(path):
        return None
    config = read_json(path, "model folder file")  # a FIFO or device: one line, no hang
    if not isinstance(config, dict):
        raise InputError(f"'{path}' must hold a JSON object (a Hugging Face config.json)")
    return config


def family_of(folder: Path, config: dict | None = None) -> Family:
    """The family of the model in ``folder`` (its ``config.json``). A folder without a
    config.json must hold BERT names (its tensors are checked by name when read); a
    config.json must name its ``model_type`` or ``architectures``.

    Raises InputError (one line): neither key, a model_type or architecture that is not
    built here, an activation other than exact GELU, positions other than absolute.
    """
    if config is None:
        config = read_config(folder)
    if config is None:
        return FAMILIES["bert"]
    path = folder / "config.json"
    kind = model_type(config)
    if kind is None:  # a hand-written config.json (transformers refuses it too): no guess
        raise InputError(f"'{path}' names neither model_type nor architectures: add"
                         f' "model_type" (mpiattn runs {SUPPORTED})')
    family = FAMILIES.get(kind)
    if family is None:
        arch = config.get("architectures")
        found = f"model_type '{kind}'" + (f" ({arch[0]})" if isinstance(arch, list) and arch
                                          and arch[0] != kind else "")
        raise InputError(f"'{path}': {found} is not supported; mpiattn runs model_type"
                         f" {SUPPORTED}")
    buckets = config.get("relative_attention_num_buckets", 32)
    if family.relative_bias and buckets != 32:
        raise InputError(f"'{path}': relative_attention_num_buckets = {buckets!r}; mpiattn"
                         " builds MPNet's 32 buckets (transformers' own encoder uses 32)")
    act = config.get(family.activation_key, family.activation_default)
    if act != family.activation:
        built = ("exact (erf) 'gelu'" if family.activation == "gelu"
                 else repr(family.activation))
        raise InputError(f"'{path}': {family.activation_key} = {act!r}; mpiattn runs {family.name}"
                         f" with {built} only")
    if family.rotary:
        family.rotary(config, path)  # every refusal before any work
    if config.get("is_decoder") and family.name in _DECODER_AWARE:
        raise InputError(f"'{path}': is_decoder = true: transformers runs this {family.name}"
                         " model with causal (left-to-right) attention; mpiattn builds"
                         " bidirectional encoders only")
    kind_pos = config.get("position_embedding_type", "absolute")
    if kind_pos != "absolute":
        raise InputError(f"'{path}': position_embedding_type = {kind_pos!r}; mpiattn builds"
                         " 'absolute' positions only")
    return family


@dataclass(frozen=True)
class Rotary:
    """A rotary family's per-layer settings from config.json (ModernBERT, NomicBERT)."""

    thetas: tuple[float, ...]  # RoPE base of each layer
    windows: tuple[int | None, ...]  # each layer's half window (None: global attention)
    norm_bias: bool
    attention_bias: bool  # Q, K, V and the output projection
    mlp_bias: bool  # the MLP's first linear (both halves)
    out_bias: bool | None = None  # the MLP's second linear (None: as mlp_bias)
    prenorm: bool = True  # ModernBERT; NomicBERT: BERT's post-LayerNorm order
    act: str = "gelu"  # the gate's activation: "gelu" (GeGLU), "silu" (SwiGLU)

    @property
    def mlp_out_bias(self) -> bool:
        return self.mlp_bias if self.out_bias is None else self.out_bias


def rotary_settings(config: dict, path: Path | str = "config.json") -> Rotary:
    """Layer types, RoPE bases and biases of a ModernBERT config.json, in transformers'
    two spellings (``layer_types`` and ``rope_parameters``; the older
    ``global_attn_every_n_layers``, ``global_rope_theta``, ``local_rope_theta``).

    Raises InputError (one line): a RoPE type other than "default" (scaled RoPE), an odd
    head width, unknown layer types, a window that is not a positive integer.
    """
    layers = config.get("num_hidden_layers", 22)
    heads, hidden = config.get("num_attention_heads", 12), config.get("hidden_size", 768)
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)) \
            or hidden % heads or (hidden // heads) % 2:
        raise InputError(f"'{path}': hidden_size {hidden!r} over num_attention_heads"
                         f" {heads!r}: RoPE needs an even head width")
    types = config.get("layer_types")
    if types is None:
        every = config.get("global_attn_every_n_layers", 3)
        if not isinstance(every, int) or every < 1:
            raise InputError(f"'{path}': global_attn_every_n_layers = {every!r}; a positive"
                             " integer")
        types = ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or \
            any(t not in ("full_attention", "sliding_attention") for t in types):
        raise InputError(f"'{path}': layer_types = {types!r}; mpiattn builds one of"
                         " 'full_attention', 'sliding_attention' per layer")
    if config.get("rope_scaling"):
        raise InputError(f"'{path}': rope_scaling = {config['rope_scaling']!r}; mpiattn"
                         " builds ModernBERT's default (unscaled) RoPE")
    params = config.get("rope_parameters") or {}
    defaults = {"full_attention": config.get("global_rope_theta", 160_000.0),
                "sliding_attention": config.get("local_rope_theta", 10_000.0)}
    thetas = {}
    for kind, default in defaults.items():
        entry = params.get(kind) or {}
        if entry.get("rope_type", "default") != "default":
            raise InputError(f"'{path}': rope_parameters {kind} rope_type ="
                             f" {entry['rope_type']!r}; mpiattn builds 'default' RoPE only")
        theta = entry.get("rope_theta", default)
        if theta is None:
            theta = 10_000.0 if kind == "sliding_attention" else 160_000.0
        if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 1:
            raise InputError(f"'{path}': {kind} rope_theta = {theta!r}; a number above 1")
        thetas[kind] = float(theta)
    local = config.get("local_attention", 128)
    if isinstance(local, bool) or not isinstance(local, int) or local < 2:
        raise InputError(f"'{path}': local_attention = {local!r}; an integer >= 2 (the"
                         " window's width in tokens)")
    return Rotary(tuple(thetas[t] for t in types),
                  tuple(None if t == "full_attention" else local // 2 for t in types),
                  bool(config.get("norm_bias", False)), bool(config.get("attention_bias", False)),
                  bool(config.get("mlp_bias", False)))


FAMILIES["modernbert"] = Family(
    "ModernBERT", ("model.", ""), _MODERNBERT_KEYS, _modernbert_embedding_names,
    _modernbert_layer_names, activation_key="hidden_activation", token_types=False,
    fixed={"type_vocab": 1}, rotary=rotary_settings)

# NomicBERT: GPT2Config's keys (and its defaults where a key is absent)
_NOMIC_DEFAULTS = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257,
                   "type_vocab_size": 2, "n_positions": 1024, "layer_norm_epsilon": 1e-5}
_NOMIC_KEYS = {"n_layer": "layers", "n_head": "heads", "n_embd": "hidden",
               "vocab_size": "vocab", "type_vocab_size": "type_vocab",
               "n_positions": "max_positions", "layer_norm_epsilon": "layer_norm_eps"}


def _round_up(value: Any, multiple: Any) -> Any:
    if isinstance(value, int) and isinstance(multiple, int) and multiple > 0 \
            and not isinstance(value, bool):
        return -(-value // multiple) * multiple
    return value  # not an integer: model.* refuses it in one line


def _nomic_shape(config: dict) -> dict[str, Any]:
    """model.* of a NomicBERT config.json, as its model code builds it: GPT2Config's
    defaults for absent keys; the vocabulary rounded up to ``pad_vocab_size_multiple``
    (``NomicBertModel``); the MLP width ``n_inner`` (absent: int(8 n_embd / 3)) rounded
    up to a multiple of 256 (``NomciBertGatedMLP``'s ``multiple_of``)."""
    out = {ours: config.get(theirs, _NOMIC_DEFAULTS[theirs])
           for theirs, ours in _NOMIC_KEYS.items()}
    hidden = out["hidden"]
    inner = config.get("n_inner") or (int(8 * hidden / 3) if isinstance(hidden, int)
                                      else None)
    out["ffn"] = _round_up(inner, 256)
    out["vocab"] = _round_up(out["vocab"], config.get("pad_vocab_size_multiple", 1))
    return out


def _nomic_embedding_names(prefix: str) -> dict[str, str]:
    return {"word": f"{prefix}embeddings.word_embeddings.weight",
            "token_type": f"{prefix}embeddings.token_type_embeddings.weight",
            "ln_g": f"{prefix}emb_ln.weight", "ln_b": f"{prefix}emb_ln.bias"}


def _nomic_layer_names(index: int, prefix: str) -> dict[str, str]:
    """``w_1a``/``b_1a``: the activated half (fc12, under silu), ``w_1b``/``b_1b``: the
    linear half (fc11)."""
    pre = f"{prefix}encoder.layers.{index}."
    names = {"qkv_w": "attn.Wqkv.weight", "qkv_b": "attn.Wqkv.bias",
             "w_o": "attn.out_proj.weight", "b_o": "attn.out_proj.bias",
             "ln1_g": "norm1.weight", "ln1_b": "norm1.bias", "ln2_g": "norm2.weight",
             "ln2_b": "norm2.bias", "w_1a": "mlp.fc12.weight", "b_1a": "mlp.fc12.bias",
             "w_1b": "mlp.fc11.weight", "b_1b": "mlp.fc11.bias", "w_2": "mlp.fc2.weight",
             "b_2": "mlp.fc2.bias"}
    return {k: pre + v for k, v in names.items()}


def nomic_settings(config: dict, path: Path | str = "config.json") -> Rotary:
    """A NomicBERT config.json as nomic-embed-text-v1 and v1.5 use it: post-LayerNorm
    blocks, RoPE over the whole head (not interleaved, base ``rotary_emb_base``), SwiGLU,
    biases per ``qkv_proj_bias``, ``mlp_fc1_bias``, ``mlp_fc2_bias``.

    Raises InputError (one line) for what its model code would do otherwise and mpiattn
    does not build: ``prenorm``, ``parallel_block``, ``use_rms_norm``, ``causal``,
    ``rotary_emb_fraction`` other than 1, interleaved RoPE, xPos (``rotary_emb_scale_base``),
    dynamic NTK scaling (``rotary_scaling_factor``), ``norm_mlp``, ``rotary_head_dim``,
    fewer key/value heads, no token types, an odd head width.
    """
    layers = config.get("n_layer", 12)
    heads, hidden = config.get("n_head", 12), config.get("n_embd", 768)
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)) \
            or hidden % heads or (hidden // heads) % 2:
        raise InputError(f"'{path}': n_embd {hidden!r} over n_head {heads!r}: RoPE needs an"
                         " even head width")
    wanted = {"prenorm": False, "parallel_block": False, "use_rms_norm": False,
              "causal": False, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
              "rotary_emb_scale_base": None, "rotary_scaling_factor": None,
              "norm_mlp": False, "rotary_head_dim": False}
    absent = {"rotary_emb_fraction": 0.0}  # NomicBertConfig's defaults that differ
    for key, want in wanted.items():
        value = config.get(key, absent.get(key, want))
        if value != want and not (key == "rotary_scaling_factor" and not value):
            raise InputError(f"'{path}': {key} = {json.dumps(value)}; mpiattn builds"
                             f" NomicBERT as nomic-embed-text-v1/v1.5 use it ({key} ="
                             f" {json.dumps(want)})")
    kv = config.get("num_heads_kv")
    if kv is not None and kv != heads:
        raise InputError(f"'{path}': num_heads_kv = {kv!r}; mpiattn builds one key and value"
                         " head per query head")
    types = config.get("type_vocab_size", 2)
    if isinstance(types, bool) or not isinstance(types, int) or types < 1:
        raise InputError(f"'{path}': type_vocab_size = {types!r}; mpiattn builds NomicBERT"
                         " with a token-type table (nomic-embed-text's has 2 rows)")
    theta = config.get("rotary_emb_base", 10_000)
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 1:
        raise InputError(f"'{path}': rotary_emb_base = {theta!r}; a number above 1")
    multiple = config.get("pad_vocab_size_multiple", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise InputError(f"'{path}': pad_vocab_size_multiple = {multiple!r}; a positive"
                         " integer")
    return Rotary((float(theta),) * layers, (None,) * layers, norm_bias=True,
                  attention_bias=bool(config.get("qkv_proj_bias", True)),
                  mlp_bias=bool(config.get("mlp_fc1_bias", True)),
                  out_bias=bool(config.get("mlp_fc2_bias", True)), prenorm=False,
                  act="silu")


FAMILIES["nomic_bert"] = Family(
    "NomicBERT", ("",), {}, _nomic_embedding_names, _nomic_layer_names,
    activation_key="activation_function", activation="swiglu", activation_default="gelu_new",
    rotary=nomic_settings, derive=_nomic_shape)
SUPPORTED = ", ".join(FAMILIES)


def trained_as(folder: Path | None) -> dict[str, Any]:
    """What ``mpiattn train`` records of a model folder's family (checkpoint attributes
    ``hf.FAMILY_ATTRS``, read by the export): ``model_type`` ("bert" for BERT, DistilBERT
    and seeded weights, which train and export as BERT; the RoBERTa family's own) and the
    RoBERTa family's ``padding_idx`` (-1: none)."""
    config = read_config(folder) if folder is not None else None
    family = family_of(folder, config) if config is not None else FAMILIES["bert"]
    if family.name not in ROBERTA_NAMES:
        return {"model_type": "bert", "padding_idx": -1}
    return {"model_type": model_type(config), "padding_idx": family.padding_idx(config)}
