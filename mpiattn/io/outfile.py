"""Output files: validated names, exclusive temporaries, publishing that never clobbers.

    out = Reservation.make("run.h5", force=False)   # before any work: all checks
    out.write(image)                                # an exclusive temporary, then the bytes
    out.publish()                                   # fsync, then rename without replacing

A job reserves its output before it computes anything: the name is checked (UTF-8, not
too long for the folder, not a directory, the folder writable, a temporary can be made).
When the result is ready, a temporary is created beside the final name with
``O_CREAT | O_EXCL`` under an unpredictable name (``mkstemp``), so a link
planted at a guessable name is never followed and two jobs never share a temporary.
Publishing renames the temporary onto the final name with ``renameat2(RENAME_NOREPLACE)``
(or ``link`` + ``unlink`` where the file system lacks it): when two jobs race for one
name, one wins and the other is told, instead of both reporting success. ``--force``
replaces atomically (``rename``).

A temporary's name carries its writer's host and PID (``.NAME.HOST-PID-RANDOM.tmp``); a
later job on the same host calls it stale only when that process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import socket
import stat
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SUFFIX = ".tmp"
_LIVE: set[Path] = set()  # temporaries this process made and has not yet published or removed


def discard_all() -> None:
    """Remove every live temporary of this process (a signal or a timeout ends it)."""
    for tmp in list(_LIVE):
        with contextlib.suppress(OSError):
            tmp.unlink()
        _LIVE.discard(tmp)
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputExists(UserError):
    """The final name was taken (by another job) before this one could publish."""


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]


def check_name(path: str | Path) -> None:
    """The output name is one we can record and create: UTF-8 without control characters,
    short enough, a file name (not a folder, not ``x/``), and nothing but a regular file
    (or a link) already there: a device, FIFO or socket is never replaced, even with
    ``--force``."""
    text = os.fspath(path)
    if not text:
        raise UserError("the output name is empty: give a file name with -o")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"output name {text!r} is not valid UTF-8: choose a plain name with -o"
                        ) from None
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise UserError(f"output name {text!r} holds control characters (newline, escape,"
                        " ...): choose a plain name with -o")
    path = Path(text)
    if not path.name or text.endswith(os.sep) or path.name in (".", ".."):
        raise UserError(f"output '{text}' names a folder: give a file name with -o")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"output folder '{folder}' does not exist: create it first")
    limit = _name_max(folder)
    if len(path.name.encode("utf-8")) > limit:
        raise UserError(f"output name '{path.name[:40]}...' is {len(path.name.encode())}"
                        f" bytes; this file system allows {limit}: choose a shorter -o")
    if path.is_dir():
        raise UserError(f"output '{path}' is a directory: give a file name with -o")
    _check_regular(path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder '{folder}' is not writable: choose another -o")


def _check_regular(path: Path) -> None:
    """Refuse a name taken by anything but a regular file or a symbolic link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise UserError(f"output '{path}' exists and is not a regular file (a device, FIFO or"
                        " socket): it is never replaced; choose a file name with -o")


def _prefix(path: Path) -> str:
    """``.NAME.HOST-PID-`` cut so that prefix + mkstemp's 8 random characters + ``.tmp``
    fits the file system's name limit (the final name may be as long as the limit)."""
    tail = f".{_host()}-{os.getpid()}-"
    room = _name_max(path.parent) - len(tail.encode()) - 8 - len(SUFFIX) - 1
    name = path.name.encode("utf-8")[: max(room, 1)].decode("utf-8", "ignore")
    return f".{name}{tail}"


@dataclass
class Reservation:
    """A final name checked for writing, and (while writing) the exclusive temporary that
    will become it. The temporary exists only from ``create`` to ``publish``/``discard``:
    a job that dies before it writes leaves nothing behind."""

    path: Path
    force: bool
    tmp: Path | None = None
    published: bool = False

    @classmethod
    def make(cls, path: str | Path, force: bool) -> Reservation:
        """Check ``path`` (and that a temporary can be created beside it); a one-line
        UserError otherwise. An existing ``path`` is refused unless ``force`` (checked
        again, atomically, when publishing)."""
        check_name(path)
        path = Path(path)
        if (path.exists() or path.is_symlink()) and not force:
            raise UserError(f"output '{path}' exists: pass --force to overwrite it, or -o NEW.h5")
        out = cls(path, force)
        out.create()
        out.discard()
        out.published = False
        return out

    def create(self) -> Path:
        """The exclusive temporary (made once): ``O_EXCL``, unpredictable name, the mode
        ``open`` would give."""
        if self.tmp is None:
            try:
                fd, tmp = tempfile.mkstemp(suffix=SUFFIX, prefix=_prefix(self.path),
                                           dir=self.path.parent)
            except OSError as err:
                raise UserError(f"cannot create a file in '{self.path.parent}':"
                                f" {os.strerror(err.errno or 0)}; choose another -o") from None
            try:
                os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            finally:
                os.close(fd)
            self.tmp = Path(tmp)
            _LIVE.add(self.tmp)
        return self.tmp

    def write(self, image: bytes | memoryview) -> None:
        """Put ``image`` in the temporary (never following a link planted in its place)."""
        fd = os.open(self.create(), os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        with os.fdopen(fd, "wb") as fh:
            fh.write(image)

    def publish(self, replace: bool | None = None) -> Path:
        """fsync the temporary and give it the final name; one line on failure, the
        temporary removed and an existing file untouched. ``replace`` defaults to force."""
        replace = self.force if replace is None else replace
        tmp = self.create()
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                _check_regular(self.path)  # what --force may replace, checked again now
                os.replace(tmp, self.path)
            else:
                rename_noreplace(tmp, self.path)
        except FileExistsError:
            self.discard()
            raise OutputExists(f"output '{self.path}' was created by someone else while this"
                               " job ran; its result is not written: pass --force or -o NEW.h5"
                               ) from None
        except OSError as err:
            self.discard()
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise UserError(f"cannot write '{self.path}': {reason}; earlier files are"
                            " untouched") from None
        _LIVE.discard(self.tmp)
        self.published, self.tmp = True, None
        fsync_folder(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Remove the temporary (idempotent; after publishing there is nothing to remove)."""
        if self.tmp is not None and not self.published:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()
        _LIVE.discard(self.tmp)
        self.tmp = None


def fsync_folder(folder: Path) -> None:
    """Make a rename durable; file systems that cannot fsync a folder are skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically (renameat2 RENAME_EXCHANGE): at every
    moment each name holds one of the two. False when this system or file system lacks
    it (nothing changed); OSError for any other failure."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _renameat2(src: Path, dst: Path, flags: int = _RENAME_NOREPLACE) -> bool:
    """renameat2 through glibc (RENAME_NOREPLACE unless ``flags``); False when this system
    or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists, atomically."""
    if _renameat2(src, dst):
        return
    os.link(src, dst)  # EEXIST when taken; atomic on POSIX file systems with hard links
    os.unlink(src)


def temporaries(path: str | Path) -> list[Path]:
    """Temporaries of ``path`` in its folder (any writer)."""
    path = Path(path)
    stem = path.name.encode("utf-8", "surrogateescape")[:16].decode("utf-8", "ignore")
    return sorted(p for p in path.parent.glob(f".{glob.escape(stem)}*{SUFFIX}") if p.is_file())


def is_stale(tmp: Path) -> bool:
    """True only when ``tmp``'s writer provably is gone: it ran on this host and its PID
    is no longer alive. Temporaries of other hosts, or of live processes, are not stale."""
    writer = tmp.name.removesuffix(SUFFIX).rsplit(".", 1)[-1].rsplit("-", 2)  # host, pid, rnd
    if len(writer) != 3 or writer[0] != _host() or not writer[1].isdigit():
        return False
    writer_pid = writer[1]
    try:
        os.kill(int(writer_pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def stale_note(path: str | Path) -> str | None:
    """A note about temporaries of ``path`` whose writers are gone, or None."""
    stale = [p for p in temporaries(path) if is_stale(p)]
    if not stale:
        return None
    return (f"mpiattn: note: {len(stale)} temporary file(s) of interrupted writes of"
            f" '{Path(path).name}' whose process is gone (safe to delete):"
            f" {', '.join(p.name for p in stale)}")
