"""A text corpus as a stream: checked lines, read in chunks, tokenized without padding and
cut into length-sorted micro-batches. No MPI; every function is the same on every rank.

    info = scan(path, pairs=False)                      # every line checked, counted
    for first, items in chunks(path, 1024, pairs=False):
        tokens = tok.encode(items)                      # ragged ids, types, truncated
        for rows in sorted_batches(tokens.lengths, 32):
            ids, mask, types = tokens.padded(rows)     # padded to this batch's longest

Records come from plain text, JSON Lines or Parquet, compressed or not (``records``). Lines
end as in Python's text mode ("\\n", "\\r\\n", a lone "\\r"), are stripped, and a blank line
is the empty sentence ([CLS] [SEP]), as sentence-transformers encodes it: output row i is
line (record) i. With ``pairs``
each line is two tab-separated columns, tokenized with the tokenizer's pair template
(segment 0, then 1; an empty column is an empty segment, as transformers' tokenizers
encode a batch of pairs). Sorting by length within a chunk (longest first, as
sentence-transformers' ``encode`` sorts its input) keeps padding small while memory stays
bounded by the chunk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .records import Item, RecordId, Source, Spec, open_source, records


@dataclass(frozen=True)
class TextInfo:
    """What ``scan`` found: the number of records ("lines", also Parquet rows), the bytes
    of the file, the ids' kind ("" none, "int", "str"), the SHA-256 of each chunk's decoded
    records (``chunk_digest``; empty without a chunk size), the format label and the unit
    a record number counts ("line", "row"). A scan split by byte ranges
    (``byteranges``) adds this rank's byte range of every chunk (``slices``: (start, end)
    per chunk, what it reads and tokenizes), the bytes this rank read while scanning
    (``scan_bytes``; 0 where no range was scanned) and the SHA-256 of the file (``sha256``,
    read once per distinct file: ``encode.corpus_digest``)."""

    lines: int
    size: int
    ids: str = ""
    chunk_digests: tuple[str, ...] = ()
    label: str = "text"
    unit: str = "line"
    slices: tuple[tuple[int, int], ...] = ()
    scan_bytes: int = 0
    sha256: str = ""


def chunk_digest(items: list[Item], ids: list[RecordId] | None) -> str:
    """SHA-256 of a chunk's decoded records: each text (and second text), each id, as
    UTF-8 with a NUL after each (NUL is refused in records, so the encoding is one-to-one;
    an integer id is "i" and its digits, a string id "s" and the string)."""
    h = hashlib.sha256()
    for k, item in enumerate(items):
        for text in item if isinstance(item, tuple) else (item,):
            h.update(text.encode("utf-8"))
            h.update(b"\0")
        if ids is not None:
            rid = ids[k]
            h.update((f"i{rid}" if isinstance(rid, int) else f"s{rid}").encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()


def _source(path: Path, pairs: bool, what: str, spec: Spec | Source | None) -> Source:
    if isinstance(spec, Source):
        return spec
    if spec is None:
        spec = Spec(pairs=pairs)
    return open_source(path, spec, what)


def scan(path: Path, pairs: bool = False, what: str = "input.text",
         spec: Spec | Source | None = None, chunk: int = 0) -> TextInfo:
    """Check every record (UTF-8; two columns with ``pairs``; JSON objects with their
    fields; ids of one kind) and count them, in one pass with memory bounded by the longest
    line (one row group of Parquet). ``spec`` says what to read (default: plain text, or
    any format by name and magic with ``Spec()``); with ``chunk`` > 0, the digest of every
    ``chunk`` records is kept (``TextInfo.chunk_digests``).

    Raises InputError naming the file and the 1-based line (row) number: bytes that are not
    UTF-8, a pairs line without exactly two tab-separated columns, a JSON Lines line that
    is blank, not JSON, not an object or lacks a string field, an id that is not a string
    or an integer, a file with no records, anything but a readable regular file, a
    recognised container or binary data (``records.open_source``).
    """
    src = _source(path, pairs, what, spec)
    count = 0
    digests: list[str] = []
    items: list[Item] = []
    ids: list[RecordId] = []
    kind = ""
    for count, item, rid in records(src):  # noqa: B007
        if rid is not None and not kind:
            kind = "int" if isinstance(rid, int) else "str"
        if chunk:
            items.append(item)
            ids.append(rid)
            if len(items) == chunk:
                digests.append(chunk_digest(items, ids if src.spec.id_field else None))
                items, ids = [], []
    if count == 0:
        empty = "has no rows" if src.format == "parquet" else (
            "is empty (one sentence per line)" if src.format == "text" else
            "is empty (one JSON object per line)")
        raise InputError(f"{src.where}: the file {empty}")
    if items:
        digests.append(chunk_digest(items, ids if src.spec.id_field else None))
    try:
        size = src.path.stat().st_size
    except OSError:
        size = 0
    return TextInfo(count, size, kind, tuple(digests), src.label, src.unit)


def record_chunks(src: Source, size: int, start: int = 0
                  ) -> Iterator[tuple[int, list[Item], list[RecordId] | None, str]]:
    """(index of the chunk's first record, its items, its ids (None without
    ``input.id_field``), its ``chunk_digest``) for records ``start`` .. end, ``size`` at a
    time (the last chunk may be shorter). Errors as ``scan``."""
    with_ids = bool(src.spec.id_field)
    items: list[Item] = []
    ids: list[RecordId] = []
    first = start
    for _number, item, rid in records(src, start):
        items.append(item)
        ids.append(rid)
        if len(items) == size:
            yield first, items, ids if with_ids else None, chunk_digest(
                items, ids if with_ids else None)
            first, items, ids = first + size, [], []
    if items:
        yield first, items, ids if with_ids else None, chunk_digest(
            items, ids if with_ids else None)


class InputChanged(InputError):
    """The corpus changed while the job read it (its chunks are of no use)."""


def input_changed(src: Source, how: str) -> InputChanged:
    """The one-line error for a corpus that ``how`` ("other lines 9-16 (chunk 1) than")
    says changed since the scan."""
    return InputChanged(f"{src.where} changed while the job read it: it now has {how}"
                        " it had at the start; its chunks are discarded: run again")


def checked_chunks(src: Source, size: int, info: TextInfo, first_chunk: int = 0
                   ) -> Iterator[tuple[int, int, list[Item], list[RecordId] | None, str]]:
    """(chunk index, index of its first record, items, ids, digest) from chunk
    ``first_chunk`` on (``record_chunks``), each checked against what ``scan`` found:
    InputChanged when the file now holds more, fewer or other records (a chunk whose digest
    is not ``info.chunk_digests[index]``)."""
    units = f"{info.unit}s"

    def changed(how: str) -> InputChanged:
        return input_changed(src, how)

    start = min(first_chunk * size, info.lines)
    end = start
    for index, (first, items, ids, digest) in enumerate(record_chunks(src, size, start),
                                                        first_chunk):
        end = first + len(items)
        if end > info.lines:
            raise changed(f"more than the {info.lines} {units}")
        if index >= len(info.chunk_digests) or digest != info.chunk_digests[index]:
            raise changed(f"other {units} {first + 1}-{end} (chunk {index}) than")
        yield index, first, items, ids, digest
    if end != info.lines:
        raise changed(f"fewer than the {info.lines} {units}")


def chunks(path: Path, size: int, pairs: bool = False, start: int = 0,
           what: str = "input.text", spec: Spec | Source | None = None
           ) -> Iterator[tuple[int, list[Item]]]:
    """(index of the chunk's first line, its items) for lines ``start`` .. end, ``size``
    lines at a time (the last chunk may be shorter). Items are stripped strings, or
    (first, second) with ``pairs``. Errors as ``scan``."""
    src = _source(path, pairs, what, spec)
    for first, items, _ids, _digest in record_chunks(src, size, start):
        yield first, items


def _read_key(path: Path, key: str) -> object:
    """``key`` of a model folder's JSON file; None when the file is absent or not a table.
    A FIFO, device, oversized or malformed file is an InputError (``safefile.read_json``:
    one line, exit 2, never a hang)."""
    from ..io.safefile import read_json

    if not os.path.lexists(path):
        return None
    table = read_json(path, "model folder file")
    return table.get(key) if isinstance(table, dict) else None


WORDPIECE_CLASSES = ("BertTokenizer", "DistilBertTokenizer", "MPNetTokenizer",
                     "ElectraTokenizer")  # tokenizer classes that build their normalizer


def as_transformers(tok: Any, path: Path) -> None:
    """Give ``tok`` (loaded from ``path``, a tokenizer.json) the normalizer transformers
    gives it: a WordPiece tokenizer class (``tokenizer_config.json`` ``tokenizer_class``,
    BERT's when absent) builds its ``BertNormalizer`` from that file's ``do_lower_case``
    (default true), ``strip_accents`` (default none: as lowercase) and
    ``tokenize_chinese_chars`` (default true), whatever tokenizer.json's normalizer says.
    A folder whose two files disagree (a cased tokenizer.json, ``do_lower_case`` true)
    is tokenized as transformers and sentence-transformers tokenize it. Other tokenizers
    (BPE, ``PreTrainedTokenizerFast``) are left as tokenizer.json describes them."""
    from tokenizers import normalizers

    if not isinstance(tok.normalizer, normalizers.BertNormalizer):
        return
    config = path.parent / "tokenizer_config.json"
    if not os.path.lexists(config):
        return
    from ..io.safefile import read_json

    table = read_json(config, "tokenizer file")
    if not isinstance(table, dict):
        return
    kind = str(table.get("tokenizer_class") or "BertTokenizer").removesuffix("Fast")
    if kind not in WORDPIECE_CLASSES:
        return
    strip = table.get("strip_accents")
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(table.get("tokenize_chinese_chars", True)),
        strip_accents=None if strip is None else bool(strip),
        lowercase=bool(table.get("do_lower_case", True)))


def lower_cases(weights_dir: Path | None) -> bool:
    """Whether sentence-transformers lowercases every text before tokenizing for this
    model folder: ``sentence_bert_config.json`` ``do_lower_case`` true in a folder that
    lists its modules (``modules.json``; a plain folder gets the Transformer's default,
    false). The tokenizer's normalizer then gets a ``Lowercase`` in front, unless it has
    one (``SentenceTokenizer(lower_case=True)``)."""
    if weights_dir is None or not (weights_dir / "modules.json").is_file():
        return False
    return bool(_read_key(weights_dir / "sentence_bert_config.json", "do_lower_case"))


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


def pack_tokens(toks: Tokens) -> np.ndarray:
    """One int64 vector of a tokenized slice, to move it between ranks:
    ``[items, tokens, lengths (items), truncated (items), ids (tokens), types (tokens)]``."""
    lengths = toks.lengths
    flat = [np.concatenate(a) if a else np.zeros(0, np.int64) for a in (toks.ids, toks.types)]
    head = np.array([len(lengths), int(lengths.sum())], dtype=np.int64)
    return np.concatenate([head, lengths, toks.truncated.astype(np.int64), *flat])


def join_tokens(packed: list[np.ndarray]) -> Tokens:
    """The ``Tokens`` of consecutive slices packed by ``pack_tokens`` (trailing padding
    ignored), in slice order: the same as tokenizing the slices together."""
    ids: list[np.ndarray] = []
    types: list[np.ndarray] = []
    truncated = []
    for block in packed:
        items, total = int(block[0]), int(block[1])
        lengths = block[2:2 + items]
        flags = block[2 + items:2 + 2 * items].astype(bool)
        at = 2 + 2 * items
        flat_ids, flat_types = block[at:at + total], block[at + total:at + 2 * total]
        cuts = np.cumsum(lengths)[:-1]
        if items:
            ids += np.split(flat_ids.copy(), cuts)
            types += np.split(flat_types.copy(), cuts)
        truncated.append(flags)
    return Tokens(ids, types, np.concatenate(truncated) if truncated else np.zeros(0, bool))


class SentenceTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer with the model's truncation and no padding.

    ``encode`` truncates "longest_first" at ``max_length`` tokens (special tokens
    included), as sentence-transformers' ``tokenize`` does. ``prompt``: text put before
    every line (the first text of a pair), as ``SentenceTransformer.encode`` does;
    ``prompt_length`` is its length as sentence-transformers counts it for
    ``include_prompt``: the prompt tokenized alone, less a trailing special token.
    Raises InputError when the file cannot be loaded, or an id or segment does not fit
    ``vocab``/``type_vocab``.
    """

    def __init__(self, path: Path, max_length: int, vocab: int, type_vocab: int,
                 prompt: str = "", lower_case: bool = False) -> None:
        from tokenizers import Tokenizer, normalizers

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception on a bad file
            raise InputError(f"tokenizer '{path}' cannot be loaded: {err}") from None
        as_transformers(self._tok, path)
        norm = self._tok.normalizer
        if lower_case and not (isinstance(norm, normalizers.Lowercase) or (
                isinstance(norm, normalizers.Sequence)
                and any(isinstance(n, normalizers.Lowercase) for n in norm))):
            # sentence-transformers' Transformer(do_lower_case=True): Lowercase put first
            self._tok.normalizer = normalizers.Sequence(
                [normalizers.Lowercase(), *([norm] if norm is not None else [])])
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first")
        self.path, self.max_length = path, max_length
        self.vocab, self.type_vocab = vocab, type_vocab
        self.prompt, self.prompt_length = prompt, 0
        if prompt:
            alone = self._tok.encode(prompt)
            self.prompt_length = len(alone.ids) - (1 if alone.special_tokens_mask
                                                   and alone.special_tokens_mask[-1] else 0)

    def encode(self, items: list[Item], first_line: int = 0,
               what: str = "input.text", unit: str = "line") -> Tokens:
        """Ids, segment ids and truncation flags of ``items`` (records ``first_line`` ...,
        numbered in messages as ``unit`` 1-based)."""
        if self.prompt:
            items = [(self.prompt + item[0], *item[1:]) if isinstance(item, tuple)
                     else self.prompt + item for item in items]
        encodings = self._tok.encode_batch(items)
        ids = [np.array(e.ids, dtype=np.int64) for e in encodings]
        types = [np.array(e.type_ids, dtype=np.int64) for e in encodings]
        for i, (a, t) in enumerate(zip(ids, types, strict=True)):
            if a.size and int(a.max()) >= self.vocab:
                raise InputError(f"{what} {unit} {first_line + i + 1}: token id {int(a.max())}"
                                 f" >= model.vocab = {self.vocab}: the tokenizer"
                                 f" '{self.path}' does not belong to this model")
            if t.size and int(t.max()) >= self.type_vocab:
                raise InputError(f"{what} {unit} {first_line + i + 1}: segment id {int(t.max())}"
                                 f" but the model's type vocabulary holds {self.type_vocab}"
                                 " (model.type_vocab): it cannot encode sentence pairs")
            if a.size > self.max_length:  # tokenizers skips a limit below its specials
                raise InputError(f"{what} {unit} {first_line + i + 1}: {a.size} tokens after"
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
