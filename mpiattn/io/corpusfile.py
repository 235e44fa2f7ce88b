"""The output of a streamed text run: finished chunks kept as parts, assembled at the end.

    parts = Parts.create(out.path, job_key)          # or Parts.find(...) to resume
    parts.write(index, ChunkResult(...))             # each chunk: its own file, published whole
    with h5io.atomic_disk_file(out) as f:            # at the end, on disk, never in memory
        assemble(f, parts, count, hidden, keep)      # appended chunk after chunk
    parts.remove()

Why parts: HDF5 gives no crash consistency to a file being appended to, so a job killed
mid-write (SIGKILL, a node lost) could leave a file no tool can open, and nothing to resume
from. Here every finished chunk is a small file published by rename into a private folder
(``.NAME.HOST-PID-RANDOM.parts``, made with ``mkdtemp``), and the final file is built
from them and published under its name only when complete. ``--resume`` finds the folder
of the same job (same resolved config and input digests: ``job_key``), skips the chunks it
holds and writes the rest; since a chunk's result depends only on its own lines, the
finished file equals an uninterrupted run's bit for bit. A running job holds an exclusive
``flock`` on its folder, so two jobs never share one.

A folder is bound to the job that made it: its ``job.json`` (0600) holds a random
``secret``, and the job holds the folder open by descriptor for its lifetime. Before a
part is published and before and after the final file is assembled, the folder under the
name must still be the one held (``st_dev``/``st_ino`` of the descriptor and of the path)
with the same secret; a folder swapped or renamed under the name is one line, exit 3
(``FolderSwapped``), nothing published. The final file records the folder's name, job
key and the SHA-256 of its secret (attribute ``parts``), so that a folder left behind by a
job stopped between publishing and removing it is recognised and removed by the next run
of the job (``remove_published``).

Layout of the finished file, by dimension (``line``: input lines, ``token``: real tokens
of all lines, ``line_edge``: lines + 1; row i of a ragged dataset is
``[offsets[i]:offsets[i+1]]``; the dimensions are attached by ``finish``):

    /input/text (line,) UTF-8 [/input/text_pair (line,) with input.pairs]
    [/input/id (line,) int64 or UTF-8 with input.id_field: each record's id]
    /input/tokens (token,) int64, /input/offsets (line_edge,) int64,
    /input/token_type_ids (token,) int64 (pairs only), /input/truncated (line,) uint8
    /output/pooled (line, hidden_unit): the folder's sentence-transformers modules
    (``core.pooling``; attrs ``modules``, ``modules_source``, ``prompt_name``, ``prompt``:
    a prompt's tokens are in /input/tokens, its text not in /input/text); its width may
    differ from the hidden size (several pooling modes, Dense layers)
    /layers/NN/attention|hidden (token, hidden_unit) when output.layers keeps layer NN
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UserError
from .diskfull import give_back, is_full, quiet_h5, reason
from .h5io import DIGEST_ATTR, LIBVER, attach_dimensions
from .h5io import text_sha256 as text_hash
from .outfile import _host, _name_max

SUFFIX = ".parts"
JOB_FILE = "job.json"
_PART = re.compile(r"chunk-(\d{7})\.h5")
KILL_ENV = "MPIATTN_TEST_KILL_AT"  # tests: SIGKILL this process at a named point


class FolderSwapped(UserError):
    """The parts folder under its name is no longer the one this job made or resumed
    (renamed, swapped, its job.json replaced): nothing is published (exit 3)."""

    exit_code = 3


def kill_point(name: str) -> None:
    """Tests: ``MPIATTN_TEST_KILL_AT=name`` ends this process here with SIGKILL (a node
    lost at that moment)."""
    if os.environ.get(KILL_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
_ROWS = re.compile(r"rows-(\d{7})-(\d{5})\.h5")


@dataclass
class ChunkResult:
    """One chunk's rows in line order (see the module docstring for the fields)."""

    first: int  # index of the chunk's first line
    text: list[str]
    text_pair: list[str] | None
    ids: list[np.ndarray]  # per line
    types: list[np.ndarray] | None  # per line (pairs only)
    truncated: np.ndarray  # (lines,) bool
    pooled: np.ndarray  # (lines, hidden)
    layers: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # (tokens, H)
    stats: dict[str, float] = field(default_factory=dict)  # per-chunk measurements
    record_ids: list[str] | list[int] | None = None  # per line, with input.id_field
    records_sha256: str = ""  # textstream.chunk_digest of the chunk's decoded records
    rows_sha256: list[str] | None = None  # pooled is None: each replica's rows file digest


def job_key(config_toml: str, digests: dict[str, str]) -> str:
    """The identity of a job for resuming: its resolved config and its inputs' digests
    (the command line and the output name are not part of it)."""
    inputs = {k: v for k, v in digests.items() if not k.startswith("the ")}
    blob = json.dumps({"config": config_toml, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _folders(out_path: Path) -> list[Path]:
    stem = out_path.name.encode("utf-8", "surrogateescape")[:16].decode("utf-8", "ignore")
    pattern = f".{glob.escape(stem)}*{SUFFIX}"  # a name may hold [ ] * ?
    return sorted(p for p in out_path.parent.glob(pattern) if p.is_dir())


def _read_job(folder: Path) -> dict:
    from .safefile import read_json

    try:  # a FIFO or a huge file planted as job.json is no job
        job = read_json(folder / JOB_FILE, "parts job file", 1 << 20)
    except UserError:
        return {}
    return job if isinstance(job, dict) else {}


def _private(folder: Path) -> str | None:
    """Why ``folder`` is not a parts folder only this user can change (a link, another
    user's, writable by group or others), or None. ``mkdtemp`` makes them 0700."""
    try:
        st = os.lstat(folder)
    except OSError as err:
        return f"cannot be read ({os.strerror(err.errno or 0)})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder (a link?)"
    if st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o077:
        return f"is open to group or others (mode {stat.S_IMODE(st.st_mode):o}, made 700)"
    return None


def reserve(path: str | Path, size: int, what: str) -> bool:
    """Reserve ``size`` bytes of disk for the open file ``path`` (``what``: its name for
    messages) (``fallocate`` with
    FALLOC_FL_KEEP_SIZE: its length stays, its blocks are allocated) so that the HDF5
    writes that follow find room: HDF5 does not survive a full disk (the library crashes
    in a later flush or at exit). UserError (one line, "no space") when the disk cannot
    hold ``size``; False where the file system cannot reserve (then the writes go on
    unreserved), True when reserved. The blocks past the file's end stay allocated after
    it is closed: ``disk_file`` gives them back (truncating to the file's own length)."""
    import ctypes

    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        try:
            fallocate = ctypes.CDLL(None, use_errno=True).fallocate64
        except (AttributeError, OSError):
            return False
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if fallocate(fd, 1, 0, size) == 0:  # 1: FALLOC_FL_KEEP_SIZE
            return True
        code = ctypes.get_errno()
    finally:
        os.close(fd)
    if code in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(f"cannot write {what}: {os.strerror(code).lower()} (it needs up to"
                        f" {size / 2**20:.1f} MiB in '{Path(path).parent}'); free some space"
                        " and run the same command with --resume (finished chunks are kept)")
    return False  # EOPNOTSUPP (NFS before 4.2, some FUSE), ...


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def check_space(folder: Path, need: int, what: str) -> None:
    """UserError (one line) when ``folder``'s file system has less than ``need`` bytes
    free: HDF5 fails untidily (or worse) on a full disk, so a write is not begun."""
    free = _free_bytes(folder)
    if free < need:
        raise UserError(f"no space for {what} in '{folder}': it needs about"
                        f" {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free some"
                        " space (finished chunks are kept for --resume)")


def _part_digest(arrays: list[np.ndarray], texts: list[list[str]]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    for strings in texts:
        text_hash(strings, h)
    return h.hexdigest()


def _part_contents(r: ChunkResult) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    arrays = {"lengths": np.array([len(a) for a in r.ids], dtype=np.int64),
              "tokens": _concat(r.ids, np.int64), "truncated": r.truncated.astype(np.uint8)}
    if r.pooled is not None:  # else the replicas' rows files hold it (rows_sha256)
        arrays["pooled"] = r.pooled
    if r.types is not None:
        arrays["token_type_ids"] = _concat(r.types, np.int64)
    for (layer, name), a in sorted(r.layers.items()):
        arrays[f"layers/{layer:02d}/{name}"] = a
    texts = [r.text] + ([r.text_pair] if r.text_pair is not None else [])
    if r.rows_sha256 is not None:
        texts.append(list(r.rows_sha256))  # the manifest is in the part's own digest
    if r.record_ids is not None:
        if all(isinstance(i, str) for i in r.record_ids):
            texts.append(list(r.record_ids))  # type: ignore[arg-type]
        else:
            arrays["record_id"] = np.array(r.record_ids, dtype=np.int64)
    return arrays, texts


@dataclass
class PartData:
    """One part read back and checked (``Parts.read``)."""

    first: int  # index of its first line
    arrays: dict[str, np.ndarray]  # lengths, tokens, truncated, pooled, ..., layers/NN/*
    texts: dict[str, list[str]]  # text (and text_pair; record_id when the ids are strings)
    records_sha256: str = ""  # the digest of the chunk's decoded records


class Parts:
    """A private folder of finished chunks (see the module docstring), made when the first
    chunk is written (a job that fails before leaves no folder)."""

    def __init__(self, out_path: Path, job: dict, folder: Path | None = None,
                 lock: int = -1) -> None:
        self.out_path, self.job, self.folder, self._lock = out_path, job, folder, lock
        self._dir = -1  # the folder held open (O_DIRECTORY) for the job's lifetime
        if folder is not None:
            self._hold(folder)

    def _hold(self, folder: Path) -> None:
        try:
            self._dir = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as err:
            raise UserError(f"cannot open the parts folder '{folder}':"
                            f" {os.strerror(err.errno or 0)}") from None

    def check_bound(self, before: str) -> None:
        """FolderSwapped (one line, exit 3) unless the folder under the name is still the
        one this job holds (same device and inode as the descriptor) with this job's
        secret in its job.json. ``before``: what is not done ("publishing chunk 3")."""
        if self.folder is None or self._dir < 0:
            return
        held = os.fstat(self._dir)
        try:
            now = os.lstat(self.folder)
            same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        except OSError:
            same = False
        why = None
        if not same:
            why = "another folder (or nothing) is under its name now: renamed or swapped"
        elif _read_job(self.folder).get("secret") != self.job.get("secret"):
            why = "its job.json no longer holds this job's secret: replaced"
        if why is not None:
            raise FolderSwapped(f"the parts folder '{self.folder}' is not the one this job"
                                f" made: {why}; stopped before {before}, nothing published"
                                " (is another job or user writing beside the output?)")

    def record(self) -> str:
        """What the final file records of its parts folder (attribute ``parts``): the
        folder's name, the job key and the SHA-256 of the folder's secret."""
        secret = str(self.job.get("secret", ""))
        return json.dumps({"folder": self.folder.name if self.folder else "",
                           "key": self.job.get("key", ""),
                           "secret_sha256": hashlib.sha256(secret.encode()).hexdigest()})

    @classmethod
    def new(cls, out_path: Path, key: str, layout: dict, lines: int, chunk: int) -> Parts:
        """Parts of a fresh job of ``lines`` lines in chunks of ``chunk`` on ``layout``
        (world size, tensor-parallel size): the folder comes with the first chunk."""
        return cls(out_path, {"key": key, "layout": layout, "lines": lines, "chunk": chunk,
                              "output": out_path.name})

    def _make_folder(self) -> Path:
        if self.folder is not None:
            return self.folder
        out_path = self.out_path
        tail = f".{_host()}-{os.getpid()}-"
        room = _name_max(out_path.parent) - len(tail) - 8 - len(SUFFIX) - 1
        name = out_path.name.encode("utf-8")[: max(room, 1)].decode("utf-8", "ignore")
        folder = None
        self.job["secret"] = secrets.token_hex(16)  # binds the folder to this job
        try:
            folder = Path(tempfile.mkdtemp(prefix=f".{name}{tail}", suffix=SUFFIX,
                                           dir=out_path.parent))
            fd = os.open(folder / JOB_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(self.job))
            self._hold(folder)
        except OSError as err:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise UserError(f"cannot create the parts folder in '{out_path.parent}':"
                            f" {os.strerror(err.errno or 0)}; free space or choose another -o"
                            ) from None
        try:
            self._lock = _lock(folder, resuming=False)
        except UserError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.folder = folder
        return folder

    @classmethod
    def find(cls, out_path: Path, key: str, layout: dict, where: str | None = None,
             records: tuple[str, ...] = ()) -> Parts:
        """The interrupted job's folder to resume: ``where`` itself, or (None) the one
        beside ``out_path`` whose job key is ``key``. UserError (exit 2) when there is none,
        it belongs to another job or rank layout, or a running job holds it. Damaged or
        unfinished parts are removed (they are computed again), and so are parts whose
        decoded records differ from ``records`` (the input's digest per chunk, when given)."""
        if where is not None:
            candidates = [Path(where)]
            if not (candidates[0] / JOB_FILE).is_file():
                raise UserError(f"--resume-from '{where}' is not the parts folder of an"
                                " interrupted run (it has no job.json)")
        else:
            candidates = [p for p in _folders(out_path) if _read_job(p).get("key") == key]
            if not candidates:
                others = len(_folders(out_path))
                raise UserError(f"--resume: no interrupted run of this job beside"
                                f" '{out_path}' (parts folders of other jobs or inputs:"
                                f" {others}); run without --resume to start afresh")
        candidates = [p for p in candidates if _private(p) is None] or candidates
        folder = max(candidates, key=lambda p: len(list(p.glob("chunk-*.h5"))))
        why = _private(folder)
        if why is not None:
            raise UserError(f"--resume: '{folder}' {why}: its parts are not trusted; run"
                            " without --resume to start afresh")
        job = _read_job(folder)
        if job.get("key") != key:
            raise UserError(f"--resume '{folder}' holds a run of another config or other inputs:"
                            " resume with the same config, inputs and model")
        if job.get("layout") != layout:
            was = job.get("layout") or {}
            raise UserError(f"--resume: '{folder}' was run on {was.get('world_size', '?')}"
                            f" ranks with parallel.tensor = {was.get('tensor', '?')}; resume it"
                            " on the same (its rows must equal an uninterrupted run's)")
        parts = cls(out_path, job, folder, _lock(folder, resuming=True))
        parts.check_bound("resuming")  # swapped between reading job.json and now
        for stale in folder.glob("*.tmp*"):  # a part the killed job was writing
            with contextlib.suppress(OSError):
                stale.unlink()
        parts.drop_damaged(records)
        return parts

    def done(self) -> int:
        """Chunks finished, counted from the first without a gap."""
        if self.folder is None or not self.folder.exists():
            return 0
        have = {int(m.group(1)) for p in self.folder.iterdir() if (m := _PART.fullmatch(p.name))}
        n = 0
        while n in have:
            n += 1
        return n

    def drop_damaged(self, records: tuple[str, ...] = ()) -> None:
        """Remove the first part whose contents do not match its digest (or whose records'
        digest is not ``records[index]``, when given), and every part after it: a part is
        whole or absent (``--resume`` computes them again)."""
        for index in range(self.done()):
            part = self.read(index)
            if part is None or (records and (index >= len(records)
                                             or part.records_sha256 != records[index])):
                for p in self.folder.glob("*.h5"):
                    m = _PART.fullmatch(p.name) or _ROWS.fullmatch(p.name)
                    if m and int(m.group(1)) >= index:
                        with contextlib.suppress(OSError):
                            p.unlink()
                return

    def read(self, index: int) -> PartData | None:
        """Part ``index`` as written (arrays in digest order, text columns), or None when
        it cannot be read back or does not match its digest."""
        import h5py

        from .h5safe import open_for_reading

        try:  # the safe reader: a regular file, nothing outside it, bounded declared sizes
            with open_for_reading(self.path(index), **_H5) as f:
                want = f.attrs["sha256"]
                names = ["lengths", "tokens", "truncated"] + (["pooled"] if "pooled" in f
                                                               else [])
                names += ["token_type_ids"] if "token_type_ids" in f else []
                layers: list[str] = []
                if "layers" in f:
                    f["layers"].visititems(lambda n, o: layers.append(f"layers/{n}")
                                           if isinstance(o, h5py.Dataset) else None)
                ids = f.get("record_id")
                string_ids = ids is not None and ids.dtype.kind == "O"
                tail = ["record_id"] if ids is not None and not string_ids else []
                arrays = {n: f[n][()] for n in names + sorted(layers) + tail}
                texts = {n: list(f[n].asstr()[()]) for n in ("text", "text_pair", "rows_sha256")
                         if n in f}
                if string_ids:
                    texts["record_id"] = list(ids.asstr()[()])
                first = int(f.attrs["first"])
                records = str(f.attrs.get("records_sha256", ""))
        except (UserError, OSError, KeyError, RuntimeError, ValueError, TypeError):
            return None
        if _part_digest(list(arrays.values()), list(texts.values())) != want:
            return None
        manifest = texts.pop("rows_sha256", None)
        if manifest is not None and not self._merge_rows(index, arrays, manifest):
            return None
        return PartData(first, arrays, texts, records)

    def rows_path(self, index: int, replica: int) -> Path:
        if self.folder is None:
            raise ValueError("no parts folder yet: nothing has been written")
        return self.folder / f"rows-{index:07d}-{replica:05d}.h5"

    def write_rows(self, index: int, replica: int, results: list) -> str:
        """One replica's rows of chunk ``index`` as its own file (``results``: (row
        indices, pooled rows, {(layer, name): states of those rows' tokens}) per
        micro-batch, in its order), published whole like a part; returns the SHA-256 of its
        contents, which rank 0's part lists (``rows_sha256``). UserError (one line) when it
        cannot be written."""
        rows = _concat([np.asarray(r, dtype=np.int64) for r, _, _ in results], np.int64)
        arrays: dict[str, np.ndarray] = {"rows": rows}
        if results:
            arrays["pooled"] = np.concatenate([p for _, p, _ in results])
            for key in sorted(results[0][2]):
                arrays[f"layers/{key[0]:02d}/{key[1]}"] = np.concatenate(
                    [st[key] for _, _, st in results])
        digest = _part_digest(list(arrays.values()), [])
        self._publish(self.rows_path(index, replica), f"chunk {index} (replica {replica})",
                      arrays, {"sha256": digest})
        return digest

    def _merge_rows(self, index: int, arrays: dict[str, np.ndarray],
                    manifest: list[str]) -> bool:
        """Each replica's rows file of chunk ``index`` checked against ``manifest`` (its
        digest) and put back in line order into ``arrays`` (pooled, layers/NN/*); False
        when one is missing, damaged or another replica's, or the rows do not cover every
        line exactly once."""
        from .h5safe import open_for_reading

        lengths = arrays["lengths"]
        n = len(lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        seen = np.zeros(n, dtype=np.int64)
        pooled = None
        layers: dict[str, np.ndarray] = {}
        for replica, want in enumerate(manifest):
            try:
                with open_for_reading(self.rows_path(index, replica), **_H5) as f:
                    names = ["rows"] + (["pooled"] if "pooled" in f else [])
                    found: list[str] = []
                    if "layers" in f:
                        f["layers"].visititems(lambda m, o, found=found: found.append(
                            f"layers/{m}") if hasattr(o, "shape") else None)
                    got = {k: f[k][()] for k in names + sorted(found)}
            except (UserError, OSError, KeyError, RuntimeError, ValueError, TypeError):
                return False
            if _part_digest(list(got.values()), []) != want:
                return False
            rows = got["rows"]
            if rows.size == 0:
                continue
            if rows.min() < 0 or rows.max() >= n:
                return False
            np.add.at(seen, rows, 1)
            if pooled is None:
                pooled = np.empty((n, got["pooled"].shape[1]), dtype=got["pooled"].dtype)
            pooled[rows] = got["pooled"]
            starts = np.concatenate([[0], np.cumsum(lengths[rows])])
            for name in found:
                a = got[name]
                dest = layers.setdefault(name, np.empty((int(offsets[-1]), a.shape[1]),
                                                        dtype=a.dtype))
                for k, row in enumerate(rows):
                    dest[offsets[row]:offsets[row + 1]] = a[starts[k]:starts[k + 1]]
        if pooled is None or (seen != 1).any():
            return False
        arrays["pooled"] = pooled
        for name in sorted(layers):
            arrays[name] = layers[name]
        return True

    def intact(self, index: int) -> bool:
        """Part ``index`` reads back and matches the digest it was written with."""
        return self.read(index) is not None

    def path(self, index: int) -> Path:
        if self.folder is None:
            raise ValueError("no parts folder yet: nothing has been written")
        return self.folder / f"chunk-{index:07d}.h5"

    def write(self, index: int, r: ChunkResult) -> None:
        """Chunk ``index`` as its own HDF5 file with the digest of its contents
        (``_publish``)."""
        self._make_folder()
        arrays, texts = _part_contents(r)
        strings = {"text": r.text}
        if r.text_pair is not None:
            strings["text_pair"] = r.text_pair
        if r.rows_sha256 is not None:
            strings["rows_sha256"] = list(r.rows_sha256)
        if r.record_ids is not None and "record_id" not in arrays:
            strings["record_id"] = list(r.record_ids)  # type: ignore[arg-type]
        attrs: dict[str, Any] = {"first": r.first}
        attrs.update({f"stat_{k}": v for k, v in r.stats.items()})
        attrs["records_sha256"] = r.records_sha256
        attrs["sha256"] = _part_digest(list(arrays.values()), texts)
        self._publish(self.path(index), f"chunk {index}", arrays, attrs, strings)

    def _publish(self, path: Path, what: str, arrays: dict[str, np.ndarray],
                 attrs: dict[str, Any], strings: dict[str, list[str]] | None = None) -> None:
        """``arrays`` (and string columns) as one HDF5 file at ``path`` in the folder,
        renamed into place only when whole, while the folder is still this job's
        (``check_bound``). UserError (one line) when it cannot be written: a nearly full
        disk is found before anything is written, a disk that fills meanwhile by the plain
        write of the finished image (built in memory, about the part's size: HDF5 itself
        never meets a full disk, which it does not survive)."""
        import io

        import h5py

        from . import outfile

        folder = self._make_folder()
        self.check_bound(f"writing {what}")
        strings = strings or {}
        need = sum(a.nbytes for a in arrays.values()) + sum(
            len(t.encode("utf-8")) + 16 for column in strings.values() for t in column)
        check_space(folder, need + (1 << 20), what)
        memory = io.BytesIO()  # closed before its bytes are taken: a whole, consistent file
        with h5py.File(memory, "w", libver=LIBVER) as f:
            f.attrs.update({k: v for k, v in attrs.items() if k != "sha256"})
            for name, column in strings.items():
                f[name] = np.array(column, dtype=h5py.string_dtype())
            for name, a in arrays.items():
                f[name] = a
            f.attrs["sha256"] = attrs["sha256"]
        tmp_path = None
        try:
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)
            tmp_path = Path(tmp)
            outfile._LIVE.add(tmp_path)  # removed if a signal ends the job now
            with os.fdopen(fd, "wb") as fh:
                fh.write(memory.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            self.check_bound(f"publishing {what}")
            os.replace(tmp_path, path)
            outfile.fsync_folder(folder)
        except OSError as err:
            hint = ("; free some space and run the same command with --resume (finished"
                    " chunks are kept)" if is_full(err) else "")
            raise UserError(f"cannot write {what} to '{folder}':"
                            f" {reason(err)}{hint}") from None
        finally:
            if tmp_path is not None:
                outfile._LIVE.discard(tmp_path)
                with contextlib.suppress(FileNotFoundError):
                    tmp_path.unlink()

    def read_stats(self) -> list[dict[str, float]]:
        """Each finished chunk's measurements (attributes ``stat_*``), in chunk order."""
        out = []
        for i in range(self.done()):
            with _h5(self.path(i), "r") as f:
                out.append({k.removeprefix("stat_"): float(v) for k, v in f.attrs.items()
                            if k.startswith("stat_")})
        return out

    def size(self) -> int:
        """Bytes of the finished parts and their rows files (what assembling them writes,
        about)."""
        done = self.done()
        rows = sum(p.stat().st_size for p in self.folder.glob("rows-*.h5")
                   if (m := _ROWS.fullmatch(p.name)) and int(m.group(1)) < done
                   ) if self.folder is not None and done else 0
        return rows + sum(self.path(i).stat().st_size for i in range(done))

    @classmethod
    def joined(cls, out_path: Path, folder: Path) -> Parts:
        """The folder rank 0 made (or resumes), seen by a replica leader that writes its
        rows files into it (``write_rows``); rank 0 alone locks, lists and removes it.
        Held open and bound to the job.json found now (``check_bound`` before each write)."""
        return cls(out_path, _read_job(folder), folder)

    def ready(self) -> Path:
        """The folder, made now if it is not yet (before the replicas write into it)."""
        return self._make_folder()

    def remove(self) -> None:
        """Delete the folder (after the final file is published, or when its chunks can
        never be used: another job published the output, or the input changed)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.release()

    def detach(self) -> None:
        """Forget the folder (after ``FolderSwapped``): what is under its name now is
        neither removed nor offered for --resume."""
        self.release()
        self.folder = None

    def release(self) -> None:
        for fd in (self._lock, self._dir):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock = self._dir = -1


def remove_published(out_path: Path, key: str | None = None) -> list[str]:
    """Remove the parts folder a job left beside ``out_path`` after publishing it (killed
    between the final rename and the removal): only a private folder whose job key
    (``key``; None: the key the output records), name and secret's digest the complete
    output records (attribute ``parts``) and that no running job holds. Returns a note per
    folder removed.

    Publish-then-remove, not the other way round: removing the parts before the rename
    would leave, after a kill in between, only an unnamed temporary that nothing resumes
    from, whereas a leftover folder costs disk space until the next run removes it."""
    from . import h5safe

    candidates = [p for p in _folders(out_path) if _private(p) is None]
    if not candidates or not out_path.is_file():
        return []
    try:
        with h5safe.open_for_reading(out_path) as f:
            if h5safe.attr(f, "status") != "complete":
                return []
            rec = json.loads(h5safe.text(h5safe.attr(f, "parts", ""), "attribute 'parts'"))
    except (UserError, ValueError, TypeError, *h5safe.MALFORMED):
        return []
    if not isinstance(rec, dict):
        return []
    key = rec.get("key") if key is None else key
    folders = [p for p in candidates if _read_job(p).get("key") == key]
    notes = []
    for folder in folders:
        secret = str(_read_job(folder).get("secret", ""))
        if not secret or rec.get("folder") != folder.name or rec.get("key") != key or \
                rec.get("secret_sha256") != hashlib.sha256(secret.encode()).hexdigest():
            continue
        try:
            fd = _lock(folder, resuming=True)  # a running job holds it: left alone
        except UserError:
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        notes.append(f"removed '{folder}': the parts of '{out_path}', left by a job of this"
                     " config stopped after it published the output (complete)")
    return notes


# flock errors that mean "this file system has no flock" (Lustre without -o flock: ENOSYS;
# NFS without lockd: ENOLCK; some FUSE and object stores: EOPNOTSUPP), not "someone holds it"
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_NOTED: set[str] = set()  # file systems already noted as lock-free (once a process)
_H5: dict[str, Any] = {}  # h5py.File keywords: {"locking": False} once no lock works here


def _h5(path: Path, mode: str) -> Any:
    """``h5py.File`` of a part or the final file (HDF5's own lock off where none works:
    HDF5 reads ``HDF5_USE_FILE_LOCKING`` once, and fails on ENOLCK even then)."""
    import h5py

    return h5py.File(path, mode, **({"libver": LIBVER} if mode != "r" else {}), **_H5)


def _lock(folder: Path, resuming: bool) -> int:
    """An exclusive lock on ``folder`` (its job.json) for this job's lifetime: the
    descriptor, to be closed by ``release``.

    The descriptor is opened read-write: on NFSv4, ``flock`` is emulated with POSIX locks
    and an exclusive one on a read-only descriptor fails (EBADF). Where ``flock`` is not
    available (``NO_FLOCK``) a POSIX record lock (``lockf``) is taken instead; where neither
    is, the job goes on unlocked with a note (rank 0, once). That is safe: a fresh job's
    folder has a new ``mkdtemp`` name no other job looks for, and two ``--resume`` of the
    same job at once compute the same bits and publish each chunk whole by rename; the
    lock only turns the second of them into a one-line refusal instead of wasted work.
    A lock held by another job is a ``UserError`` (one line).
    """
    try:
        fd = os.open(folder / JOB_FILE, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as err:
        raise UserError(f"cannot open '{folder / JOB_FILE}': {os.strerror(err.errno or 0)}"
                        " (a parts folder of another user, or a link in its place?)") from None
    for take in (fcntl.flock, fcntl.lockf):
        try:
            take(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as err:
            if err.errno in HELD:
                os.close(fd)
                raise UserError(f"--resume: '{folder}' is locked: another job is writing it"
                                " now (wait for it, or resume elsewhere with -o)" if resuming
                                else f"the new parts folder '{folder}' is locked by another"
                                " process: run again") from None
            if err.errno not in NO_FLOCK:
                os.close(fd)
                raise UserError(f"cannot lock the parts folder '{folder}':"
                                f" {os.strerror(err.errno or 0)}") from None
    where = str(folder.parent)
    _H5["locking"] = False  # HDF5's flock would fail the same way
    if where not in _NOTED:
        _NOTED.add(where)
        print(f"mpiattn: note: the file system of '{where}' has no file locks (flock and"
              " POSIX locks unavailable): the parts folder is used unlocked; do not run two"
              " --resume of one job at the same time", flush=True)
    return fd


def _concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


class _Appender:
    """A resizable dataset grown part by part, with the SHA-256 of its bytes in row order
    (equal to ``h5io.sha256`` of the whole array)."""

    def __init__(self, group: Any, name: str, tail: tuple[int, ...], dtype: Any,
                 dims: tuple[str, ...], compression: str, rows_hint: int) -> None:
        rows = max(1, min(rows_hint, max(1, 2**20 // max(1, int(np.prod(tail)) * 4))))
        opts: dict[str, Any] = {"chunks": (rows, *tail), "fletcher32": True}
        if compression != "none":
            opts.update(compression=compression, shuffle=True)
        self.dset = group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail),
                                         dtype=dtype, **opts)
        self.dims = dims  # attached when the length is known (``finish``)
        self.hash = hashlib.sha256()

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dset.dtype)
        n = self.dset.shape[0]
        self.dset.resize(n + a.shape[0], axis=0)
        if a.shape[0]:
            self.dset[n:] = a
        self.hash.update(a.tobytes())

    def finish(self, **attrs: Any) -> None:
        attach_dimensions(self.dset, self.dims)
        self.dset.attrs[DIGEST_ATTR] = self.hash.hexdigest()
        self.dset.attrs.update(attrs)


def assemble(f: Any, parts: Parts, lines: int, hidden: int, dtype: Any,
             kept: list[int], pairs: bool, compression: str,
             pooled_width: int | None = None, ids: str = "",
             id_field: str = "") -> dict[str, int]:
    """Write every part into ``f`` in line order (the layout above); returns the totals
    (lines, tokens, truncated). ``ids``: "int" or "str" writes /input/id (the records'
    ``id_field``), "" none. Raises InputError when a part is missing or does not continue
    where the previous one ended."""
    import h5py

    inp, out = f.create_group("input"), f.create_group("output")
    strings = h5py.string_dtype()
    text = inp.create_dataset("text", shape=(0,), maxshape=(None,), dtype=strings,
                              chunks=(4096,))
    text_pair = None
    if pairs:
        text_pair = inp.create_dataset("text_pair", shape=(0,), maxshape=(None,),
                                       dtype=strings, chunks=(4096,))
    id_text = id_numbers = None
    if ids == "str":
        id_text = inp.create_dataset("id", shape=(0,), maxshape=(None,), dtype=strings,
                                     chunks=(4096,))
    elif ids == "int":
        id_numbers = _Appender(inp, "id", (), np.int64, ("line",), compression, lines)
    hint = min(1 << 16, 64 * max(lines, 1))  # tokens per HDF5 chunk
    tokens = _Appender(inp, "tokens", (), np.int64, ("token",), compression, hint)
    types = (_Appender(inp, "token_type_ids", (), np.int64, ("token",), compression, hint)
             if pairs else None)
    truncated = _Appender(inp, "truncated", (), np.uint8, ("line",), compression, lines)
    pooled = _Appender(out, "pooled", (pooled_width or hidden,), dtype, ("line", "hidden_unit"),
                       compression, lines)
    states = {(i, name): _Appender(f.require_group(f"layers/{i:02d}"), name, (hidden,), dtype,
                                   ("token", "hidden_unit"), compression, hint)
              for i in kept for name in ("attention", "hidden")}
    text_hashes = [hashlib.sha256() for _ in range(3)]  # text, text_pair, id (text_sha256)
    offsets = _Appender(inp, "offsets", (), np.int64, ("line_edge",), compression, lines + 1)
    offsets.append(np.zeros(1, dtype=np.int64))
    done = total_tokens = n_truncated = 0
    parts.check_bound("assembling the output")
    chunks: list[int] = []  # bytes of one HDF5 chunk of each dataset: the most it may waste
    f.visititems(lambda _, o: chunks.append(int(np.prod(o.chunks)) * o.dtype.itemsize)
                 if isinstance(o, h5py.Dataset) and o.chunks else None)
    reserve(f.filename, int(parts.size() * 1.25) + sum(chunks) + (1 << 20),
            f"'{parts.out_path}'")
    for index in range(parts.done()):
        part = parts.read(index)  # one read: checked against its digest, then appended
        if part is None:  # damaged since it was written: computed again
            parts.drop_damaged()
            raise InputError(f"part {index} of '{parts.folder}' does not match its digest"
                             " (damaged on disk?); it was removed: run the same command with"
                             " --resume to compute it again")
        if part.first != done:
            raise InputError(f"part {index} of '{parts.folder}' starts at line {part.first},"
                             f" not {done}: the folder was altered; run again without --resume")
        a = part.arrays
        n = a["pooled"].shape[0]
        for k, (dset, name) in enumerate(((text, "text"), (text_pair, "text_pair"),
                                          (id_text, "record_id"))):
            if dset is not None:
                dset.resize(done + n, axis=0)
                dset[done:] = part.texts[name]
                text_hash(part.texts[name], text_hashes[k])
        lengths = a["lengths"]
        tokens.append(a["tokens"])
        if types is not None:
            types.append(a["token_type_ids"])
        truncated.append(a["truncated"])
        if id_numbers is not None:
            id_numbers.append(a["record_id"])
        n_truncated += int(np.count_nonzero(a["truncated"]))
        pooled.append(a["pooled"])
        for (i, name), app in states.items():
            app.append(a[f"layers/{i:02d}/{name}"])
        offsets.append(total_tokens + np.cumsum(lengths, dtype=np.int64))
        done, total_tokens = done + n, total_tokens + int(lengths.sum())
    if done != lines:
        raise InputError(f"'{parts.folder}' holds {done} of {lines} lines: run again")
    for dset, h in zip((text, text_pair, id_text), text_hashes, strict=True):
        if dset is not None:
            attach_dimensions(dset, ("line",))
            dset.attrs[DIGEST_ATTR] = h.hexdigest()
    about = f"each record's '{id_field}' field, row i of /output/pooled is record i"
    if id_text is not None:
        id_text.attrs.update(field=id_field, description=about)
    if id_numbers is not None:
        id_numbers.finish(field=id_field, description=about)
    ragged = "row i is [offsets[i]:offsets[i+1]] of each (token, ...) dataset"
    offsets.finish(description=ragged)
    for app in (tokens, types, truncated):
        if app is not None:
            app.finish()
    pooled.finish(description="the last layer through the model's sentence-transformers"
                  " modules (attrs modules, modules_source, prompt_name, prompt)")
    for app in states.values():
        app.finish(description=f"per real token, all lines concatenated; {ragged} of"
                   " /input/offsets")
    f.attrs["parts"] = parts.record()  # a folder left after publishing is recognised
    parts.check_bound("publishing the output")
    return {"lines": done, "tokens": total_tokens, "truncated": n_truncated}


@contextlib.contextmanager
def disk_file(out: Any) -> Iterator[Any]:
    """An h5py File written straight into ``out``'s exclusive temporary (too big for
    memory), published under the final name only if the block succeeds."""

    seen: list[str] = []
    try:
        try:
            with quiet_h5() as seen, _h5(out.create(), "w") as f:
                try:
                    f.attrs["status"] = "writing"
                    yield f
                    f.flush()  # a failed write raises here, not in a destructor
                except BaseException:
                    give_back(out.tmp)  # room to close it: else HDF5 crashes at exit
                    raise
        except (OSError, RuntimeError) as err:
            hint = ("; free some space and run the same command with --resume (the finished"
                    " chunks are kept)" if is_full(err, seen) else "")
            raise UserError(f"cannot write '{out.path}': {reason(err, seen)}{hint}; earlier"
                            " files are untouched") from None
        with contextlib.suppress(OSError):  # the reservation's unused blocks past the end
            os.truncate(out.tmp, os.stat(out.tmp).st_size)  # (``reserve``) given back
        out.publish()
    finally:
        out.discard()
