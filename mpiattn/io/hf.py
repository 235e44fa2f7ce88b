"""Hugging Face BERT naming: the one table between our shards and ``BertForMaskedLM`` names.

Used by the checkpoint reader (``weights.SafetensorsWeights``, which reads slices by these
names) and by training checkpoints (``to_hf``/``from_hf``, whole tensors). Linear weights
are stored (out, in) by Hugging Face and (in, out) here; Q, K and V are one fused
(hidden, 3 x width) matrix here and three matrices there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.mlm import MLMHead
from ..core.model import Embeddings, LayerShard, split_shard
from ..core.shard import HeadShard

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "sentence_bert_config.json", "modules.json",
                   "config_sentence_transformers.json", "1_Pooling/config.json")
LEADING_POSITIONS = "mpiattn.leading_position_rows"  # RoBERTa family: the padding_idx + 1
# position rows in front of position 0 (read by no token of a whole window: kept, not trained)
PASSTHROUGH = ("bert.pooler.dense.weight", "bert.pooler.dense.bias",  # kept, not trained
               LEADING_POSITIONS)
def module_files(modules_json: bytes | None) -> list[str]:
    """The files of the Dense modules a ``modules.json`` lists (``2_Dense/config.json``,
    ``2_Dense/model.safetensors``): they travel with the tokenizer into checkpoints and
    exports, as Pooling's config does. [] for no or unreadable listing."""
    import json

    try:
        entries = json.loads(modules_json or b"[]")
    except ValueError:
        return []
    out = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):  # not a module: read_pipeline says so where it runs
            continue
        path = entry.get("path")
        if str(entry.get("type", "")).endswith(".Dense") and isinstance(path, str) \
                and path and "/" not in path and not path.startswith("."):
            out += [f"{path}/config.json", f"{path}/model.safetensors"]
    return out


SPECIAL_ALIASES = {"[PAD]": "<pad>", "[UNK]": "<unk>", "[CLS]": "<s>", "[SEP]": "</s>",
                   "[MASK]": "<mask>"}  # BERT's special tokens as the RoBERTa family names them


def special_id(tok: Any, name: str) -> int | None:
    """The id of BERT's special token ``name`` ("[PAD]") in a ``tokenizers.Tokenizer``, or
    of its RoBERTa-family counterpart ("<pad>"); None when it has neither."""
    found = tok.token_to_id(name)
    return tok.token_to_id(SPECIAL_ALIASES.get(name, name)) if found is None else found


FAMILY_ATTRS = ("model_type", "padding_idx")  # a checkpoint's family (attributes of /)
ROBERTA_HEAD = {"dense_w": "lm_head.dense.weight", "dense_b": "lm_head.dense.bias",
                "ln_g": "lm_head.layer_norm.weight", "ln_b": "lm_head.layer_norm.bias",
                "bias": "lm_head.bias"}  # RobertaForMaskedLM's names of ``mlm.MLMHead``

QKV = ("q", "k", "v")
LINEAR = ("w_o", "w_1", "w_2")  # stored transposed
VECTOR = ("b_o", "ln1_g", "ln1_b", "b_1", "b_2", "ln2_g", "ln2_b")


def embedding_names(prefix: str = "bert.") -> dict[str, str]:
    """``Embeddings`` field -> tensor name."""
    e = f"{prefix}embeddings."
    return {"word": e + "word_embeddings.weight", "position": e + "position_embeddings.weight",
            "token_type": e + "token_type_embeddings.weight", "ln_g": e + "LayerNorm.weight",
            "ln_b": e + "LayerNorm.bias"}


def layer_names(index: int, prefix: str = "bert.") -> dict[str, str]:
    """Layer part -> tensor name: ``q_w``/``q_b`` (and k, v), then the ``LayerShard``
    fields other than the fused QKV."""
    pre = f"{prefix}encoder.layer.{index}."
    names = {}
    for part, hf in zip(QKV, ("query", "key", "value"), strict=True):
        names[f"{part}_w"] = f"{pre}attention.self.{hf}.weight"
        names[f"{part}_b"] = f"{pre}attention.self.{hf}.bias"
    names.update({
        "w_o": pre + "attention.output.dense.weight", "b_o": pre + "attention.output.dense.bias",
        "ln1_g": pre + "attention.output.LayerNorm.weight",
        "ln1_b": pre + "attention.output.LayerNorm.bias",
        "w_1": pre + "intermediate.dense.weight", "b_1": pre + "intermediate.dense.bias",
        "w_2": pre + "output.dense.weight", "b_2": pre + "output.dense.bias",
        "ln2_g": pre + "output.LayerNorm.weight", "ln2_b": pre + "output.LayerNorm.bias",
    })
    return names


def head_names() -> dict[str, str]:
    """``mlm.MLMHead`` field -> tensor name (BertForMaskedLM's ``cls.predictions``)."""
    c = "cls.predictions."
    return {"dense_w": c + "transform.dense.weight", "dense_b": c + "transform.dense.bias",
            "ln_g": c + "transform.LayerNorm.weight", "ln_b": c + "transform.LayerNorm.bias",
            "bias": c + "bias"}


def to_hf(emb: Embeddings, layers: list[LayerShard], head: MLMHead) -> dict[str, Any]:
    """Whole-model tensors (``layers`` joined over the head group) in HF naming."""
    out = {name: getattr(emb, f) for f, name in embedding_names().items()}
    for i, p in enumerate(layers):
        names, hidden = layer_names(i), p.w_o.shape[1]
        for j, part in enumerate(QKV):
            cols = slice(j * hidden, (j + 1) * hidden)
            out[names[f"{part}_w"]] = p.w_qkv[:, cols].T
            out[names[f"{part}_b"]] = p.b_qkv[cols]
        out.update({names[f]: getattr(p, f).T for f in LINEAR})
        out.update({names[f]: getattr(p, f) for f in VECTOR})
    for f, name in head_names().items():
        value = getattr(head, f)
        out[name] = value.T if f == "dense_w" else value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf(t: dict[str, Any], layers: int, head_dim: int,
            shard: HeadShard) -> tuple[Embeddings, list[LayerShard], MLMHead]:
    """This rank's shard of the whole-model tensors ``t`` (HF naming), any head split."""
    emb = Embeddings(**{f: t[name] for f, name in embedding_names().items()})
    out = []
    for i in range(layers):
        names = layer_names(i)
        full = LayerShard(
            w_qkv=np.concatenate([t[names[f"{x}_w"]].T for x in QKV], 1),
            b_qkv=np.concatenate([t[names[f"{x}_b"]] for x in QKV]),
            **{f: t[names[f]].T for f in LINEAR}, **{f: t[names[f]] for f in VECTOR},
            head_dim=head_dim,
        )
        out.append(split_shard(full, shard.cols, shard.ffn_cols))
    head = MLMHead(**{f: t[name].T if f == "dense_w" else t[name]
                           for f, name in head_names().items()})
    tables = [emb.word, emb.position, emb.token_type, emb.ln_g, emb.ln_b]
    own = [np.array(a, copy=True, order="C") for a in (*tables, *vars(head).values())]
    return (Embeddings(*own[:5]), out, MLMHead(*own[5:]))
