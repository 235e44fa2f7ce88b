"""Input batches: seeded token ids, text tokenized by the model's own tokenizer.json, or
the token ids of an HDF5 file (``input.tokens``, e.g. a run file's ``/input``, to replay it).

Every rank builds the same full batch (it is small next to the model) and keeps the rows
of its data-parallel replica; the tokenizer is the Hugging Face ``tokenizers`` library,
so ids match what the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .errors import InputError

_INPUT = 3  # seeded stream tag for input ids (weights use 0..2)


@dataclass
class Batch:
    ids: np.ndarray  # (B, S) int64 token ids, 0 on padding
    mask: np.ndarray  # (B, S) bool, True on real tokens
    text: list[str] | None = None  # the sentences, for text input

    @property
    def shape(self) -> tuple[int, int]:
        return self.ids.shape

    def rows(self, start: int, count: int) -> Batch:
        text = None if self.text is None else self.text[start : start + count]
        return Batch(self.ids[start : start + count], self.mask[start : start + count], text)


def seeded_batch(seed: int, batch: int, seq_len: int, vocab: int, min_fill: float) -> Batch:
    """Random ids with random lengths in [min_fill*seq_len, seq_len], so padding is exercised."""
    rng = np.random.default_rng([seed, _INPUT])
    shortest = max(1, int(np.ceil(min_fill * seq_len)))
    lengths = rng.integers(shortest, seq_len + 1, size=batch)
    ids = rng.integers(1, vocab, size=(batch, seq_len), dtype=np.int64)
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    ids[~mask] = 0
    return Batch(ids, mask)


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, or an InputError saying what is wrong."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"input.text = '{path}': the file does not exist (relative paths are"
                         f" taken from the current folder, {Path.cwd()})") from None
    except OSError as err:
        raise InputError(f"input.text = '{path}': cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"input.text = '{path}': not UTF-8 (byte {err.start}): convert it with iconv"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"input.text = '{path}': the file has no text (one sentence per line)")
    return lines


def tokenizer_path(cfg: Config, fallback: str = "") -> Path:
    """input.tokenizer, or the tokenizer.json beside the model's weights (or ``fallback``'s)."""
    from .weights import resolve_weights

    if cfg.input.tokenizer:
        path = Path(cfg.input.tokenizer)
    elif cfg.model.weights or fallback:
        path = resolve_weights(cfg.model.weights or fallback).parent / "tokenizer.json"
    else:
        raise InputError("input.text needs a tokenizer: set input.tokenizer or model.weights")
    if not path.is_file():
        raise InputError(f"tokenizer '{path}' does not exist: set input.tokenizer")
    return path


def text_batch(lines: list[str], tokenizer_file: Path, seq_len: int) -> Batch:
    """Tokenize sentences, truncated to seq_len and padded to the longest, with a mask."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the Rust side raises a bare Exception on a bad file
        raise InputError(f"tokenizer '{tokenizer_file}' cannot be loaded: {err}") from None
    tok.enable_truncation(max_length=seq_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    encodings = tok.encode_batch(lines)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=bool)
    return Batch(ids, mask, lines)


MAX_TOKENS = 2**31  # batch x seq of an HDF5 token input: refused at or above this


def _check_ids(where: str, ids: np.ndarray, vocab: int) -> None:
    if ids.dtype.kind == "f":
        bad = "contains NaN or Inf" if not np.isfinite(ids).all() else f"is {ids.dtype}"
        raise InputError(f"{where} {bad}: token ids must be integers (int64, 0 = padding)")
    if ids.dtype.kind not in "iu":
        raise InputError(f"{where} has dtype {ids.dtype}: token ids must be integers (int64)")
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab:
        raise InputError(f"{where} has ids in [{low}, {high}], outside [0, model.vocab = {vocab}):"
                         " the tokens do not belong to this model")


def _check_shape(where: str, dset: Any, max_positions: int) -> tuple[int, int]:
    """(batch, seq) from the declared shape, before a byte is read."""
    import h5py

    if not isinstance(dset, h5py.Dataset):
        raise InputError(f"{where} is missing: the file needs a (batch, seq) integer dataset there")
    shape = dset.shape
    if shape is None or len(shape) != 2:
        raise InputError(f"{where} has shape {shape}: token ids must be 2-D (batch, seq)")
    b, s = (int(n) for n in shape)
    if b < 1 or s < 1:
        raise InputError(f"{where} has shape {shape}: it holds no tokens")
    if s > max_positions:
        raise InputError(f"{where} has sequences of {s} tokens, more than model.max_positions ="
                         f" {max_positions}")
    if b * s >= MAX_TOKENS:
        raise InputError(f"{where} declares {b} x {s} = {b * s} tokens, more than a run holds"
                         f" (< 2**31)")
    return b, s


def hdf5_batch(path: Path, vocab: int, max_positions: int) -> Batch:
    """``/input/tokens`` (batch, seq) integer ids and optional ``/input/attention_mask`` (1 on
    real tokens; default: ids != 0), validated before anything is allocated."""
    import h5py

    name = f"input.tokens = '{path}'"
    if not path.is_file():
        raise InputError(f"{name}: the file does not exist (relative paths are taken from the"
                         f" current folder, {Path.cwd()})")
    try:
        with h5py.File(path, "r") as f:
            dset = f.get("input/tokens")
            _check_shape(f"{name}: /input/tokens", dset, max_positions)
            if dset.dtype.kind not in "iuf":
                raise InputError(f"{name}: /input/tokens has dtype {dset.dtype}: token ids must"
                                 " be integers (int64)")
            ids = dset[()]
            _check_ids(f"{name}: /input/tokens", ids, vocab)
            mask_dset = f.get("input/attention_mask")
            if mask_dset is None:
                mask = ids != 0
            else:
                where = f"{name}: /input/attention_mask"
                if not isinstance(mask_dset, h5py.Dataset) or mask_dset.shape != ids.shape:
                    shape = getattr(mask_dset, "shape", "not a dataset")
                    raise InputError(f"{where} has shape {shape}, /input/tokens {ids.shape}")
                if mask_dset.dtype.kind not in "iub":
                    raise InputError(f"{where} has dtype {mask_dset.dtype}: use uint8 0/1")
                raw = mask_dset[()]
                if not np.isin(raw, (0, 1)).all():
                    raise InputError(f"{where} has values other than 0 and 1")
                mask = raw.astype(bool)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())  # HDF5 messages can span lines
        raise InputError(f"{name}: not a readable HDF5 token file (truncated or not HDF5?):"
                         f" {reason}") from None
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise InputError(f"{name}: row {empty[0]} has no real tokens (mask all 0 or ids all 0)")
    return Batch(ids.astype(np.int64, copy=False), mask)


def load_batch(cfg: Config) -> Batch:
    """The job's whole input batch, the same on every rank."""
    if cfg.input.tokens:
        return hdf5_batch(Path(cfg.input.tokens), cfg.model.vocab, cfg.model.max_positions)
    if cfg.input.text:
        lines = read_lines(Path(cfg.input.text))
        batch = text_batch(lines, tokenizer_path(cfg), cfg.input.seq_len)
        if int(batch.ids.max()) >= cfg.model.vocab:
            raise InputError(
                f"token id {int(batch.ids.max())} >= model.vocab = {cfg.model.vocab}:"
                " the tokenizer does not belong to this model"
            )
        return batch
    i = cfg.input
    return seeded_batch(cfg.seed, i.batch, i.seq_len, cfg.model.vocab, i.min_fill)
