"""Opening an input file someone else may have made: regular files only, sizes bounded.

    data = safefile.read_bytes(path, "model.weights config.json", max_bytes=2**20)
    table = safefile.read_json(path, "sentence_bert_config.json")      # dict, or InputError
    with safefile.open_regular(path, "input.text") as fh: ...          # a binary file object
    digest = safefile.digest(path, "input.text")                       # SHA-256 hex

Opening a FIFO for reading blocks until a writer comes (forever, in a batch job), a
character device never ends, a folder is no file. Every open here is
``O_RDONLY | O_NONBLOCK`` (a FIFO opens at once instead of waiting), then ``fstat`` on the
open descriptor decides: anything but a regular file is a one-line ``InputError`` (so a
file swapped for a FIFO between a check and the open is caught too). Symbolic links are
followed (Hugging Face caches are links to blobs); what they point at is checked. JSON is
read only up to ``max_bytes`` and nested at most ``MAX_JSON_DEPTH`` deep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InputError

MAX_JSON_BYTES = 16 * 2**20  # a model folder's JSON (tokenizer.json of BERT: 0.7 MB)

_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def _open_fd(path: str | Path, what: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} '{path}' is a folder, not a file") from None
    except OSError as err:
        raise InputError(f"{what} '{path}' cannot be opened: {err.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = _KIND.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise InputError(f"{what} '{path}' is {kind}, not a regular file: it is never read"
                         " (it could block or never end); give a regular file")
    os.set_blocking(fd, True)
    return fd, st


def check_regular(path: str | Path, what: str) -> int:
    """InputError unless ``path`` opens as a regular file; its size in bytes."""
    fd, st = _open_fd(path, what)
    os.close(fd)
    return st.st_size


@contextlib.contextmanager
def open_regular(path: str | Path, what: str) -> Iterator[IO[bytes]]:
    """``path`` opened for reading as a binary file object, once it is known to be a
    regular file (module docstring); InputError otherwise."""
    fd, _ = _open_fd(path, what)
    with os.fdopen(fd, "rb") as fh:
        yield fh


def read_bytes(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of regular file ``path``; InputError when it is something else or holds
    more than ``max_bytes`` (checked before reading, and while reading: a file that grows
    is cut off, not followed)."""
    fd, st = _open_fd(path, what)
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > max_bytes:
            raise InputError(f"{what} '{path}' holds {st.st_size} bytes, more than"
                             f" {max_bytes}: not the small file expected")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"{what} '{path}' grew past {max_bytes} bytes while read")
    return data


def read_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON document in ``path`` (``read_bytes`` rules); InputError (one line) on
    anything else, a document nested past the parser's recursion limit included."""
    data = read_bytes(path, what, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError(f"{what} '{path}' is not valid JSON: {' '.join(str(err).split())}"
                         ) from None


def digest(path: str | Path, what: str) -> str:
    """SHA-256 (hex) of regular file ``path``'s bytes (1.5 GB/s with SHA-NI)."""
    with open_regular(path, what) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
