"""Corpus files as people keep them: plain text, JSON Lines, Parquet, compressed or not,
read as a stream of records (text, optional second text, optional id). No MPI.

    src = open_source(Path("corpus.jsonl.gz"), Spec(field="text", id_field="id"))
    for number, item, rid in records(src):      # number: 1-based line (or Parquet row)
        ...

What a file is: ``Spec.format`` = "auto" (the default) goes by the name and the first
bytes. Compression is always recognised by its magic bytes (gzip, bzip2: the standard
library; zstd: the optional ``zstandard``), and the name without its compression suffix
picks the format: ``.jsonl``/``.ndjson``/``.json`` JSON Lines, ``.parquet``/``.pq``
Parquet (also any file that starts with ``PAR1``), anything else plain text. Containers
that are recognised but not read (zip, tar, xz, 7z, HDF5, PDF, ...) and binary data are one
``InputError`` naming what the file looks like and what to do.

Lines (text and JSON Lines) end as in Python's text mode (universal newlines): at "\\n",
"\\r\\n" and a lone "\\r"; other separators (\\x0b, \\x0c, \\u2028, ...) are characters
inside a line. A leading UTF-8 byte-order mark is not part of line 1. Memory is bounded by
the longest line (text, JSON Lines) or one row group (Parquet).

Every bad record is an ``InputError`` naming the file and its 1-based line (row) number.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, InputError

Item = str | tuple[str, str]
RecordId = str | int | None
FORMATS = ("auto", "text", "jsonl", "parquet")
INT64 = 2**63
SNIFF = 8192  # bytes looked at to tell text from binary data
DOC = "docs/corpus-formats.md"

COMPRESSED = {  # magic -> (name, what decompresses it here)
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
}
SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bzip2", ".zst": "zstd", ".zstd": "zstd"}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")

# recognised, not read: magic at offset 0 -> (what it is, what to do)
CONTAINERS: list[tuple[bytes, str, str]] = [
    (b"PK\x03\x04", "a zip archive (or .docx/.xlsx/.odt, which are zip)",
     "extract the corpus (unzip) and give that file"),
    (b"PK\x05\x06", "an empty zip archive", "give the corpus file itself"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it (xz -d) or recompress it with"
     " gzip or zstd, which are read directly"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract the corpus (7z x) and give that file"),
    (b"\x04\x22\x4d\x18", "LZ4-compressed data", "decompress it (lz4 -d) or recompress it"
     " with gzip or zstd"),
    (b"\x1f\x9d", "compress (.Z) data", "decompress it (uncompress) or recompress it with gzip"),
    (b"Rar!\x1a\x07", "a RAR archive", "extract the corpus (unrar x) and give that file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file", "token ids in HDF5 go to input.tokens; for"
     " text, export the sentences as text, JSON Lines or Parquet"),
    (b"%PDF-", "a PDF document", "extract its text first (pdftotext FILE corpus.txt)"),
    (b"ARROW1", "an Arrow IPC (Feather) file", "write it as Parquet"
     " (pyarrow.parquet.write_table(pyarrow.feather.read_table(FILE), 'corpus.parquet'))"),
    (b"ORC", "an ORC file", "write it as Parquet or JSON Lines"),
    (b"Obj\x01", "an Avro file", "write it as Parquet or JSON Lines"),
    (b"SQLite format 3\x00", "an SQLite database", "export the text column as JSON Lines"
     " or Parquet"),
    (b"\x93NUMPY", "a NumPy .npy array", "token ids go to input.tokens (HDF5); text as a text,"
     " JSON Lines or Parquet file"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Office document (.doc/.xls)",
     "export the text as plain text, JSON Lines or Parquet"),
    (b"\x7fELF", "an executable (ELF)", "give the corpus file"),
    (b"\x89PNG", "a PNG image", "give the corpus file"),
    (b"\xff\xd8\xff", "a JPEG image", "give the corpus file"),
    (b"GIF8", "a GIF image", "give the corpus file"),
    (b"\xff\xfe", "UTF-16 text (little-endian byte-order mark)",
     "convert it: iconv -f UTF-16 -t UTF-8 FILE > corpus.txt"),
    (b"\xfe\xff", "UTF-16 text (big-endian byte-order mark)",
     "convert it: iconv -f UTF-16 -t UTF-8 FILE > corpus.txt"),
]


@dataclass(frozen=True)
class Spec:
    """What to read from a corpus file (the ``input`` keys of the config)."""

    format: str = "auto"  # "auto" | "text" | "jsonl" | "parquet"
    field: str = "text"  # JSON Lines / Parquet: the field holding the text
    pair_field: str = ""  # with pairs: the field holding the second text
    id_field: str = ""  # the field holding each record's id (string or integer)
    pairs: bool = False  # text: each line is first<TAB>second; else pair_field

    @classmethod
    def of(cls, i: Any) -> Spec:
        """The spec of a config's ``[input]`` table (``config.InputConfig``)."""
        return cls(i.format, i.field, i.pair_field, i.id_field, i.pairs)


@dataclass(frozen=True)
class Source:
    """A corpus file recognised by ``open_source``: its resolved format and compression."""

    path: Path
    format: str  # "text" | "jsonl" | "parquet"
    compression: str  # "none" | "gzip" | "bzip2" | "zstd"
    spec: Spec
    what: str = "input.text"

    @property
    def unit(self) -> str:
        """What a record number counts: "line" (text, JSON Lines) or "row" (Parquet)."""
        return "row" if self.format == "parquet" else "line"

    @property
    def where(self) -> str:
        return f"{self.what} = '{self.path}'"

    @property
    def label(self) -> str:
        """The format as the output file records it, e.g. "jsonl+gzip"."""
        return self.format if self.compression == "none" else f"{self.format}+{self.compression}"


# --- recognising a file ---------------------------------------------------------------


def regular_file(path: Path, what: str) -> None:
    """InputError unless ``path`` is a regular file (a FIFO or device could block or never
    end; a folder is not text)."""
    if not path.exists():
        raise InputError(f"{what} = '{path}': the file does not exist (relative paths are"
                         f" taken from the current folder, {Path.cwd()})")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise InputError(f"{what} = '{path}' is {kind}: give a text file")


def _head(path: Path, what: str, n: int = SNIFF) -> bytes:
    regular_file(path, what)
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as err:
        raise InputError(f"{what} = '{path}': cannot be read ({err.strerror})") from None


def _compression(head: bytes) -> str:
    for magic, name in COMPRESSED.items():
        if head.startswith(magic):
            return name
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        return "bzip2"
    return "none"


def _container(head: bytes) -> tuple[str, str] | None:
    """(what it looks like, what to do) for a recognised container, else None."""
    for magic, name, fix in CONTAINERS:
        if head.startswith(magic):
            return name, fix
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive", "extract the corpus (tar -xf FILE) and give that file"
    return None


def _stem_suffix(path: Path) -> str:
    """The name's format suffix, a compression suffix set aside (``a.jsonl.gz``: .jsonl)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def open_source(path: Path, spec: Spec, what: str = "input.text") -> Source:
    """The file recognised: InputError (one line) for a missing or unreadable file, a
    recognised container that is not read, binary data, a compression whose module is
    missing, a format that does not match the file's bytes. ConfigError for keys that do
    not fit the format (a field of plain text, an id of plain text)."""
    if spec.format not in FORMATS:
        raise ConfigError(f"input.format = '{spec.format}': give one of {', '.join(FORMATS)}")
    head = _head(path, what)
    where = f"{what} = '{path}'"
    compression = _compression(head)
    inner = head
    if compression != "none":
        _decompressor_ready(compression, where)
        inner = _peek(path, compression, where)
        if not inner:
            raise InputError(f"{where}: the {compression} stream holds no data (one sentence"
                             " per line, or one JSON object per line)")
    found = _container(inner)
    packed = f" ({compression}-compressed)" if compression != "none" else ""
    is_parquet = inner.startswith(b"PAR1")
    fmt = spec.format
    if fmt == "auto":
        suffix = _stem_suffix(path)
        fmt = ("parquet" if is_parquet or suffix in PARQUET_SUFFIXES else
               "jsonl" if suffix in JSONL_SUFFIXES else "text")
        if fmt == "text" and _looks_like_jsonl(inner, spec.field):
            raise InputError(f"{where}: line 1 is a JSON object with a '{spec.field}' field:"
                             " JSON Lines under another name? Set input.format = \"jsonl\""
                             " (or \"text\" to encode each line as it is)")
    if fmt == "parquet":
        if compression != "none":
            raise InputError(f"{where}: Parquet{packed} cannot be read as a stream (Parquet"
                             " needs its footer first); decompress it, Parquet compresses"
                             " its own pages")
        if not is_parquet:
            looks = found[0] if found else "not Parquet (no 'PAR1' magic at its start)"
            raise InputError(f"{where}: input.format is parquet but the file is {looks}; set"
                             " input.format = \"auto\" or give a Parquet file")
    else:
        if is_parquet:
            raise InputError(f"{where}: a Parquet file{packed}, read as {_name(fmt)}: set"
                             " input.format = \"parquet\" (or \"auto\")")
        if found is not None:
            raise InputError(f"{where}: {found[0]}{packed}, not {_name(fmt)}: {found[1]}"
                             f" (see {DOC})")
        _check_text_like(inner, where, packed)
        if fmt == "jsonl" and inner.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            raise InputError(f"{where}: a JSON array, not JSON Lines (one object per line):"
                             " convert it with jq -c '.[]' FILE > corpus.jsonl")
    _check_keys(fmt, spec, where)
    return Source(path, fmt, compression, spec, what)


def _looks_like_jsonl(head: bytes, field: str) -> bool:
    """Whether the first line of ``head`` is a JSON object holding ``field``."""
    first = head.removeprefix(b"\xef\xbb\xbf").split(b"\n", 1)[0].strip()
    if not (first.startswith(b"{") and first.endswith(b"}")):
        return False
    try:
        record = json.loads(first)
    except ValueError:  # not JSON (or not UTF-8): a text line
        return False
    return isinstance(record, dict) and field in record


def _name(fmt: str) -> str:
    return {"text": "text", "jsonl": "JSON Lines", "parquet": "Parquet"}[fmt]


def _check_keys(fmt: str, spec: Spec, where: str) -> None:
    if fmt == "text":
        for key, value in (("input.id_field", spec.id_field),
                           ("input.pair_field", spec.pair_field)):
            if value:
                raise ConfigError(f"{key} = '{value}' but {where} is plain text (one sentence"
                                  " per line, no fields): give a JSON Lines or Parquet file,"
                                  " or remove the key")
        return
    if not spec.field:
        raise ConfigError(f"input.field is empty: name the field of {where} that holds the"
                          " text (e.g. \"text\")")
    if spec.pairs and not spec.pair_field:
        raise ConfigError(f"input.pairs = true with {_name(fmt)}: set input.pair_field to the"
                          " field that holds each record's second text")
    if spec.pair_field and not spec.pairs:
        raise ConfigError(f"input.pair_field = '{spec.pair_field}' needs input.pairs = true")
    names = [spec.field, spec.pair_field, spec.id_field]
    given = [n for n in names if n]
    if len(set(given)) != len(given):
        raise ConfigError(f"input.field, input.pair_field and input.id_field name the same"
                          f" field ({', '.join(repr(n) for n in given)}): give distinct fields")


def _check_text_like(head: bytes, where: str, packed: str) -> None:
    """InputError when the first bytes are binary data rather than text: at least 16 of
    them (and over 2%) control bytes (C0 but tab, line ends, \\x0b, \\x0c, escape), which
    text in any 8-bit encoding or UTF-8 hardly holds. Text in another encoding (bytes that
    are not UTF-8, no control bytes) passes here: its first bad line is named later."""
    sample = head[:SNIFF]
    controls = len(sample) - len(sample.translate(None, _CONTROLS))
    if controls < 16 or controls <= 0.02 * len(sample):
        return
    nuls = sample.count(0)
    if nuls >= 0.25 * len(sample):
        halves = sample[0::2].count(0), sample[1::2].count(0)
        if max(halves) >= 0.9 * nuls:
            raise InputError(f"{where}: looks like UTF-16 text{packed} (every other byte is"
                             " NUL): convert it: iconv -f UTF-16 -t UTF-8 FILE > corpus.txt")
    raise InputError(f"{where}: binary data{packed}, not text ({controls} of its first"
                     f" {len(sample)} bytes are control bytes): give a UTF-8 text, JSON Lines"
                     f" or Parquet file (see {DOC})")


_CONTROLS = bytes([*range(0, 9), *range(14, 27), *range(28, 32)])


# --- byte streams ---------------------------------------------------------------------


def _decompressor_ready(compression: str, where: str) -> None:
    if compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise InputError(f"{where} is zstd-compressed and the zstandard module is not"
                             " installed: pip install 'mpiattn[corpus]', or decompress it"
                             " (zstd -d FILE)") from None


@contextmanager
def _binary(path: Path, compression: str) -> Iterator[IO[bytes]]:
    """The file's decompressed bytes as a buffered binary stream."""
    if compression == "gzip":
        import gzip

        with gzip.open(path, "rb") as fh:
            yield fh
    elif compression == "bzip2":
        import bz2

        with bz2.open(path, "rb") as fh:
            yield fh
    elif compression == "zstd":
        import zstandard

        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader, 1 << 16) as fh:  # type: ignore[arg-type]
                yield fh
    else:
        with open(path, "rb") as fh:
            yield fh


def _stream_errors() -> tuple[type[BaseException], ...]:
    import zlib

    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _peek(path: Path, compression: str, where: str) -> bytes:
    try:
        with _binary(path, compression) as fh:
            return fh.read(SNIFF)
    except _stream_errors() as err:
        raise _damaged(where, compression, 0, "line", err) from None


def _damaged(where: str, compression: str, after: int, unit: str,
             err: BaseException) -> InputError:
    test = {"gzip": "gzip -t", "bzip2": "bzip2 -t", "zstd": "zstd -t"}.get(compression)
    detail = " ".join(str(err).split())[:160] or type(err).__name__
    at = f" after {unit} {after}" if after else ""
    fix = f"check it with {test}" if test else "check the file"
    return InputError(f"{where}: the {compression} stream cannot be read{at} ({detail}): the"
                      f" file is truncated or damaged; {fix}")


LINE_BLOCK = 1 << 20  # bytes read at most at once while looking for a line end


def split_lines(fh: IO[bytes], block: int = LINE_BLOCK) -> Iterator[bytes]:
    """Lines of a binary stream without their line ends, as Python's text mode splits
    them (universal newlines: "\\n", "\\r\\n" and a lone "\\r" end a line; a final line
    end does not start another line). Read ``block`` bytes at a time: memory is a block
    plus the longest line, also for a file whose lines all end in a lone "\\r"."""
    carry = b""
    read = getattr(fh, "read1", fh.read)  # what is decoded so far: a damaged stream's
    while True:                           # lines before the damage are still yielded
        data = read(block)
        if not data:
            break
        if carry:
            data = carry + data
        held = data.endswith(b"\r")  # maybe the first half of a "\r\n": decided next time
        if held:
            data = data[:-1]
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        carry = lines.pop() + (b"\r" if held else b"")  # the unfinished last line
        yield from lines
    if carry:  # the last line, without a final line end (or with a lone "\r")
        yield carry[:-1] if carry.endswith(b"\r") else carry


def raw_lines(src: Source) -> Iterator[bytes]:
    """The file's lines as bytes without their line end (``split_lines``), a leading UTF-8
    BOM removed. "\\r" and "\\n" never occur inside a UTF-8 sequence, so the split is
    made on the bytes and each line is decoded on its own (with its own error)."""
    number = 0
    try:
        with _binary(src.path, src.compression) as fh:
            for number, raw in enumerate(split_lines(fh), start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    yield raw[3:]
                else:
                    yield raw
    except _stream_errors() as err:
        if src.compression == "none":
            raise InputError(f"{src.where}: cannot be read ({err})") from None
        raise _damaged(src.where, src.compression, number, "line", err) from None


# --- records --------------------------------------------------------------------------


def _decode(raw: bytes, number: int, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where} line {number}: not UTF-8 (byte {err.start} of the line):"
                         " convert the file with iconv") from None


def _storable(text: str, number: int, where: str, unit: str, what: str = "") -> None:
    """InputError for what an HDF5 string cannot hold: NUL, unpaired surrogates."""
    if "\0" in text:
        raise InputError(f"{where} {unit} {number}:{what} a NUL byte (position"
                         f" {text.index(chr(0))}): HDF5 strings cannot hold it; remove NULs"
                         + (" (tr -d '\\000')" if not what else ""))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{where} {unit} {number}:{what} an unpaired surrogate"
                         f" (\\u{ord(text[err.start]):04x} at position {err.start}): not text"
                         " UTF-8 can hold; fix the escape in the file") from None


def text_item(raw: bytes, number: int, pairs: bool, where: str) -> Item:
    """One plain-text line as its item (stripped; (first, second) with ``pairs``)."""
    line = _decode(raw, number, where)
    if b"\0" in raw:  # strict UTF-8 holds no surrogates: NUL is all HDF5 cannot store
        _storable(line, number, where, "line")
    if not pairs:
        return line.strip()
    columns = line.split("\t")
    if len(columns) != 2:
        raise InputError(f"{where} line {number}: {len(columns)} tab-separated column"
                         f"{'s' if len(columns) != 1 else ''}; input.pairs = true needs two"
                         " (first sentence, TAB, second sentence)")
    return columns[0].strip(), columns[1].strip()


_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
          int: "an integer", float: "a number", type(None): "null"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


class IdKind:
    """The kind of the ids ("int" or "str"), fixed by the first record; later records
    must match it (an HDF5 dataset has one type)."""

    def __init__(self, src: Source) -> None:
        self.src, self.kind, self.first = src, "", 0

    def check(self, value: Any, number: int, present: bool = True) -> RecordId:
        src, name = self.src, self.src.spec.id_field
        at = f"{src.where} {src.unit} {number}"
        if not present:
            raise InputError(f"{at}: no id field '{name}' (input.id_field)")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise InputError(f"{at}: id field '{name}' is {_kind(value)}, not a string or an"
                             " integer")
        kind = "int" if isinstance(value, int) else "str"
        if kind == "int" and not -INT64 <= value < INT64:
            raise InputError(f"{at}: id {value} does not fit 64 bits: store ids as strings")
        if kind == "str":
            _storable(value, number, src.where, src.unit, f" id field '{name}' holds")
        if not self.kind:
            self.kind, self.first = kind, number
        elif kind != self.kind:
            words = {"int": "an integer", "str": "a string"}
            raise InputError(f"{at}: id field '{name}' is {words[kind]} but {src.unit}"
                             f" {self.first}'s is {words[self.kind]}: ids must be all strings"
                             " or all integers")
        return value


def _text_field(record: dict, name: str, number: int, src: Source,
                key: str = "input.field") -> str:
    at = f"{src.where} {src.unit} {number}"
    if name not in record:
        keys = list(record)[:6]
        have = ", ".join(repr(k) for k in keys) + (", ..." if len(record) > 6 else "")
        raise InputError(f"{at}: no field '{name}' (it has {have or 'no fields'}): set"
                         f" {key} to the field that holds the text")
    value = record[name]
    if not isinstance(value, str):
        raise InputError(f"{at}: field '{name}' is {_kind(value)}, not a string")
    _storable(value, number, src.where, src.unit, f" field '{name}' holds")
    return value.strip()


def jsonl_record(raw: bytes, number: int, src: Source, ids: IdKind
                 ) -> tuple[Item, RecordId]:
    """One JSON Lines line as (item, id)."""
    at = f"{src.where} line {number}"
    line = _decode(raw, number, src.where)
    if not line.strip():
        raise InputError(f"{at}: blank: JSON Lines holds one JSON object per line; remove"
                         " blank lines (grep -v '^[[:space:]]*$')")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        message = err.msg.removesuffix(" at")  # ("Invalid control character at")
        raise InputError(f"{at}: not JSON ({message} at column {err.colno})") from None
    except (RecursionError, ValueError) as err:  # nested too deeply; an integer too long
        detail = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:80]
        raise InputError(f"{at}: not JSON this reader takes ({detail})") from None
    if not isinstance(record, dict):
        raise InputError(f"{at}: {_kind(record)}, not a JSON object: JSON Lines needs one"
                         f" object per line, e.g. {{\"{src.spec.field}\": \"...\"}}")
    spec = src.spec
    text = _text_field(record, spec.field, number, src)
    item: Item = (text, _text_field(record, spec.pair_field, number, src, "input.pair_field")
                  ) if spec.pairs else text
    rid = (ids.check(record.get(spec.id_field), number, spec.id_field in record)
           if spec.id_field else None)
    return item, rid


def _parquet_file(src: Source) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{src.where} is Parquet and pyarrow is not installed: pip install"
                         " 'mpiattn[corpus]', or write the corpus as JSON Lines") from None
    try:
        return pq.ParquetFile(src.path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... on a bad file
        detail = " ".join(str(err).split())[:200]
        raise InputError(f"{src.where}: not a readable Parquet file ({detail})") from None


def _parquet_columns(src: Source, pf: Any) -> list[str]:
    import pyarrow as pa

    schema = pf.schema_arrow
    spec = src.spec
    wanted = [spec.field] + ([spec.pair_field] if spec.pairs else [])
    for name in wanted + ([spec.id_field] if spec.id_field else []):
        if name not in schema.names:
            have = ", ".join(repr(n) for n in schema.names[:8])
            key = ("input.id_field" if name == spec.id_field else
                   "input.pair_field" if name == spec.pair_field else "input.field")
            raise InputError(f"{src.where}: no column '{name}' (it has {have}): set {key} to"
                             " the column to read")
        kind = schema.field(name).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if name == spec.id_field:
            if not (text or pa.types.is_integer(kind)):
                raise InputError(f"{src.where}: id column '{name}' is {kind}, not strings or"
                                 " integers")
            if pa.types.is_uint64(kind):
                continue  # checked per value (>= 2**63 does not fit)
        elif not text:
            raise InputError(f"{src.where}: column '{name}' is {kind}, not a string column")
    return wanted + ([spec.id_field] if spec.id_field else [])


def parquet_records(src: Source, start: int = 0) -> Iterator[tuple[int, Item, RecordId]]:
    """(row number, item, id) of a Parquet file, one row group at a time (converted to
    Python in batches of 8192 rows); rows before ``start`` (0-based) are skipped, whole row
    groups without being read. A row group that cannot be read is named with its rows."""
    pf = _parquet_file(src)
    columns = _parquet_columns(src, pf)
    meta = pf.metadata
    groups, skipped = [], 0
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        if not groups and skipped + rows <= start:  # leading groups only
            skipped += rows
        else:
            groups.append(g)
    ids = IdKind(src)
    number = size = skipped
    group_first, group_rows = skipped, 0  # the row group being read (first row 0-based)
    try:
        for g in groups:
            group_first, group_rows = number, meta.row_group(g).num_rows
            table = pf.read_row_group(g, columns=columns)  # memory: one row group
            for batch in table.to_batches(max_chunksize=8192):
                size = batch.num_rows
                values = [batch.column(i).to_pylist() for i in range(len(columns))]
                for k in range(size):
                    number += 1
                    if number > start:
                        yield number, *_parquet_row(src, columns, values, k, number, ids)
            del table
    except UnicodeDecodeError as err:  # a whole batch is decoded at once
        raise InputError(f"{src.where} rows {number + 1}-{number + size}: a string that is"
                         f" not UTF-8 ({err.reason})") from None
    except (OSError, ValueError) as err:  # pyarrow: ArrowIOError, ArrowInvalid (damage)
        detail = " ".join(str(err).split())[:200]
        raise InputError(f"{src.where}: rows {group_first + 1}-{group_first + group_rows} (a"
                         f" row group) cannot be read ({detail}): the file is truncated or"
                         " damaged") from None


def _parquet_row(src: Source, columns: list[str], values: list[list], k: int, number: int,
                 ids: IdKind) -> tuple[Item, RecordId]:
    """Row ``k`` of a batch's columns (``values``) as (item, id), checked."""
    spec = src.spec
    at = f"{src.where} row {number}"
    texts = []
    for name, column in zip(columns[:2 if spec.pairs else 1], values, strict=False):
        value = column[k]
        if value is None:
            raise InputError(f"{at}: column '{name}' is null (missing text)")
        _storable(value, number, src.where, "row", f" column '{name}' holds")
        texts.append(value.strip())
    rid = None
    if spec.id_field:
        value = values[-1][k]
        if value is None:
            raise InputError(f"{at}: id column '{spec.id_field}' is null")
        rid = ids.check(value, number)
    return ((texts[0], texts[1]) if spec.pairs else texts[0]), rid


def records(src: Source, start: int = 0) -> Iterator[tuple[int, Item, RecordId]]:
    """(1-based number, item, id or None) for every record from index ``start`` (0-based)
    on. Records before ``start`` are read but not checked (text, JSON Lines) or skipped
    by row group (Parquet). Raises InputError naming the file and the record."""
    if src.format == "parquet":
        yield from parquet_records(src, start)
        return
    if src.format == "text" and not src.spec.pairs:  # the common case, inlined
        for number, raw in enumerate(raw_lines(src), start=1):
            if number > start:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = "\0"
                if "\0" in line:  # not UTF-8, or a NUL: the message
                    text_item(raw, number, False, src.where)
                yield number, line.strip(), None
        return
    ids = IdKind(src)
    jsonl = src.format == "jsonl"
    for number, raw in enumerate(raw_lines(src), start=1):
        if number <= start:
            continue
        if jsonl:
            item, rid = jsonl_record(raw, number, src, ids)
            yield number, item, rid
        else:
            yield number, text_item(raw, number, src.spec.pairs, src.where), None

