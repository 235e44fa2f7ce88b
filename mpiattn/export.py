"""Hugging Face model folders: what a training checkpoint becomes so other tools can use it.

A folder holds ``model.safetensors`` (``BertForMaskedLM`` names: ``bert.*`` and
``cls.predictions.*``), ``config.json`` and the tokenizer files the model was trained
with. ``transformers.BertModel.from_pretrained(DIR)``, ``BertForMaskedLM`` and
``mpiattn run --set model.weights=DIR`` all load it.

A model trained on a remapped vocabulary (seeded weights: the train split's most frequent
token ids, the rest read as [UNK]) is exported on the tokenizer's own ids, so the copied
tokenizer and the model agree: the word embedding row of every tokenizer id is the row of
its model id, ids outside the trained vocabulary get the [UNK] row (as in training) and
a decoder bias of ``UNTRAINED_BIAS`` (never predicted: exp(-1e4) is 0 in float32). The id
map is kept in ``mpiattn_vocab.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .outfile import OutputExists, fsync_folder

# tokenizer.json and the files beside it that tokenizer loaders and sentence-transformers read
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "sentence_bert_config.json")
MAX_TOKENIZER_FILE = 64 << 20  # bytes: a tokenizer file larger than this is not one
UNTRAINED_BIAS = -1.0e4
WORD = "bert.embeddings.word_embeddings.weight"
BIAS = "cls.predictions.bias"


def tokenizer_files(tokenizer_json: Path) -> dict[str, bytes]:
    """``tokenizer.json`` and those of ``TOKENIZER_FILES`` found beside it: name -> bytes."""
    out = {"tokenizer.json": _read_small(tokenizer_json)}
    for name in TOKENIZER_FILES[1:]:
        path = tokenizer_json.parent / name
        if path.is_file():
            out[name] = _read_small(path)
    return out


def _read_small(path: Path) -> bytes:
    if path.stat().st_size > MAX_TOKENIZER_FILE:
        raise InputError(f"'{path}' is over {MAX_TOKENIZER_FILE >> 20} MiB: not a tokenizer file")
    return path.read_bytes()


def tokenizer_vocab(files: dict[str, bytes]) -> tuple[int, dict[str, int]]:
    """(vocabulary size, ids of [PAD] and [UNK]) of the tokenizer in ``files``."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    except Exception as err:  # the Rust side raises a bare Exception on a bad file
        raise InputError(f"the tokenizer cannot be loaded: {err}") from None
    ids = {name: tok.token_to_id(name) for name in ("[PAD]", "[UNK]")}
    if any(v is None for v in ids.values()):
        raise InputError("the tokenizer lacks [PAD] or [UNK] (not a BERT one?)")
    return tok.get_vocab_size(with_added_tokens=True), ids


def on_tokenizer_ids(tensors: dict[str, np.ndarray], token_ids: np.ndarray, vocab: int,
                     unk: int) -> dict[str, np.ndarray]:
    """HF tensors of a model whose word ids are ``token_ids`` (tokenizer id of each model
    id), re-indexed by tokenizer id: (vocab, hidden) word embeddings and (vocab,) decoder
    bias. Identity when the model already uses the tokenizer's ids.

    Raises ``InputError`` when ``token_ids`` does not fit the tokenizer.
    """
    token_ids = np.asarray(token_ids, dtype=np.int64)
    if np.array_equal(token_ids, np.arange(vocab)):
        return tensors
    if token_ids.size == 0 or token_ids.min() < 0 or token_ids.max() >= vocab or unk not in \
            token_ids or np.unique(token_ids).size != token_ids.size:
        raise InputError(f"the model's token ids do not fit the tokenizer ({vocab} ids, [UNK]"
                         f" = {unk}): the export would not agree with its tokenizer")
    lookup = np.full(vocab, int(np.flatnonzero(token_ids == unk)[0]), dtype=np.int64)
    lookup[token_ids] = np.arange(token_ids.size)
    out = dict(tensors)
    out[WORD] = np.ascontiguousarray(tensors[WORD][lookup])
    if BIAS in tensors:
        bias = tensors[BIAS][lookup]
        untrained = np.ones(vocab, dtype=bool)
        untrained[token_ids] = False
        bias[untrained] = UNTRAINED_BIAS
        out[BIAS] = bias
    return out


def hf_config(model: Any, vocab: int, pad: int, dtype: Any, extra: dict | None = None) -> dict:
    """``config.json`` of a ``BertForMaskedLM`` with the shape of ``model`` (``ModelConfig``)."""
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": int(vocab), "hidden_size": model.hidden,
        "num_hidden_layers": model.layers, "num_attention_heads": model.heads,
        "intermediate_size": model.ffn, "hidden_act": "gelu",
        "max_position_embeddings": model.max_positions, "type_vocab_size": model.type_vocab,
        "layer_norm_eps": model.layer_norm_eps, "pad_token_id": int(pad),
        "initializer_range": 0.02, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute",
        "torch_dtype": np.dtype(dtype).name, **(extra or {}),
    }


@dataclass
class ModelFolder:
    """What an export writes."""

    tensors: dict[str, np.ndarray]  # HF names -> whole tensors
    config: dict
    tokenizer: dict[str, bytes]  # file name -> contents
    vocab_map: list[int] | None = None  # tokenizer id of each trained id (remapped vocab)


def build(model: Any, tensors: dict[str, np.ndarray], token_ids: np.ndarray,
          tokenizer: dict[str, bytes], extra: dict | None = None) -> ModelFolder:
    """The folder of a model: ``tensors`` in HF naming on the model's ids ``token_ids``."""
    vocab, special = tokenizer_vocab(tokenizer)
    remapped = not np.array_equal(token_ids, np.arange(vocab))
    tensors = on_tokenizer_ids(tensors, token_ids, vocab, special["[UNK]"])
    dtype = tensors[WORD].dtype
    info = dict(extra or {})
    if remapped:
        info["trained_vocab"] = len(token_ids)
        info["untrained_ids"] = f"read as [UNK], decoder bias {UNTRAINED_BIAS:g}"
    config = hf_config(model, vocab, special["[PAD]"], dtype, {"mpiattn": info})
    return ModelFolder(tensors, config, tokenizer,
                       [int(i) for i in token_ids] if remapped else None)


def publish(folder: ModelFolder, dest: str | Path, force: bool = False) -> Path:
    """Write ``folder`` to a private temporary beside ``dest`` and rename it into place.

    ``dest`` must not exist unless ``force`` (then the old folder is replaced, never half:
    it is moved aside first and removed once the new one is in place). Raises
    ``OutputExists``.
    """
    from safetensors.numpy import save_file

    dest = Path(dest)
    check_folder(dest, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in folder.tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(folder.config, indent=2) + "\n",
                                         encoding="utf-8")
        for name, data in folder.tokenizer.items():
            (tmp / name).write_bytes(data)
        if folder.vocab_map is not None:
            (tmp / "mpiattn_vocab.json").write_text(json.dumps(
                {"token_ids": folder.vocab_map,
                 "meaning": "tokenizer id of each id the model was trained on"}) + "\n",
                encoding="utf-8")
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old",
                                        dir=dest.parent))
            os.rename(dest, old / "model")
        os.rename(tmp, dest)
        fsync_folder(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def check_folder(dest: str | Path, force: bool) -> None:
    """``dest`` can become an export folder: its parent is a writable folder, and nothing is
    there yet (or, with ``force``, a folder). Raises ``OutputExists`` or ``InputError``."""
    dest = Path(dest)
    text = os.fspath(dest)
    if not dest.name or dest.name in (".", "..") or any(c in text for c in "\n\r\t"):
        raise InputError(f"export folder {text!r}: give a plain folder name")
    if not dest.parent.is_dir() or not os.access(dest.parent, os.W_OK | os.X_OK):
        raise InputError(f"export folder '{dest}': '{dest.parent}' is not a writable folder")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InputError(f"export folder '{dest}' exists and is not a folder: it is never"
                         " replaced; choose another name")
    if dest.exists() and not force:
        raise OutputExists(f"export folder '{dest}' exists: pass --force to replace it")


def default_folder(output: str | Path) -> Path:
    """Where a training job exports by default: ``OUT-hf`` beside its output ``OUT.h5``."""
    out = Path(output)
    return out.with_name(out.stem + "-hf")


def export_checkpoint(checkpoint: str | Path, dest: str | Path, force: bool = False) -> Path:
    """``mpiattn export CKPT.h5 DIR``: a training checkpoint as a Hugging Face folder.

    Raises ``InputError`` (not a complete checkpoint, no tokenizer inside) or
    ``OutputExists`` (``dest`` exists and not ``force``).
    """
    from . import __version__
    from .checkpoints import read_model

    check_folder(dest, force)
    trained, params = read_model(checkpoint)
    info = {"trained_by": f"mpiattn {__version__} train", "steps": trained.step,
            "exported_from": str(Path(checkpoint).name)}
    return publish(build(trained.model, params, trained.token_ids, trained.tokenizer, info),
                   dest, force)
