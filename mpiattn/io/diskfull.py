"""Writes that fail on a full disk (or an exhausted quota): one line naming the path and
the reason, instead of h5py's traceback for every object it then cannot close.

    with quiet_h5() as seen, h5py.File(tmp, "w") as f:  # close-time errors kept, not printed
        try:
            ...write...
        except BaseException:
            give_back(tmp)            # room for the close: else HDF5 crashes at exit
            raise
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot write '{path}': {reason(err, seen)}")

After a write fails with ENOSPC inside HDF5, every h5py object closed afterwards reports
"Can't decrement id ref count (file write failed: ... errno = 28 ...)" twice, once
through ``sys.excepthook`` and once through ``sys.unraisablehook`` (a flood of tracebacks
for one full disk), and the exception that reaches the caller may name only a symptom
("Can't destroy cache"). ``quiet_h5`` keeps those texts so that ``reason`` can tell a
full disk from other failures.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import Any

FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _from_h5py(value: BaseException | None, where: Any, tb: Any = None) -> bool:
    if not isinstance(value, (RuntimeError, OSError)):
        return False
    if "h5py" in repr(where):
        return True
    while tb is not None:
        if "h5py" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def quiet_h5() -> Iterator[list[str]]:
    """While the block runs (and its objects are collected), h5py's errors on closing
    objects after a failed write are kept in the yielded list instead of printed; any
    other unraisable error or uncaught exception is reported as usual."""
    seen: list[str] = []
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def keep_unraisable(u: Any) -> None:
        if _from_h5py(u.exc_value, (u.object, u.err_msg), u.exc_traceback):
            seen.append(str(u.exc_value))
        else:
            unraisable(u)

    def keep_exception(kind: type, value: BaseException, tb: Any) -> None:
        if _from_h5py(value, None, tb):
            seen.append(str(value))
        else:
            excepthook(kind, value, tb)

    sys.unraisablehook, sys.excepthook = keep_unraisable, keep_exception
    try:
        yield seen
    finally:
        import gc

        gc.collect()  # objects of a failed file closed now, while the hooks are ours
        sys.unraisablehook, sys.excepthook = unraisable, excepthook


def is_full(err: BaseException, seen: list[str] | tuple = ()) -> bool:
    """Did ``err`` (or an error h5py reported while closing, ``seen``) come of a full
    disk or quota?"""
    return reason(err, seen) in FULL.values()


def reason(err: BaseException, seen: list[str] | tuple = ()) -> str:
    """Why a write failed, in a few words: "no space left on device" or "disk quota
    exceeded" when ``err`` or any text h5py reported (``seen``) says ENOSPC or EDQUOT
    (h5py: "errno = 28"), else ``err``'s own reason on one line."""
    code = getattr(err, "errno", None)
    if code in FULL:
        return FULL[code]
    texts = [str(err), *seen]
    for number, words in FULL.items():
        marks = (f"errno = {number},", f"os error {number})", os.strerror(number))
        if any(m in t for t in texts for m in marks):
            return words
    if code:
        return os.strerror(code)
    return " ".join(str(err).split())[:200]



def give_back(path: str | os.PathLike) -> None:
    """Inside an h5py ``with`` block whose write failed, before the file is closed: give
    the file's blocks back to the file system (truncate it; it is a temporary that is
    removed next).

    On a full disk the close itself fails too (each dataset's flush), and HDF5 then
    frees the file but keeps those datasets in its table of open objects; at exit the
    library closes them again and the process dies with SIGSEGV (``H5FO_top_decr``).
    With the blocks given back, the close's few metadata writes land (sparsely) and
    every object goes cleanly."""
    with contextlib.suppress(OSError):
        os.truncate(path, 0)
