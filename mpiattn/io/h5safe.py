"""Reading an HDF5 file someone handed you: only what is inside it, in bounded memory.

HDF5 can make a file show bytes that live elsewhere (external storage, external links,
virtual datasets) and can declare datasets far larger than the file (unallocated or
compressed). ``open_for_reading`` walks every object when it opens a file and refuses
the first kind, groups nested past ``MAX_DEPTH``, plugin filters, implausible declared
sizes, compound types HDF5 would convert past their end, and damaged string heaps HDF5
would loop on forever;
``read``, ``blocks`` and ``attr`` check sizes again before allocating anything; ``scan``
digests a dataset block by block; ``text`` turns attribute values into ``str`` or a
one-line ``InputError``. Everything raised is an ``InputError`` naming the object, or one
of ``MALFORMED`` (what h5py and NumPy raise on a damaged file) for the caller to turn into
one line. Needs h5py and NumPy only (no MPI).

The size rule (``allowed_bytes``): a dataset may declare at most
``FLOOR_BYTES + EXPANSION * stored`` bytes, where ``stored`` is what HDF5 reports as its
storage in this file (capped at the file's size). ``EXPANSION`` = 2048 is twice deflate's
maximum ratio (~1032:1), so any gzip/lzf-compressed array passes; an unallocated dataset
(stored = 0) may declare only the 16 MiB floor, so one declaring gigabytes is refused.
Variable-length data (strings) lives in the file's heap: its decoded size may not exceed
``FLOOR_BYTES`` + the file's size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import InputError

FLOOR_BYTES = 16 * 2**20  # what any dataset may declare, stored or not
EXPANSION = 2048  # declared bytes per stored byte (gzip: at most ~1032)
BLOCK_BYTES = 8 * 2**20  # one piece of a streamed dataset
MAX_ATTR_BYTES = 2**20  # one attribute value (the `config` TOML is a few KiB)
MAX_VLEN_ITEMS = 64  # elements of a string array attribute (each read before its size is
# known, each at most the file's size: 64 x the file at worst; mpiattn writes <= 6)
MAX_OBJECTS = 65536  # groups + datasets + named types in one file
MAX_DEPTH = 32  # groups nested in groups (mpiattn writes at most 3: /layers/NN/name)
BUILTIN_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit",
                   6: "scaleoffset", 32000: "lzf"}

# What h5py and NumPy raise on a damaged or hostile file: callers turn these into one line.
MALFORMED = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError,
             ArithmeticError, MemoryError)

NOT_OURS = "the file is damaged or was not written by mpiattn"


class Scan(NamedTuple):
    """What ``scan`` found in one streamed pass over a dataset."""

    sha256: str | None  # hex digest of the C-order bytes (None when not asked for)
    first_nonfinite: tuple[int, ...] | None  # index of the first NaN/inf (None: all finite)


def one_line(err: BaseException) -> str:
    """An exception's message on one line (HDF5's messages can span several)."""
    return " ".join(str(err).split()) or type(err).__name__


# --- opening --------------------------------------------------------------------------

def open_for_reading(path: str | Path, locking: bool | None = None) -> Any:
    """The file at ``path``, opened read-only, after checking every object in it.

    Returns an ``h5py.File`` (a context manager). Raises ``InputError`` (one line, naming
    the file and the object) when the file is missing, not HDF5, or holds anything whose
    bytes are outside it: an external or soft link, a dataset with external storage, a
    virtual dataset; also a dataset using a plugin filter, with a type ``check_type``
    refuses or declaring more bytes than the size rule allows (module docstring), a damaged
    string heap (``check_heaps``), and a file with more than ``MAX_OBJECTS`` objects.
    Cost: about 0.1-0.3 ms an object (the walk opens each object header once).
    ``locking``: HDF5's file locking for this open (None: HDF5's default; False where the
    file system has no locks, see ``corpusfile``).
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"'{path}' does not exist")
    if not path.is_file():
        raise InputError(f"'{path}' is not a regular file: give the path of an HDF5 file")
    try:
        f = h5py.File(path, "r", **({} if locking is None else {"locking": locking}))
    except MALFORMED as err:
        raise InputError(f"'{path}' is not a readable HDF5 file ({one_line(err)})") from None
    try:
        raw_extents: list[tuple[int, int]] = []
        check_contents(f, raw_extents)
        check_heaps(path, raw_extents, f.id.get_create_plist().get_sizes()[1])
    except InputError as err:
        f.close()
        raise InputError(f"'{path}': {err}") from None
    except MALFORMED as err:
        f.close()
        raise InputError(f"'{path}': cannot list its objects ({one_line(err)}): {NOT_OURS}"
                         ) from None
    return f


def check_contents(f: Any, raw_extents: list[tuple[int, int]] | None = None) -> int:
    """Walk every link below the root of open file ``f`` (each object once, so hard-link
    cycles end) and check it as ``open_for_reading`` describes; the number of objects.
    When ``raw_extents`` is given, the (start, end) file offsets of every dataset's stored
    array bytes are appended to it (for ``check_heaps``).

    Uses h5py's low-level ids (about 30 µs an object). Raises ``InputError`` naming the
    first offending object (without the file's path).
    """
    import h5py

    file_bytes = int(f.id.get_filesize())
    seen: set[tuple[int, int]] = {_identity(f.id)}
    todo: list[tuple[str, Any, int]] = [("", f.id, 0)]
    while todo:
        prefix, gid, depth = todo.pop()
        if depth > MAX_DEPTH:  # every walk below (h5py's visititems too) is quadratic in it
            raise InputError(f"groups nested more than {MAX_DEPTH} deep ({prefix[:60]}...):"
                             f" {NOT_OURS}")
        for raw in gid:
            where = f"{prefix}/{raw.decode('utf-8', 'replace')}"
            _check_link(gid, raw, where)
            oid = h5py.h5o.open(gid, raw)
            key = _identity(oid)
            if key in seen:
                continue
            seen.add(key)
            if len(seen) > MAX_OBJECTS:
                raise InputError(f"more than {MAX_OBJECTS} objects: {NOT_OURS}")
            if isinstance(oid, h5py.h5g.GroupID):
                todo.append((where, oid, depth + 1))
            elif isinstance(oid, h5py.h5d.DatasetID):
                _check_dataset(oid, f"dataset {where}", file_bytes)
                if raw_extents is not None:
                    raw_extents.extend(_raw_extents(oid))
    return len(seen)


def _raw_extents(did: Any) -> list[tuple[int, int]]:
    """(start, end) file offsets of a dataset's stored array bytes (contiguous or chunks;
    none for compact or unallocated data, which live in or need no file space)."""
    import h5py

    layout = did.get_create_plist().get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = did.get_offset()
        return [] if offset is None else [(offset, offset + int(did.get_storage_size()))]
    if layout != h5py.h5d.CHUNKED:
        return []
    found: list[Any] = []
    try:  # one pass over the chunk index (h5py >= 3.8 with HDF5 >= 1.14)
        did.chunk_iter(found.append)
    except (AttributeError, NotImplementedError):  # by index: a pass per chunk
        found = [did.get_chunk_info(i) for i in range(did.get_num_chunks())]
    return [(c.byte_offset, c.byte_offset + c.size) for c in found if c.byte_offset is not None]


def check_heaps(path: str | Path, raw_extents: list[tuple[int, int]],
                sizeof_size: int = 8) -> int:
    """Refuse (``InputError``) a damaged HDF5 global heap before HDF5 reads it.

    Variable-length strings (every text attribute) live in global heap collections
    ("GCOL"). HDF5 (2.0 included) loops forever on a collection whose free-space record
    (index 0) has size 0, e.g. after one flipped byte in an earlier record's size, and no
    signal stops it. This finds each collection outside ``raw_extents`` (the datasets'
    array bytes, from ``check_contents``) by its signature and walks its records as HDF5
    does. ``sizeof_size``: the file's "size of lengths" (8 in every file h5py writes).
    Returns the number of collections checked. A collection hidden inside a dataset's array
    bytes (only a deliberately crafted file does that) is not found.
    """
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        found = 0
        for start, end in _gaps(raw_extents, len(mm)):
            at = mm.find(HEAP_SIGNATURE, start, end)
            while at >= 0:
                _check_heap(mm, at, sizeof_size)
                found += 1
                at = mm.find(HEAP_SIGNATURE, at + 1, end)
    return found


HEAP_SIGNATURE = b"GCOL\x01\x00\x00\x00"  # signature, version 1, three reserved bytes


def _gaps(extents: list[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    """The parts of ``[0, size)`` outside every extent."""
    at = 0
    for start, end in sorted(extents):
        if start > at:
            yield at, min(start, size)
        at = max(at, end)
    if at < size:
        yield at, size


def _check_heap(mm: Any, at: int, sizeof_size: int) -> None:
    """Walk the records of the collection at byte ``at`` as HDF5's deserializer does;
    refuse one where HDF5 would not advance (free space of size 0) or would wrap around."""
    header = 8 + sizeof_size
    size = int.from_bytes(mm[at + 8 : at + header], "little")
    end = at + size
    if size < header or end > len(mm):
        return  # HDF5 fails to load it with an error: no loop
    record = 8 + sizeof_size
    pos = at + header
    while pos < end:
        if pos + record > end:
            return  # a too-small tail is free space
        index = int.from_bytes(mm[pos : pos + 2], "little")
        length = int.from_bytes(mm[pos + 8 : pos + record], "little")
        if length >= 2**62 or (index == 0 and length == 0):
            raise InputError(f"the global heap at byte {at} is damaged (record at byte {pos}"
                             f" has index {index}, size {length}): HDF5 would loop forever"
                             f" reading its strings; {NOT_OURS}")
        pos += length if index == 0 else record + (length + 7) // 8 * 8


def _identity(oid: Any) -> tuple[int, int]:
    """(file number, object address): the same for every hard link to one object."""
    import h5py

    info = h5py.h5o.get_info(oid)
    return int(info.fileno), int(info.addr)


def _check_link(gid: Any, raw: bytes, where: str) -> None:
    """Refuse any link but a hard one: link ``raw`` of group id ``gid``, at path ``where``."""
    import h5py

    kind = gid.links.get_info(raw).type
    if kind == h5py.h5l.TYPE_HARD:
        return
    if kind == h5py.h5l.TYPE_EXTERNAL:
        filename, target = (v.decode("utf-8", "replace") for v in gid.links.get_val(raw))
        raise InputError(f"{where} is an external link to '{filename}':{target}: mpiattn"
                         " reads only what is inside the file; copy the data in (h5copy)"
                         " and pass the self-contained file")
    if kind == h5py.h5l.TYPE_SOFT:
        target = gid.links.get_val(raw).decode("utf-8", "replace")
        raise InputError(f"{where} is a soft link to {target}: mpiattn files hold no links;"
                         f" {NOT_OURS}")
    raise InputError(f"{where} is a user-defined link: {NOT_OURS}")


def check_dataset(dset: Any) -> None:
    """Refuse a dataset whose bytes are not (all) inside its file, that needs a plugin
    filter, whose type ``check_type`` refuses, or that declares more bytes than
    ``allowed_bytes``. Raises ``InputError``."""
    _check_dataset(dset.id, f"dataset {dset.name}", _file_bytes(dset))


def _check_dataset(did: Any, where: str, file_bytes: int) -> None:
    import h5py

    plist = did.get_create_plist()
    if plist.get_external_count() > 0:
        name = plist.get_external(0)[0].decode("utf-8", "replace")
        raise InputError(f"{where} keeps its bytes in another file ('{name}', HDF5 external"
                         " storage): mpiattn reads only what is inside the file; rewrite it"
                         " with h5repack or pass a self-contained file")
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise InputError(f"{where} is a virtual dataset (its bytes are in other files):"
                         " mpiattn reads only what is inside the file; rewrite it with"
                         " h5repack or pass a self-contained file")
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in BUILTIN_FILTERS:
            raise InputError(f"{where} needs HDF5 filter {code}, a plugin: mpiattn reads only"
                             f" the built-in filters"
                             f" ({', '.join(sorted(BUILTIN_FILTERS.values()))})")
    check_type(did, where)
    _check_declared(did, where, file_bytes)


def _check_declared(did: Any, where: str, file_bytes: int) -> None:
    declared, stored = _declared(did), _stored(did, file_bytes)
    allowed = FLOOR_BYTES + EXPANSION * stored
    if declared > allowed:
        raise InputError(f"{where} declares shape {did.shape} ({declared} bytes) but stores"
                         f" {stored} bytes in the file (at most {allowed} can be real):"
                         f" {NOT_OURS}")


def check_type(oid: Any, where: str) -> None:
    """Refuse (``InputError``) a dataset or attribute (``oid``: its h5py low-level id) whose
    HDF5 type has no NumPy equivalent, or is a compound whose members overlap or reach
    past its size: HDF5 converting such a type into memory can corrupt the heap."""
    try:
        dtype = oid.dtype
    except (TypeError, ValueError) as err:
        raise InputError(f"{where} has an HDF5 type mpiattn cannot read ({one_line(err)}):"
                         f" {NOT_OURS}") from None
    _check_members(dtype, where)


def _check_members(dtype: np.dtype, where: str) -> None:
    if dtype.subdtype is not None:
        _check_members(dtype.subdtype[0], where)
        return
    if dtype.fields is None:
        return
    end = 0
    for name, (member, offset, *_) in sorted(dtype.fields.items(), key=lambda kv: kv[1][1]):
        if offset < end or offset + member.itemsize > dtype.itemsize:
            raise InputError(f"{where} has a compound type whose member '{name}' overlaps"
                             f" another or its end: {NOT_OURS}")
        _check_members(member, where)
        end = offset + member.itemsize


# --- sizes ----------------------------------------------------------------------------

def declared_bytes(dset: Any) -> int:
    """Bytes the dataset's shape and type declare (HDF5 type size; 0 for a null space)."""
    return _declared(dset.id)


def stored_bytes(dset: Any) -> int:
    """Bytes HDF5 says the dataset occupies in its file, capped at the file's size."""
    return _stored(dset.id, _file_bytes(dset))


def allowed_bytes(dset: Any) -> int:
    """The most a dataset may declare: ``FLOOR_BYTES + EXPANSION * stored_bytes``."""
    return FLOOR_BYTES + EXPANSION * stored_bytes(dset)


def _declared(did: Any) -> int:
    shape = did.shape
    return 0 if shape is None else math.prod(shape) * did.get_type().get_size()


def _stored(did: Any, file_bytes: int) -> int:
    return min(int(did.get_storage_size()), file_bytes)


def _file_bytes(obj: Any) -> int:
    return int(obj.file.id.get_filesize())


def _check_size(dset: Any, max_bytes: int | None) -> None:
    """Refuse (``InputError``) before a byte is read what ``check_dataset`` refuses, a
    declared size over ``max_bytes`` (the caller's own cap, None for none), and a null
    dataspace."""
    import h5py

    if not isinstance(dset, h5py.Dataset):
        raise InputError(f"{getattr(dset, 'name', '?')} is a {type(dset).__name__}, not a"
                         f" dataset: {NOT_OURS}")
    check_dataset(dset)
    declared = declared_bytes(dset)
    if max_bytes is not None and declared > max_bytes:
        raise InputError(f"dataset {dset.name} declares shape {dset.shape} ({declared} bytes),"
                         f" more than the {max_bytes} bytes read here: {NOT_OURS}")
    if dset.id.shape is None:
        raise InputError(f"dataset {dset.name} has no dataspace (HDF5 null): it holds no"
                         f" values; {NOT_OURS}")


# --- datasets ---------------------------------------------------------------------------

def read(dset: Any, max_bytes: int | None = None) -> np.ndarray:
    """The whole dataset as an array, after the size checks (``InputError`` when they fail).

    Fixed-size types: one allocation of the declared size. Variable-length types (strings):
    read in pieces, refused as soon as the decoded text exceeds ``FLOOR_BYTES`` + the
    file's size (or ``max_bytes``). Compound types with variable-length fields are refused.
    HDF5 errors (a corrupted chunk) propagate as h5py raises them (see ``MALFORMED``).
    """
    _check_size(dset, max_bytes)
    if not dset.dtype.hasobject:
        return np.asarray(dset[()])
    if dset.dtype.names is not None:
        raise InputError(f"dataset {dset.name} has variable-length fields in a compound"
                         f" type: {NOT_OURS}")
    return _read_vlen(dset, max_bytes)


def _read_vlen(dset: Any, max_bytes: int | None) -> np.ndarray:
    """Variable-length elements, at most ``limit / file size`` per piece (each element is
    at most the file's size), tallying the decoded bytes against ``limit``."""
    file_bytes = max(1, _file_bytes(dset))
    limit = FLOOR_BYTES + file_bytes if max_bytes is None else min(max_bytes,
                                                                   FLOOR_BYTES + file_bytes)
    out = np.empty(math.prod(dset.shape), dtype=object)
    done = total = 0
    for piece in _slabs(dset, max(1, limit // file_bytes)):
        flat = np.asarray(piece, dtype=object).ravel()
        total += sum(_vlen_size(v) for v in flat)
        if total > limit:
            raise InputError(f"dataset {dset.name} holds more than {limit} bytes of"
                             f" variable-length data: {NOT_OURS}")
        out[done : done + flat.size] = flat
        done += flat.size
    return out.reshape(dset.shape)


def _vlen_size(value: Any) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else len(value) if isinstance(
        value, (str, bytes)) else 8


def blocks(dset: Any, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """The dataset in consecutive C-order pieces of about ``block_bytes`` (whole rows of
    axis 0 when they fit, else pieces of one row, recursively): concatenating the pieces'
    bytes gives the whole array's bytes. Fixed-size types only; the size checks of
    ``read`` come first (``InputError``)."""
    _check_size(dset, None)
    if dset.dtype.hasobject:
        raise InputError(f"dataset {dset.name} holds variable-length data: it cannot be"
                         " streamed as bytes")
    yield from _slabs(dset, max(1, block_bytes // max(1, dset.dtype.itemsize)))


def _slabs(dset: Any, items: int) -> Iterator[np.ndarray]:
    """C-order consecutive pieces of at most ``items`` elements (at least one element)."""
    if not dset.shape:
        yield np.asarray(dset[()])
        return
    yield from _slabs_below(dset, (), tuple(dset.shape), items)


def _slabs_below(dset: Any, prefix: tuple[int, ...], shape: tuple[int, ...],
                 items: int) -> Iterator[np.ndarray]:
    inner = math.prod(shape[1:])
    if len(shape) == 1 or inner <= items:
        step = max(1, items // max(1, inner))
        for start in range(0, shape[0], step):
            yield dset[(*prefix, slice(start, min(start + step, shape[0])))]
        return
    for i in range(shape[0]):
        yield from _slabs_below(dset, (*prefix, i), shape[1:], items)


def scan(dset: Any, digest: bool = True, finite: bool = False) -> Scan:
    """One streamed pass: the SHA-256 of the C-order bytes (as ``h5io.sha256`` of the whole
    array) and, when ``finite`` and the type is floating/complex, the index of the first
    NaN or inf. Memory: one block. Raises as ``blocks`` does."""
    hasher = hashlib.sha256() if digest else None
    if _is_text(dset):  # strings: UTF-8 bytes of each, NUL-terminated (h5io.text_sha256)
        _check_size(dset, None)
        rows = max(1, BLOCK_BYTES // 256)
        for start in range(0, dset.shape[0] if dset.shape else 1, rows):
            for item in np.asarray(dset[start : start + rows] if dset.shape else
                                   [dset[()]]).ravel():
                if hasher is not None:
                    hasher.update(item if isinstance(item, bytes) else str(item).encode())
                    hasher.update(b"\0")
        return Scan(hasher.hexdigest() if hasher is not None else None, None)
    check = finite and dset.dtype.kind in "fc"
    first: int | None = None
    offset = 0
    for block in blocks(dset):
        block = np.ascontiguousarray(block)
        if hasher is not None:
            hasher.update(block.tobytes())
        if check and first is None:
            bad = ~np.isfinite(block).ravel()
            if bad.any():
                first = offset + int(np.argmax(bad))
                if hasher is None:
                    break  # nothing more to learn
        offset += block.size
    where = None if first is None else tuple(int(i) for i in np.unravel_index(first,
                                                                             dset.shape))
    return Scan(hasher.hexdigest() if hasher is not None else None, where)


def _is_text(dset: Any) -> bool:
    import h5py

    info = h5py.check_string_dtype(dset.dtype)
    return info is not None and info.length is None and dset.ndim <= 1


def datasets(f: Any) -> list[tuple[str, Any]]:
    """(name without the leading '/', dataset) for every dataset in ``f``, once each."""
    import h5py

    found: list[tuple[str, Any]] = []
    f.visititems(lambda name, obj: found.append((name, obj))
                 if isinstance(obj, h5py.Dataset) else None)
    return found


# --- attributes -------------------------------------------------------------------------

def attr(obj: Any, name: str, default: Any = None, max_bytes: int = MAX_ATTR_BYTES) -> Any:
    """Attribute ``name`` of ``obj`` (``default`` when absent), refused with an
    ``InputError`` when its declared size exceeds ``max_bytes``, when it is a
    variable-length array of more than ``MAX_VLEN_ITEMS`` elements, or when its decoded
    strings exceed ``max_bytes``."""
    if name not in obj.attrs:
        return default
    aid = obj.attrs.get_id(name)
    where = f"attribute '{name}' of {obj.name}"
    check_type(aid, where)
    count = math.prod(aid.shape) if aid.shape is not None else 0
    size = count * aid.get_type().get_size()
    if size > max_bytes:
        raise InputError(f"{where} holds {size} bytes, more than {max_bytes}: {NOT_OURS}")
    if aid.dtype.hasobject and count > MAX_VLEN_ITEMS:
        raise InputError(f"{where} holds {count} variable-length values, more than"
                         f" {MAX_VLEN_ITEMS}: {NOT_OURS}")
    value = obj.attrs[name]
    if aid.dtype.hasobject:
        flat = np.asarray(value, dtype=object).ravel()
        if sum(_vlen_size(v) for v in flat) > max_bytes:
            raise InputError(f"{where} holds more than {max_bytes} bytes: {NOT_OURS}")
    return value


def text(value: Any, where: str) -> str:
    """An attribute or string element as ``str``: ``str`` as is, ``bytes`` and NumPy
    string scalars decoded as UTF-8, 0-d and one-element arrays unwrapped.

    Strict, even for values only displayed: bytes that are not UTF-8 (or strings h5py
    decoded with surrogate escapes) and non-string values raise a one-line ``InputError``
    naming ``where`` (e.g. "attribute 'status' of /").
    """
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{where} is not UTF-8 text (byte 0x{value[err.start]:02x} at"
                             f" offset {err.start}): {NOT_OURS}") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"{where} is not UTF-8 text (undecodable byte at offset"
                             f" {err.start}): {NOT_OURS}") from None
        return str(value)
    raise InputError(f"{where} is {type(value).__name__} {short(value)}, not text: {NOT_OURS}")


def short(value: Any) -> str:
    """``repr(value)``, cut to at most 60 characters (for one-line messages)."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
