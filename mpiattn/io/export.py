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

Tensors of the source model that training leaves alone (the pooler, the RoBERTa family's
position rows before position 0) and the sentence-transformers files beside its
tokenizer (modules.json, Pooling's config, each Dense module's config and weights)
travel with the checkpoint into the export, so the folder also loads as the
sentence-transformers model it started from, with the same modules.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UserError
from .hf import TOKENIZER_FILES
from .outfile import OutputExists, _name_max, _umask, fsync_folder

# tokenizer.json and the files beside it that tokenizer loaders and sentence-transformers read
MANIFEST = ".mpiattn-manifest.json"  # what publish wrote: relative name -> size, sha256
MAX_TOKENIZER_FILE = 64 << 20  # bytes: a tokenizer file larger than this is not one
UNTRAINED_BIAS = -1.0e4
WORD = "bert.embeddings.word_embeddings.weight"
BIAS = "cls.predictions.bias"


class ExportError(UserError):
    """The export folder could not be written (exit 2, one line)."""


def tokenizer_files(tokenizer_json: Path) -> dict[str, bytes]:
    """``tokenizer.json`` and those of ``TOKENIZER_FILES`` found beside it: name -> bytes."""
    from .hf import module_files

    out = {"tokenizer.json": _read_small(tokenizer_json)}
    for name in TOKENIZER_FILES[1:]:
        path = tokenizer_json.parent / name
        if path.is_file():
            out[name] = _read_small(path)
    for name in module_files(out.get("modules.json")):  # Dense modules, whole
        path = tokenizer_json.parent / name
        if path.is_file():
            out[name] = _read_small(path)
    return out


def _read_small(path: Path) -> bytes:
    from .safefile import read_bytes

    return read_bytes(path, "tokenizer file", MAX_TOKENIZER_FILE)


def tokenizer_vocab(files: dict[str, bytes]) -> tuple[int, dict[str, int]]:
    """(vocabulary size, ids of [PAD] and [UNK]) of the tokenizer in ``files``."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    except Exception as err:  # the Rust side raises a bare Exception on a bad file
        raise InputError(f"the tokenizer cannot be loaded: {err}") from None
    from .hf import special_id

    ids = {name: special_id(tok, name) for name in ("[PAD]", "[UNK]")}
    if any(v is None for v in ids.values()):
        raise InputError("the tokenizer lacks [PAD] or [UNK] (or RoBERTa's <pad>, <unk>)")
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
        raise InputError(f"the model's token ids do not fit its tokenizer ({vocab} ids, [UNK]"
                         f" = {unk}): not a model mpiattn trained")
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


ARCHITECTURES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
                 "xlm-roberta": "XLMRobertaForMaskedLM", "camembert": "CamembertForMaskedLM"}


def hf_config(model: Any, vocab: int, pad: int, dtype: Any, extra: dict | None = None,
              family: dict | None = None) -> dict:
    """``config.json`` of a ``BertForMaskedLM`` with the shape of ``model`` (``ModelConfig``),
    or with ``family`` (``families.trained_as``) of the RoBERTa family: its
    ``RobertaForMaskedLM`` (or XLM-R, CamemBERT), ``pad_token_id`` = ``padding_idx`` and
    ``padding_idx + 1`` more position rows (514 for 512 positions)."""
    kind = (family or {}).get("model_type", "bert")
    rows = 0
    if kind != "bert":
        pad = family["padding_idx"]
        rows = pad + 1
    return {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind,
        "vocab_size": int(vocab), "hidden_size": model.hidden,
        "num_hidden_layers": model.layers, "num_attention_heads": model.heads,
        "intermediate_size": model.ffn, "hidden_act": "gelu",
        "max_position_embeddings": model.max_positions + rows,
        "type_vocab_size": model.type_vocab,
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


def _within_positions(files: dict[str, bytes], positions: int) -> dict[str, bytes]:
    """The tokenizer files with their length limits (``tokenizer_config.json``
    ``model_max_length``, ``sentence_bert_config.json`` ``max_seq_length``) cut to the
    model's ``positions``: a tokenizer that truncates longer would crash the model."""
    out = dict(files)
    for name, key in (("tokenizer_config.json", "model_max_length"),
                      ("sentence_bert_config.json", "max_seq_length")):
        try:
            table = json.loads(files[name])
        except (KeyError, ValueError):
            continue
        if isinstance(table, dict) and (not isinstance(table.get(key), int)
                                        or table[key] > positions):
            table[key] = positions
            out[name] = (json.dumps(table, indent=2) + "\n").encode("utf-8")
    return out


def family_names(tensors: dict[str, np.ndarray], family: dict | None) -> dict[str, np.ndarray]:
    """``tensors`` (``BertForMaskedLM`` names, as trained) in the names of ``family``
    (``families.trained_as``): the RoBERTa family's ``roberta.*`` and ``lm_head.*``, its
    position table whole again (the kept rows before position 0 on top). BERT: as they
    are, less the RoBERTa-only rows."""
    from .hf import LEADING_POSITIONS, ROBERTA_HEAD, head_names

    kind = (family or {}).get("model_type", "bert")
    out = {k: v for k, v in tensors.items() if k != LEADING_POSITIONS}
    if kind == "bert":
        return out
    rename = {bert: ROBERTA_HEAD[f] for f, bert in head_names().items()}
    out = {rename.get(k, "roberta." + k.removeprefix("bert.")): v for k, v in out.items()}
    key = "roberta.embeddings.position_embeddings.weight"
    lead = tensors.get(LEADING_POSITIONS)
    if lead is None:  # not kept (cannot happen for a model mpiattn trained): no token reads them
        lead = np.zeros((family["padding_idx"] + 1, out[key].shape[1]), out[key].dtype)
    out[key] = np.concatenate([lead.astype(out[key].dtype), out[key]])
    return out


def build(model: Any, tensors: dict[str, np.ndarray], token_ids: np.ndarray,
          tokenizer: dict[str, bytes], extra: dict | None = None,
          family: dict | None = None) -> ModelFolder:
    """The folder of a model: ``tensors`` in HF naming on the model's ids ``token_ids``,
    written in the names and ``config.json`` of ``family`` (``families.trained_as``;
    None: BERT)."""
    tokenizer = _within_positions(tokenizer, model.max_positions)
    vocab, special = tokenizer_vocab(tokenizer)
    remapped = not np.array_equal(token_ids, np.arange(vocab))
    tensors = on_tokenizer_ids(tensors, token_ids, vocab, special["[UNK]"])
    dtype = tensors[WORD].dtype
    info = dict(extra or {})
    if remapped:
        info["trained_vocab"] = len(token_ids)
        info["untrained_ids"] = f"read as [UNK], decoder bias {UNTRAINED_BIAS:g}"
    config = hf_config(model, vocab, special["[PAD]"], dtype, {"mpiattn": info}, family)
    return ModelFolder(family_names(tensors, family), config, tokenizer,
                       [int(i) for i in token_ids] if remapped else None)


def publish(folder: ModelFolder, dest: str | Path, force: bool = False) -> Path:
    """Write ``folder`` to a private temporary beside ``dest`` and rename it into place.

    ``dest`` must not exist unless ``force`` and it is an earlier export whose files still
    equal the manifest (``MANIFEST``) it was written with (then the old folder is swapped
    out atomically and removed: ``_replace``). The temporary,
    ``.NAME.HOST-PID-RANDOM.tmp``, is removed on any error or signal that reaches Python.
    Raises ``OutputExists``, ``InputError`` or ``ExportError``.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from .outfile import _prefix

    dest = Path(dest)
    check_folder(dest, force)
    mode = 0o666 & ~_umask()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent))
    except OSError as err:
        raise ExportError(f"cannot write export folder '{dest}': {err.strerror}") from None
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in folder.tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(folder.config, indent=2) + "\n",
                                         encoding="utf-8")
        for name, data in folder.tokenizer.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_bytes(data)
        if folder.vocab_map is not None:
            (tmp / "mpiattn_vocab.json").write_text(json.dumps(
                {"token_ids": folder.vocab_map,
                 "meaning": "tokenizer id of each id the model was trained on"}) + "\n",
                encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps({"files": _inventory(tmp)}, indent=1,
                                               sort_keys=True) + "\n", encoding="utf-8")
        for path in [p for p in tmp.rglob("*") if p.is_file()]:
            path.chmod(mode)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            sub.chmod(mode | (mode & 0o444) >> 2)  # folders: x wherever r
        _replace(tmp, dest, force)
    except (OSError, SafetensorError) as err:  # a full disk included: one line
        from .diskfull import reason

        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write export folder '{dest}': {reason(err)}; nothing"
                          " written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _replace(tmp: Path, dest: Path, force: bool) -> None:
    """Give the finished folder ``tmp`` the name ``dest``. An existing ``dest`` (allowed
    by ``check_folder``) is checked against its manifest again, then swapped with ``tmp``
    in one atomic exchange, so the name never holds nothing; the old folder (now at
    ``tmp``) is removed after. Without RENAME_EXCHANGE, the old folder is moved aside
    first and moved back if the second rename fails; a kill between the two renames
    leaves it at the hidden ``.NAME.*.old/model`` (``stale_temporaries`` names it)."""
    if not (dest.exists() or dest.is_symlink()):
        from .outfile import _renameat2

        try:  # a folder made under the name meanwhile is not replaced (where supported)
            if not _renameat2(tmp, dest):
                os.rename(tmp, dest)
        except FileExistsError:
            raise OutputExists(f"export folder '{dest}' was created by someone else while"
                               " this export ran: nothing replaced") from None
        fsync_folder(dest.parent)
        return
    check_folder(dest, force)  # again, now: nothing of anyone else's is replaced
    from .outfile import _prefix, exchange

    if exchange(tmp, dest):
        fsync_folder(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # the old export
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".old", dir=dest.parent))
    os.rename(dest, old / "model")
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old / "model", dest)  # put the old one back
        old.rmdir()
        raise
    fsync_folder(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def _unlisted(err: OSError) -> None:
    raise InputError(f"'{err.filename}' cannot be listed ({err.strerror})")


def _inventory(folder: Path, folders: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every file below ``folder`` but the manifest: relative name -> {size, sha256};
    with ``folders``, every sub-folder's relative name is added to it. Raises
    ``InputError`` on a link or special file (mpiattn writes neither) or a folder that
    cannot be listed (its files would go unseen)."""
    from .safefile import digest

    found: dict[str, dict[str, Any]] = {}
    for root, dirs, files in os.walk(folder, onerror=_unlisted):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise InputError(f"'{path.relative_to(folder)}' is a link")
        if folders is not None:
            folders.update((Path(root) / name).relative_to(folder).as_posix() for name in dirs)
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                found[rel] = {"size": path.stat().st_size,
                              "sha256": digest(path, "export file")}
    return found


def not_as_written(folder: Path) -> str | None:
    """Why ``folder`` is not exactly the export mpiattn wrote (no manifest, a file added,
    missing, or changed in size or content since), or None when it is."""
    from .safefile import read_json

    folders: set[str] = set()
    try:
        manifest = read_json(folder / MANIFEST, "export manifest", 16 << 20)
        have = _inventory(folder, folders)
    except UserError as err:
        return str(err) if (folder / MANIFEST).exists() or os.path.lexists(
            folder / MANIFEST) else f"it has no {MANIFEST}"
    want = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(want, dict):
        return f"its {MANIFEST} is not one mpiattn wrote"
    for name in sorted(set(have) | set(want)):
        if name not in want:
            return f"'{name}' was added"
        if name not in have:
            return f"'{name}' is missing"
        if have[name] != want[name]:
            return f"'{name}' was changed"
    for name in sorted(folders):  # an empty folder added holds no file, but is someone's
        if not any(f.startswith(name + "/") for f in want):
            return f"'{name}/' was added"
    return None


def is_export(folder: Path) -> bool:
    """Was ``folder`` written by an export (its config.json has an ``mpiattn`` entry)?"""
    from .safefile import read_json

    try:
        config = read_json(folder / "config.json", "export config.json", 2**20)
    except UserError:
        return False
    return isinstance(config, dict) and isinstance(config.get("mpiattn"), dict)


def stale_temporaries(dest: str | Path) -> list[Path]:
    """Temporaries of exports to ``dest`` whose writer is gone (same host, dead PID)."""
    from .outfile import is_stale

    dest = Path(dest)
    return sorted(p for suffix in ("tmp", "old")
                  for p in dest.parent.glob(f".{glob.escape(dest.name)}.*.{suffix}")
                  if p.is_dir() and is_stale(p))


def check_folder(dest: str | Path, force: bool) -> None:
    """``dest`` can become an export folder: its parent is a writable folder, and nothing is
    there yet (or, with ``force``, a folder). Raises ``OutputExists`` or ``InputError``."""
    dest = Path(dest)
    text = os.fspath(dest)
    if not dest.name or dest.name in (".", "..") or any(c in text for c in "\n\r\t"):
        raise InputError(f"export folder {text!r}: give a plain folder name")
    if not dest.parent.is_dir():
        raise InputError(f"export folder '{dest}': folder '{dest.parent}' does not exist:"
                         " create it first")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise InputError(f"export folder '{dest}': folder '{dest.parent}' is not writable")
    limit = _name_max(dest.parent)
    if len(dest.name.encode("utf-8", "surrogateescape")) > limit:
        raise InputError(f"export folder name '{dest.name[:40]}...' is longer than this file"
                         f" system allows ({limit} bytes): choose a shorter name (train.export"
                         " or -o)")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InputError(f"export folder '{dest}' exists and is not a folder: it is never"
                         " replaced; choose another name")
    if dest.exists() and not force:
        raise OutputExists(f"export folder '{dest}' exists: pass --force to replace it")
    if dest.exists() and not is_export(dest):
        raise InputError(f"export folder '{dest}' exists and is not an mpiattn export (no"
                         " config.json with an 'mpiattn' entry): it is never replaced, even"
                         " with --force; choose another name")
    why = not_as_written(dest) if dest.exists() else None
    if why is not None:
        raise InputError(f"export folder '{dest}' is not as mpiattn wrote it ({why}): it is"
                         " never replaced, even with --force; move it away or choose another"
                         " name")


def default_folder(output: str | Path) -> Path:
    """Where a training job exports by default: ``OUT-hf`` beside its output ``OUT.h5``."""
    out = Path(output)
    return out.with_name(out.stem + "-hf")


def export_checkpoint(checkpoint: str | Path, dest: str | Path, force: bool = False) -> Path:
    """``mpiattn export CKPT.h5 DIR``: a training checkpoint as a Hugging Face folder.

    Raises ``InputError`` (not a complete checkpoint, no tokenizer inside) or
    ``OutputExists`` (``dest`` exists and not ``force``).
    """
    from ..version import __version__
    from .formats.checkpoint import read_model

    check_folder(dest, force)
    trained, params = read_model(checkpoint)
    info = {"trained_by": f"mpiattn {__version__} train", "steps": trained.step,
            "exported_from": str(Path(checkpoint).name)}
    return publish(build(trained.model, params, trained.token_ids, trained.tokenizer, info,
                         trained.family), dest, force)
