"""A line-based corpus (plain text or JSON Lines, uncompressed) scanned and read by byte
ranges, so that rank r of N scans about 1/N of the file and reads only the lines it
tokenizes. No MPI: the functions take byte offsets and line counts; ``commands/encode.py``
exchanges them.

    a, b = range_of(fh, size, rank, ranks)          # line starts near r*size/N, (r+1)*size/N
    lines, nbytes = count_lines(fh, a, b, size)     # pass 1: line ends counted, nothing decoded
    kind, nbytes = first_id_kind(src, size)         # JSON Lines with ids: line 1's id kind
    # exclusive scan of the counts: ``first`` = lines of the ranks before, ``total``
    part = scan_part(src, size, a, b, first, lines, total, chunk, ranks, kind)  # pass 2
    items, ids, nbytes = read_records(src, start, end, first_line, kind)  # later: a slice

Why two passes: a chunk's digest (``textstream.chunk_digest``, a SHA-256 over its records
in order) and a bad line's number need the global number of the range's first line, which
is the sum of the line counts of the ranges before (the exclusive scan). Pass 1 counts line
ends at memory speed (``bytes.count``); pass 2 decodes and checks every line of the range
with its global number, keeps the digest of every chunk that starts in the range (reading
on past the range's end to finish the last one: at most one chunk's bytes), and the byte
offset of every slice start (``shard.partition`` of each chunk over the N ranks) in the
range. The digests are those of the one-rank ``textstream.scan``, so the check of what is
read later and the parts' records digests are unchanged.

Uncompressed plain text and uncompressed JSON Lines are split (``splittable``); a line is
parsed as the one-rank reader parses it (``records.text_item``, ``records.jsonl_record``).
JSON Lines fixes the kind of its ids (``records.IdKind``: all integers or all strings) by
its first record for the whole file, so every rank first reads and parses line 1
(``first_id_kind``) and checks its range against that kind: a mismatch names line N and
line 1 in the one-rank scan's words. When line 1 itself is bad, the rank whose range
holds it (the lowest with an error) names it. Compressed streams (gzip, bzip2, zstd)
cannot be entered at a byte offset and Parquet has no lines: those are scanned whole by
one rank.

The file's own digest (the resume key's, ``verify --inputs``') is ``piece_digest``: the
SHA-256 of the SHA-256s of its consecutive pieces (``piece_size``: 64 KiB multiples, at
most 4096 pieces), the same whatever the number of ranks, whose pieces the ranks that see
one copy of the file hash in turn.

Line ends are those of ``records.split_lines`` (Python's universal newlines): a line starts
at byte 0 and after every "\\n", every "\\r\\n" and every lone "\\r".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..core.shard import partition
from ..errors import InputError
from .records import IdKind, Item, RecordId, Source, jsonl_record, text_item
from .textstream import chunk_digest

BLOCK = 1 << 20  # bytes read at once inside a range
TAIL_BLOCK = 1 << 14  # bytes read at once past a range's end (finishing its last chunk)
FIRST_BLOCK = 1 << 12  # bytes read at once for line 1 (the kind of JSON Lines ids)
_END = re.compile(rb"\r\n|\r|\n")


def splittable(src: Source) -> bool:
    """Whether ``src`` can be scanned and read by byte ranges: uncompressed plain text or
    uncompressed JSON Lines."""
    return src.format in ("text", "jsonl") and src.compression == "none"


def line_start(fh: IO[bytes], x: int, size: int) -> int:
    """The first line start at or after byte ``x`` (``size`` when none is left)."""
    if x <= 0:
        return 0
    if x >= size:
        return size
    fh.seek(x - 1)
    prev = fh.read(1)
    pos = x  # the offset of the next byte read
    while True:
        block = fh.read(BLOCK)
        if prev == b"\n":
            return pos
        if prev == b"\r":  # a line starts here unless this "\r" is the first half of "\r\n"
            return pos + 1 if block[:1] == b"\n" else pos
        if not block:
            return size
        ends = [i for i in (block.find(b"\n"), block.find(b"\r")) if i >= 0]
        if not ends:
            pos, prev = pos + len(block), block[-1:]
            continue
        i = min(ends)
        if block[i] == 0x0A or i + 1 < len(block):
            return pos + i + 1 + (block[i:i + 2] == b"\r\n")
        return min(size, pos + i + 1 + (fh.read(1) == b"\n"))  # "\r" ends the block


def range_of(fh: IO[bytes], size: int, rank: int, ranks: int) -> tuple[int, int]:
    """Byte range [a, b) of rank ``rank`` of ``ranks``: the nominal bounds r*size//N and
    (r+1)*size//N, each moved to the next line start. Consecutive ranks' ranges tile the
    file; a rank whose range holds no line start gets an empty range."""
    return (line_start(fh, rank * size // ranks, size),
            line_start(fh, (rank + 1) * size // ranks, size))


def count_lines(fh: IO[bytes], a: int, b: int, size: int) -> tuple[int, int]:
    """(lines, bytes read) of [a, b), both line starts: its line ends, plus one for a last
    line without a line end at the end of the file."""
    fh.seek(a)
    lines, pos, last = 0, a, b""
    while pos < b:
        block = fh.read(min(BLOCK, b - pos))
        if not block:
            break
        lines += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
        if last == b"\r" and block[:1] == b"\n":  # a "\r\n" across two blocks
            lines -= 1
        pos, last = pos + len(block), block[-1:]
    if b == size and pos > a and last not in (b"\n", b"\r"):
        lines += 1
    return lines, pos - a


class LineReader:
    """Lines of [start, end) of an open file with the offset of each line's start;
    ``read`` counts the bytes taken from the file."""

    def __init__(self, fh: IO[bytes], block: int = BLOCK) -> None:
        self.fh, self.block, self.read = fh, block, 0

    def lines(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(offset, line without its line end) for every line starting in [start, end);
        ``end`` is a line start or the file's size."""
        self.fh.seek(start)
        carry, at, left = b"", start, end - start
        while left > 0:  # reads grow with a carried long line: linear, not quadratic
            data = self.fh.read(min(max(self.block, len(carry)), left))
            if not data:
                break
            left -= len(data)
            self.read += len(data)
            buf = carry + data if carry else data
            last = 0
            if b"\r" not in buf:  # the common case
                pieces = buf.split(b"\n")
                for piece in pieces[:-1]:
                    yield at + last, piece
                    last += len(piece) + 1
            else:
                for m in _END.finditer(buf):
                    if left > 0 and m.end() == len(buf) and m.group() == b"\r":
                        break  # maybe the first half of "\r\n": decided with the next block
                    yield at + last, buf[last:m.start()]
                    last = m.end()
            carry, at = buf[last:], at + last
        if carry:  # the file's last line, without a line end
            yield at, carry


class _Parser:
    """One line as the one-rank reader parses it: (item, id or None). JSON Lines ids are
    checked against ``kind`` (line 1's, ``first_id_kind``; "" leaves the first id read
    to fix it, as ``records.IdKind`` does)."""

    def __init__(self, src: Source, kind: str = "") -> None:
        self.src, self.pairs = src, src.spec.pairs
        self.ids = IdKind(src) if src.format == "jsonl" else None
        if self.ids is not None and kind:
            self.ids.kind, self.ids.first = kind, 1  # every record has an id: line 1's

    def __call__(self, raw: bytes, offset: int, number: int) -> tuple[Item, RecordId]:
        if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM is not part of line 1
            raw = raw[3:]
        if self.ids is None:
            return text_item(raw, number, self.pairs, self.src.where), None
        return jsonl_record(raw, number, self.src, self.ids)


def first_id_kind(src: Source, size: int) -> tuple[str, int]:
    """(kind of line 1's id: "int", "str", or "" without ``input.id_field``, for plain
    text, for an empty file or when line 1 is bad; bytes read). Line 1 fixes the kind of
    every id of a JSON Lines file (``records.IdKind``); a bad line 1 is named by the rank
    whose range holds it."""
    if src.format != "jsonl" or not src.spec.id_field or size == 0:
        return "", 0
    try:
        with open(src.path, "rb") as fh:
            reader = LineReader(fh, FIRST_BLOCK)
            for offset, raw in reader.lines(0, size):
                try:
                    _, rid = _Parser(src)(raw, offset, 1)
                except InputError:
                    return "", reader.read
                return ("int" if isinstance(rid, int) else "str"), reader.read
    except OSError as err:
        raise InputError(f"{src.where}: cannot be read ({err.strerror or err})") from None
    return "", 0


@dataclass
class Part:
    """What pass 2 found in one range: the digest of every chunk that starts in it (chunk
    index -> hex), the byte offset of every slice start in it (global line index ->
    offset) and the bytes it read (the range and the tail of its last chunk)."""

    digests: dict[int, str] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    bytes_read: int = 0


def slice_starts(total: int, chunk: int, ranks: int, lo: int, hi: int) -> list[int]:
    """Sorted global line indices in [lo, hi) where a rank's slice of a chunk starts
    (``shard.partition`` of each chunk of ``chunk`` lines over ``ranks``)."""
    out: set[int] = set()
    for k in range(lo // chunk, (hi - 1) // chunk + 1 if hi > lo else 0):
        first = k * chunk
        n = min(chunk, total - first)
        for s in range(ranks):
            t = first + partition(n, ranks, s)[1]
            if lo <= t < hi:
                out.add(t)
    return sorted(out)


def scan_part(src: Source, size: int, a: int, b: int, first: int, lines: int, total: int,
              chunk: int, ranks: int, kind: str = "") -> Part:
    """Pass 2 over [a, b), whose ``lines`` lines start at global line index ``first`` (of
    ``total``, cut into chunks of ``chunk`` lines, each split over ``ranks``): every line
    checked as ``records.records`` checks it (InputError naming the global 1-based line;
    JSON Lines ids against ``kind``, line 1's: ``first_id_kind``), the digests of the
    chunks starting here (``textstream.chunk_digest``, ids included with
    ``input.id_field``), the offsets of the slice starts here; a read error is an
    InputError too (one line on every rank, never one rank's crash)."""
    try:
        return _scan_part(src, size, a, b, first, lines, total, chunk, ranks, kind)
    except OSError as err:
        raise InputError(f"{src.where}: cannot be read ({err.strerror or err})") from None


def _scan_part(src: Source, size: int, a: int, b: int, first: int, lines: int, total: int,
               chunk: int, ranks: int, kind: str) -> Part:
    part = Part()
    parse = _Parser(src, kind)
    with_ids = bool(src.spec.id_field)
    targets = iter(slice_starts(total, chunk, ranks, first, first + lines))
    target = next(targets, total)
    items: list[Item] = []
    ids: list[RecordId] = []
    open_chunk = -1  # the chunk whose items are being collected

    def digest() -> str:
        return chunk_digest(items, ids if with_ids else None)

    with open(src.path, "rb") as fh:
        reader = LineReader(fh)
        i = first
        for offset, raw in reader.lines(a, b):
            item, rid = parse(raw, offset, i + 1)
            if i == target:
                part.offsets[i] = offset
                target = next(targets, total)
            if i % chunk == 0:
                open_chunk, items, ids = i // chunk, [], []
            if open_chunk >= 0:
                items.append(item)
                ids.append(rid)
                if len(items) == min(chunk, total - open_chunk * chunk):
                    part.digests[open_chunk] = digest()
                    open_chunk, items, ids = -1, [], []
            i += 1
        if open_chunk >= 0:  # finish the last chunk past the range's end
            tail = LineReader(fh, TAIL_BLOCK)
            need = min(chunk, total - open_chunk * chunk)
            for offset, raw in tail.lines(b, size):
                try:
                    item, rid = parse(raw, offset, i + 1)
                except InputError:  # its own range's rank names it
                    break
                items.append(item)
                ids.append(rid)
                i += 1
                if len(items) == need:
                    part.digests[open_chunk] = digest()
                    break
            reader.read += tail.read
        part.bytes_read = reader.read
    return part


def read_records(src: Source, start: int, end: int, first_line: int, kind: str = ""
                 ) -> tuple[list[Item], list[RecordId] | None, int]:
    """(items, ids (None without ``input.id_field``), bytes read) of the lines in bytes
    [start, end), the first being global line index ``first_line`` (for messages), JSON
    Lines ids checked against ``kind`` (``first_id_kind``): what one rank tokenizes of a
    chunk. InputError (one line) for a bad line or a file that cannot be read."""
    with_ids = bool(src.spec.id_field)
    if end <= start:
        return [], [] if with_ids else None, 0
    parse = _Parser(src, kind)
    try:
        with open(src.path, "rb") as fh:
            reader = LineReader(fh)
            pairs = [parse(raw, offset, first_line + k + 1)
                     for k, (offset, raw) in enumerate(reader.lines(start, end))]
    except OSError as err:
        raise InputError(f"{src.where}: cannot be read ({err.strerror or err})") from None
    return ([item for item, _ in pairs], [rid for _, rid in pairs] if with_ids else None,
            reader.read)


MAX_PIECES = 4096  # a corpus digest is at most this many pieces' SHA-256s (256 kB of hex)
PIECE_UNIT = 64 << 10  # a piece is a multiple of 64 KiB


def piece_size(size: int) -> int:
    """Bytes per piece of a ``size``-byte file: the smallest multiple of 64 KiB that cuts
    it into at most ``MAX_PIECES`` pieces (a function of the size alone, so every rank and
    every rank count agrees)."""
    return PIECE_UNIT * max(1, -(-size // (MAX_PIECES * PIECE_UNIT)))


def pieces_of(size: int) -> int:
    """The number of pieces of a ``size``-byte file (at least one)."""
    return max(1, -(-size // piece_size(size)))


def hash_pieces(path: str | Path, size: int, mine: range) -> dict[int, str]:
    """The SHA-256 of each piece in ``mine`` (piece i: bytes i*p .. (i+1)*p of a
    ``size``-byte file, p = ``piece_size(size)``); InputError (one line) when the file is
    shorter."""
    import hashlib

    step = piece_size(size)
    out = {}
    with open(path, "rb") as fh:
        for i in mine:
            fh.seek(i * step)
            want = min(step, size - i * step)
            data = fh.read(want)
            if len(data) != want:
                raise InputError(f"'{path}' has fewer than {size} bytes: it changed while read")
            out[i] = hashlib.sha256(data).hexdigest()
    return out


def piece_bytes(size: int, mine: range) -> int:
    """The bytes of the pieces in ``mine`` (what ``hash_pieces`` reads)."""
    step = piece_size(size)
    return sum(min(step, size - i * step) for i in mine)


def piece_digest(digests: dict[int, str], size: int) -> str:
    """SHA-256 of the file's size and its pieces' SHA-256s in order (``hash_pieces``)."""
    import hashlib

    text = "\n".join((str(size), *(digests[i] for i in range(pieces_of(size)))))
    return hashlib.sha256(text.encode("ascii")).hexdigest()
