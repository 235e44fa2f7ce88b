"""A text corpus as a stream: checked lines, read in chunks, tokenized without padding and
cut into length-sorted micro-batches. No MPI; every function is the same on every rank.

    info = scan(path, pairs=False)                      # every line checked, counted
    for first, items in chunks(path, 1024, pairs=False):
        tokens = tok.encode(items)                      # ragged ids, types, truncated
        for rows in sorted_batches(tokens.lengths, 32):
            ids, mask, types = tokens.padded(rows)     # padded to this batch's longest

Lines end at "\\n" ("\\r\\n" accepted), are stripped, and a blank line is the empty sentence
([CLS] [SEP]), as sentence-transformers encodes it: output row i is line i. With ``pairs``
each line is two tab-separated columns, tokenized with the tokenizer's pair template
(segment 0, then 1; an empty column is an empty segment, as transformers' tokenizers
encode a batch of pairs). Sorting by length within a chunk (longest first, as
sentence-transformers' ``encode`` sorts its input) keeps padding small while memory stays
bounded by the chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

Item = str | tuple[str, str]


@dataclass(frozen=True)
class TextInfo:
    """What ``scan`` found: the number of lines and of bytes."""

    lines: int
    size: int


def _decode(raw: bytes, number: int, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where} line {number}: not UTF-8 (byte {err.start} of the line):"
                         " convert the file with iconv") from None


def _item(raw: bytes, number: int, pairs: bool, where: str) -> Item:
    line = _decode(raw.removesuffix(b"\n").removesuffix(b"\r"), number, where)
    if "\0" in line:
        raise InputError(f"{where} line {number}: a NUL byte (position {line.index(chr(0))}):"
                         " HDF5 strings cannot hold it; remove NULs (tr -d '\\000')")
    if not pairs:
        return line.strip()
    columns = line.split("\t")
    if len(columns) != 2:
        raise InputError(f"{where} line {number}: {len(columns)} tab-separated column"
                         f"{'s' if len(columns) != 1 else ''}; input.pairs = true needs two"
                         " (first sentence, TAB, second sentence)")
    return columns[0].strip(), columns[1].strip()


def _lines(path: Path, what: str) -> Iterator[bytes]:
    from .data import regular_file

    regular_file(path, what)
    try:
        with open(path, "rb") as fh:
            yield from fh  # binary lines end at b"\n" only
    except OSError as err:
        raise InputError(f"{what} = '{path}': cannot be read ({err.strerror})") from None


def scan(path: Path, pairs: bool = False, what: str = "input.text") -> TextInfo:
    """Check every line (UTF-8; two columns with ``pairs``) and count them, in one pass
    with memory bounded by the longest line.

    Raises InputError naming the file and the 1-based line number: bytes that are not
    UTF-8, a pairs line without exactly two tab-separated columns, a file with no lines,
    anything but a readable regular file.
    """
    where = f"{what} = '{path}'"
    count = size = 0
    for count, raw in enumerate(_lines(path, what), start=1):
        _item(raw, count, pairs, where)
        size += len(raw)
    if count == 0:
        raise InputError(f"{where}: the file is empty (one sentence per line)")
    return TextInfo(count, size)


def chunks(path: Path, size: int, pairs: bool = False, start: int = 0,
           what: str = "input.text") -> Iterator[tuple[int, list[Item]]]:
    """(index of the chunk's first line, its items) for lines ``start`` .. end, ``size``
    lines at a time (the last chunk may be shorter). Items are stripped strings, or
    (first, second) with ``pairs``. Errors as ``scan``."""
    where = f"{what} = '{path}'"
    items: list[Item] = []
    first = start
    for number, raw in enumerate(_lines(path, what), start=1):
        if number <= start:
            continue
        items.append(_item(raw, number, pairs, where))
        if len(items) == size:
            yield first, items
            first, items = first + size, []
    if items:
        yield first, items


def _read_key(path: Path, key: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def model_max_length(weights_dir: Path | None, max_positions: int) -> tuple[int, str]:
    """The model's own truncation limit in tokens and where it comes from, as
    sentence-transformers decides it: ``sentence_bert_config.json`` ``max_seq_length``
    (256 for all-MiniLM-L6-v2) when the folder has one and lists its modules
    (``modules.json``); else the tokenizer's ``model_max_length``
    (``tokenizer_config.json``) capped at the model's positions; else
    ``model.max_positions``. Never more than ``max_positions`` (the usable positions: a
    RoBERTa-family table of 514 rows has 512)."""
    if weights_dir is not None:
        config = weights_dir / "sentence_bert_config.json"
        limit = _read_key(config, "max_seq_length")
        if (weights_dir / "modules.json").is_file() and isinstance(limit, int) \
                and not isinstance(limit, bool) and limit >= 2:
            return min(limit, max_positions), f"{config.name} max_seq_length"
        limit = _read_key(weights_dir / "tokenizer_config.json", "model_max_length")
        if isinstance(limit, int) and not isinstance(limit, bool) and 2 <= limit < max_positions:
            return limit, "tokenizer_config.json model_max_length"
    return max_positions, "model.max_positions"


@dataclass
class Tokens:
    """A chunk tokenized: ragged ids and segment ids per item, truncation flags."""

    ids: list[np.ndarray]  # int64 per item, [CLS] ... [SEP]
    types: list[np.ndarray]  # int64 per item (all 0 for single sentences)
    truncated: np.ndarray  # (items,) bool: the item was cut at the limit

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(a) for a in self.ids], dtype=np.int64)

    def padded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, mask, types) of ``rows``, each (len(rows), longest) int64/bool/int64,
        padded with 0 on the right."""
        longest = max(len(self.ids[r]) for r in rows)
        ids = np.zeros((len(rows), longest), dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros(ids.shape, dtype=bool)
        for i, r in enumerate(rows):
            n = len(self.ids[r])
            ids[i, :n], types[i, :n], mask[i, :n] = self.ids[r], self.types[r], True
        return ids, mask, types


class SentenceTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer with the model's truncation and no padding.

    ``encode`` truncates "longest_first" at ``max_length`` tokens (special tokens
    included), as sentence-transformers' ``tokenize`` does. Raises InputError when the file
    cannot be loaded, or an id or segment does not fit ``vocab``/``type_vocab``.
    """

    def __init__(self, path: Path, max_length: int, vocab: int, type_vocab: int) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception on a bad file
            raise InputError(f"tokenizer '{path}' cannot be loaded: {err}") from None
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first")
        self.path, self.max_length = path, max_length
        self.vocab, self.type_vocab = vocab, type_vocab

    def encode(self, items: list[Item], first_line: int = 0,
               what: str = "input.text") -> Tokens:
        """Ids, segment ids and truncation flags of ``items`` (lines ``first_line`` ...)."""
        encodings = self._tok.encode_batch(items)
        ids = [np.array(e.ids, dtype=np.int64) for e in encodings]
        types = [np.array(e.type_ids, dtype=np.int64) for e in encodings]
        for i, (a, t) in enumerate(zip(ids, types, strict=True)):
            if a.size and int(a.max()) >= self.vocab:
                raise InputError(f"{what} line {first_line + i + 1}: token id {int(a.max())}"
                                 f" >= model.vocab = {self.vocab}: the tokenizer"
                                 f" '{self.path}' does not belong to this model")
            if t.size and int(t.max()) >= self.type_vocab:
                raise InputError(f"{what} line {first_line + i + 1}: segment id {int(t.max())}"
                                 f" but the model's type vocabulary holds {self.type_vocab}"
                                 " (model.type_vocab): it cannot encode sentence pairs")
            if a.size > self.max_length:  # tokenizers skips a limit below its specials
                raise InputError(f"{what} line {first_line + i + 1}: {a.size} tokens after"
                                 f" truncation to {self.max_length}: the limit is below what"
                                 " the tokenizer's template needs; raise input.max_tokens")
        truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        return Tokens(ids, types, truncated)


def sorted_batches(lengths: np.ndarray, batch: int) -> list[np.ndarray]:
    """Micro-batches of at most ``batch`` row indices, longest rows first (ties in line
    order, so the split is the same on every rank and every run)."""
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def batch_cost(rows: np.ndarray, lengths: np.ndarray, hidden: int) -> float:
    """Relative cost of one padded micro-batch: b*s*(12*H + 2*s) multiply-adds per layer
    and head-dim unit (the GEMMs grow with b*s*H, attention with b*s*s)."""
    s = int(lengths[rows].max())
    return float(len(rows) * s * (12 * hidden + 2 * s))


def assign(costs: list[float], replicas: int, policy: str = "balanced") -> list[list[int]]:
    """Micro-batch indices per data-parallel replica, the same on every rank.

    ``"balanced"``: longest-processing-time first (Graham 1969): each batch, costliest
    first, to the replica with the least cost so far; within ≤ 4/3 of the optimum.
    ``"round-robin"``: batch j to replica j mod R. Each replica's list is in batch order.
    """
    if policy == "round-robin":
        return [list(range(r, len(costs), replicas)) for r in range(replicas)]
    load = [0.0] * replicas
    mine: list[list[int]] = [[] for _ in range(replicas)]
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(replicas), key=lambda r: (load[r], r))
        load[r] += costs[j]
        mine[r].append(j)
    return [sorted(m) for m in mine]
