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

from ..config import Config
from ..errors import InputError
from .records import regular_file

_INPUT = 3  # seeded stream tag for input ids (weights use 0..2)


@dataclass
class Batch:
    ids: np.ndarray  # (B, S) int64 token ids, 0 on padding
    mask: np.ndarray  # (B, S) bool, True on real tokens
    text: list[str] | None = None  # the sentences, for text input
    types: np.ndarray | None = None  # (B, S) int64 token type (segment) ids; None: all 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.ids.shape

    def rows(self, start: int, count: int) -> Batch:
        """Rows ``start .. start+count`` of every field (ids, mask, text, types)."""
        rows = slice(start, start + count)
        text = None if self.text is None else self.text[rows]
        types = None if self.types is None else self.types[rows]
        return Batch(self.ids[rows], self.mask[rows], text, types)


def seeded_batch(seed: int, batch: int, seq_len: int, vocab: int, min_fill: float) -> Batch:
    """Random ids with random lengths in [min_fill*seq_len, seq_len], so padding is exercised."""
    rng = np.random.default_rng([seed, _INPUT])
    shortest = max(1, int(np.ceil(min_fill * seq_len)))
    lengths = rng.integers(shortest, seq_len + 1, size=batch)
    ids = rng.integers(1, vocab, size=(batch, seq_len), dtype=np.int64)
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    ids[~mask] = 0
    return Batch(ids, mask)


def split_lines(text: str) -> list[str]:
    r"""Lines split on "\n" only, one trailing "\r" of each removed ("\r\n" files); a final
    "\n" ends the last line rather than starting an empty one.

    Not ``str.splitlines()``: that also breaks at \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and
    \u2029, which are characters inside a line here.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # "a\nb\n" is two lines; "" is none
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: Path, keep_blank: bool = False, what: str = "input.text") -> list[str]:
    r"""The lines of a UTF-8 text file, stripped, or an InputError saying what is wrong.

    ``keep_blank=False`` (a training corpus, a stream of paragraphs) drops blank and
    whitespace-only lines and splits as ``str.splitlines()`` (unchanged, so a corpus
    tokenizes as it always did). ``keep_blank=True`` (``input.text``) keeps exactly one
    entry per line, in order, a blank line as "" (encoded as the empty sentence, [CLS]
    [SEP], as sentence-transformers does), so output row i is line i. Lines end at "\n" only (see
    ``split_lines``). Errors: a missing or unreadable file, bytes that are not UTF-8, and a
    file with no lines (with ``keep_blank=False``: no non-blank line), anything but a
    regular file. ``what`` names the config key in messages.
    """
    regular_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"{what} = '{path}': cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{what} = '{path}': not UTF-8 (byte {err.start}): convert it with iconv"
        ) from None
    if keep_blank:
        lines = [line.strip() for line in split_lines(text)]
    else:
        lines = [line for line in (part.strip() for part in text.splitlines()) if line]
    if not lines:
        raise InputError(f"{what} = '{path}': the file has no text (one sentence per line)")
    return lines


def tokenizer_path(cfg: Config, fallback: str = "") -> Path:
    """input.tokenizer, or the tokenizer.json beside the model's weights (or ``fallback``'s)."""
    from ..io.weights import model_folder

    if cfg.input.tokenizer:
        path = Path(cfg.input.tokenizer)
    elif cfg.model.weights or fallback:
        path = model_folder(cfg.model.weights or fallback) / "tokenizer.json"
    else:
        raise InputError("input.text needs a tokenizer: set input.tokenizer or model.weights")
    if not path.is_file():
        state = "is not a regular file" if path.exists() else "does not exist"
        raise InputError(f"tokenizer '{path}' {state}: set input.tokenizer to a tokenizer.json")
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


def _read_types(where: str, dset: Any, shape: tuple[int, ...], type_vocab: int) -> np.ndarray:
    """``/input/token_type_ids`` of ``shape`` ((B, S), or (tokens,) ragged) as int64, each
    in [0, type_vocab), else InputError."""
    import h5py

    if not isinstance(dset, h5py.Dataset) or dset.shape != shape:
        got = getattr(dset, "shape", "not a dataset")
        raise InputError(f"{where} has shape {got}, /input/tokens {shape}")
    if dset.dtype.kind not in "iu":
        raise InputError(f"{where} has dtype {dset.dtype}: token type ids must be integers"
                         " (int64, 0 = first segment)")
    from ..io.h5safe import read

    types = read(dset)
    bad = np.argwhere((types < 0) | (types >= type_vocab))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        place = f"row {at[0]}, position {at[1]}" if len(at) == 2 else f"token {at[0]}"
        raise InputError(f"{where} has type id {types[at]} ({place}): the model's type"
                         f" vocabulary holds {type_vocab} types (0 .. {type_vocab - 1})")
    return types.astype(np.int64, copy=False)


def hdf5_batch(path: Path, vocab: int, max_positions: int, type_vocab: int = 2) -> Batch:
    """``/input/tokens`` (batch, seq) integer ids, optional ``/input/attention_mask`` (1 on
    real tokens; default: ids != 0) and optional ``/input/token_type_ids`` (segment ids in
    [0, type_vocab); absent: ``types`` None, all 0), validated before anything is allocated.

    Raises InputError (one line naming the file and the dataset) on a missing file, a file
    that is not HDF5, a wrong shape or dtype, an id outside the model's vocabularies, a mask
    that is not 0/1, or a row with no real tokens; files that keep data outside themselves
    (external storage or links, virtual datasets) are refused (``h5safe``).
    """
    import h5py

    from ..io import h5safe

    name = f"input.tokens = '{path}'"
    if not path.exists():
        raise InputError(f"{name}: the file does not exist (relative paths are taken from the"
                         f" current folder, {Path.cwd()})")
    try:
        with h5safe.open_for_reading(path) as f:  # nothing from outside the file
            dset = f.get("input/tokens")
            if isinstance(dset, h5py.Dataset) and dset.ndim == 1 and "input/offsets" in f:
                return _ragged_batch(f, name, vocab, max_positions, type_vocab)
            _check_shape(f"{name}: /input/tokens", dset, max_positions)
            if dset.dtype.kind not in "iuf":
                raise InputError(f"{name}: /input/tokens has dtype {dset.dtype}: token ids must"
                                 " be integers (int64)")
            ids = h5safe.read(dset)
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
                raw = h5safe.read(mask_dset)
                if not np.isin(raw, (0, 1)).all():
                    raise InputError(f"{where} has values other than 0 and 1")
                mask = raw.astype(bool)
            types_dset = f.get("input/token_type_ids")
            types = None if types_dset is None else _read_types(
                f"{name}: /input/token_type_ids", types_dset, ids.shape, type_vocab)
    except InputError as err:  # from h5safe: say which input it was (once)
        if str(err).startswith(name):
            raise
        reason = str(err).removeprefix(f"'{path}'")
        sep = " " if reason.startswith(" ") else ": "
        raise InputError(f"{name}{sep}{reason.removeprefix(': ').strip()}") from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())  # HDF5 messages can span lines
        raise InputError(f"{name}: not a readable HDF5 token file (truncated or not HDF5?):"
                         f" {reason}") from None
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise InputError(f"{name}: row {empty[0]} has no real tokens (mask all 0 or ids all 0)")
    return Batch(ids.astype(np.int64, copy=False), mask, types=types)


def _ragged_batch(f: Any, name: str, vocab: int, max_positions: int,
                  type_vocab: int) -> Batch:
    """A text run's ragged ``/input/tokens`` (tokens,) with ``/input/offsets`` (lines+1,)
    (and ``/input/token_type_ids`` (tokens,)) as one padded batch, checked like the 2-D
    layout: row i is tokens[offsets[i]:offsets[i+1]]."""
    import h5py

    from ..io import h5safe

    offsets_dset, tokens_dset = f["input/offsets"], f["input/tokens"]
    where = f"{name}: /input/offsets"
    if not isinstance(offsets_dset, h5py.Dataset) or offsets_dset.ndim != 1 or (
            offsets_dset.dtype.kind not in "iu"):
        raise InputError(f"{where} must be 1-D integers (lines+1 row edges)")
    if tokens_dset.shape[0] >= MAX_TOKENS or offsets_dset.shape[0] - 1 >= MAX_TOKENS:
        raise InputError(f"{name}: /input/tokens holds {tokens_dset.shape[0]} tokens, more"
                         " than one batch holds (< 2**31)")
    offsets = h5safe.read(offsets_dset).astype(np.int64)
    lengths = np.diff(offsets)
    if offsets.size < 2 or offsets[0] != 0 or offsets[-1] != tokens_dset.shape[0] or (
            lengths < 1).any():
        raise InputError(f"{where} are not row edges of /input/tokens (0, increasing, ending"
                         f" at {tokens_dset.shape[0]}, every row at least one token)")
    longest = int(lengths.max())
    if longest > max_positions:
        raise InputError(f"{name}: /input/tokens has a row of {longest} tokens, more than"
                         f" model.max_positions = {max_positions}")
    if longest * lengths.size >= MAX_TOKENS:
        raise InputError(f"{name}: {lengths.size} rows padded to {longest} tokens are more"
                         " than a run holds (< 2**31)")
    if tokens_dset.dtype.kind not in "iu":
        raise InputError(f"{name}: /input/tokens has dtype {tokens_dset.dtype}: token ids"
                         " must be integers (int64)")
    flat = h5safe.read(tokens_dset)
    _check_ids(f"{name}: /input/tokens", flat, vocab)
    mask = np.arange(longest)[None, :] < lengths[:, None]
    ids = np.zeros(mask.shape, dtype=np.int64)
    ids[mask] = flat
    types = None
    if "input/token_type_ids" in f:
        types_dset = f["input/token_type_ids"]
        flat_types = _read_types(f"{name}: /input/token_type_ids", types_dset,
                                 tokens_dset.shape, type_vocab)
        types = np.zeros_like(ids)
        types[mask] = flat_types
    return Batch(ids, mask, types=types)


def one_batch_lines(cfg: Config) -> list[str]:
    """``input.text`` read whole as one batch (``mpiattn bench``): every format and line-end
    rule a text run reads (``records``), one sentence per record. Sentence pairs are for
    text runs only (ConfigError); a file without records is an InputError."""
    from ..errors import ConfigError
    from .records import Spec, open_source, records

    i = cfg.input
    if i.pairs:
        raise ConfigError("input.pairs needs a text run (mpiattn run): a one-batch input"
                          " (mpiattn bench) takes one sentence per record")
    source = open_source(Path(i.text), Spec.of(i))  # i.pairs is refused above
    lines = [str(item) for _, item, _ in records(source)]
    if not lines:
        raise InputError(f"{source.where}: no {source.unit}s: give at least one sentence")
    return lines


def load_batch(cfg: Config) -> Batch:
    """The job's whole input batch, the same on every rank."""
    if cfg.input.tokens:
        return hdf5_batch(Path(cfg.input.tokens), cfg.model.vocab, cfg.model.max_positions,
                          cfg.model.type_vocab)
    if cfg.input.text:
        batch = text_batch(one_batch_lines(cfg), tokenizer_path(cfg), cfg.input.seq_len)
        if int(batch.ids.max()) >= cfg.model.vocab:
            raise InputError(
                f"token id {int(batch.ids.max())} >= model.vocab = {cfg.model.vocab}:"
                " the tokenizer does not belong to this model"
            )
        return batch
    i = cfg.input
    return seeded_batch(cfg.seed, i.batch, i.seq_len, cfg.model.vocab, i.min_fill)
