"""Issue #24, second part: what a job reuses must be its own. Checkpoints taken by
``train --resume`` only of the same job identity; parts folders bound to their job by a
secret and held by descriptor; the parts folder of a published output removed; a disk
that fills inside an HDF5 write; another user (``setpriv``) planting files in a shared
folder.

Every subprocess has a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_edges import ROOT, mpiattn, one_error_line
from test_edges import _sets as sets
from test_edges import flock_shim as flock_shim  # a fixture, used by small_disk

TRAIN = {"dtype": "float64", "model.layers": 1, "model.heads": 2, "model.hidden": 8,
         "model.ffn": 8, "model.vocab": 60, "model.max_positions": 16, "input.batch": 2,
         "input.seq_len": 8, "train.steps": 4, "train.eval_every": 0,
         "train.eval_batches": 1, "train.checkpoint_every": 2, "train.export": ""}


# --- 1. train --resume takes only checkpoints of the same job ---------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny training job (4 steps) that wrote ck-2.h5 and ck-4.h5; its flat config
    (with train.steps = 6, so that both can be continued: steps are not identity)."""
    work = tmp_path_factory.mktemp("trained")
    lines = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").splitlines()[:60]
    (work / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    flat = {**TRAIN, "train.corpus": str(work / "corpus.txt"),
            "train.heldout": str(work / "corpus.txt"),
            "train.checkpoint": str(work / "ck-{step}.h5")}
    done = mpiattn("train", "-o", "t.h5", *sets(flat), cwd=work, timeout=240)
    assert done.returncode == 0, done.stderr
    return {"work": work, "flat": {**flat, "train.steps": 6}}


def _cfg(flat: dict, **changes):
    from mpiattn import config

    return config.from_dict({**flat, **changes})


def _copy(trained: dict, tmp_path: Path, *names: str) -> dict:
    """The trained job's corpus and the named checkpoints copied into ``tmp_path``."""
    for name in ("corpus.txt", *names):
        shutil.copy(trained["work"] / name, tmp_path / name)
    return {**trained["flat"], "train.corpus": str(tmp_path / "corpus.txt"),
            "train.heldout": str(tmp_path / "corpus.txt"),
            "train.checkpoint": str(tmp_path / "ck-{step}.h5")}


def _edit_identity(path: Path, **changes: str) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        ident = json.loads(f.attrs["job_identity"])
        ident.update(changes)
        f.attrs["job_identity"] = json.dumps(ident)


@pytest.mark.parametrize(("change", "words"), [
    ({"seed": 7}, "seed 7 here, 0 in ck-4.h5"),
    ({"train.lr": 5e-4}, "train.lr 0.0005 here, 0.001 in ck-4.h5"),
    ({"input.batch": 3}, "input.batch 3 here, 2 in ck-4.h5"),
    ("corpus", "train.corpus differs in content"),
])
def test_resume_refuses_a_checkpoint_of_another_job(trained, tmp_path, change, words):
    """--resume PATH: a checkpoint whose stored identity differs in the seed, a
    hyperparameter, a data setting or the corpus's content is one line naming it."""
    from mpiattn.commands.train import check_training
    from mpiattn.errors import InputError

    flat = _copy(trained, tmp_path, "ck-4.h5")
    ck = str(tmp_path / "ck-4.h5")
    value, _ = check_training(_cfg(flat), 1, ck, False)  # the same job: resumed, no note
    assert value[2].step == 4 and value[6] == []
    if change == "corpus":  # the same line count, one word changed
        path = tmp_path / "corpus.txt"
        path.write_text(path.read_text().replace(" the ", " a ", 1))
        change = {}
    with pytest.raises(InputError) as err:
        check_training(_cfg(flat, **change), 1, ck, False)
    text = str(err.value)
    assert words in text and "refused" in text and "another job" in text and "\n" not in text


def test_resume_auto_skips_other_jobs_and_says_so(trained, tmp_path):
    """--resume auto passes over a newer checkpoint of another seed (named in one note)
    and takes the newest of this job; an older checkpoint without an identity is taken
    with a note; when every one is another job's, it starts afresh only if no name of
    another job's would be overwritten (else one line naming why)."""
    import h5py

    from mpiattn.commands.train import check_training
    from mpiattn.errors import ConfigError

    flat = _copy(trained, tmp_path, "ck-2.h5", "ck-4.h5")
    shutil.copy(tmp_path / "ck-4.h5", tmp_path / "ck-5.h5")
    _edit_identity(tmp_path / "ck-5.h5", seed="7")
    with h5py.File(tmp_path / "ck-5.h5", "a") as f:
        f.attrs["step"] = 5
    value, _ = check_training(_cfg(flat), 1, "auto", False)
    ck, resume, notes = value[2], value[3], value[6]
    assert ck.step == 4 and resume.endswith("ck-4.h5")
    assert len(notes) == 1 and "skipped 1 checkpoint" in notes[0]
    assert "ck-5.h5 (seed 0 here, 7 in ck-5.h5)" in notes[0] and "ck-4.h5" in notes[0]
    with h5py.File(tmp_path / "ck-4.h5", "a") as f:  # as an older mpiattn wrote it
        del f.attrs["job_identity"]
    value, _ = check_training(_cfg(flat), 1, "auto", False)
    assert value[2].step == 4 and "records no job identity" in value[6][-1]
    for name in ("ck-2.h5", "ck-4.h5"):
        (tmp_path / name).unlink()
    with pytest.raises(ConfigError, match=r"ck-6.h5' exists and is not this job's \(seed"):
        shutil.copy(tmp_path / "ck-5.h5", tmp_path / "ck-6.h5")
        check_training(_cfg(flat), 1, "auto", False)


def test_model_folder_content_is_part_of_the_identity(trained, tmp_path, minilm_dir):
    """A training job started from a model folder: each file of the folder is in its
    identity, so a checkpoint made from another copy of the folder is refused by name.
    (The checkpoint is the tiny job's, its stored identity given the folder's digests:
    training from MiniLM itself would cost minutes.)"""
    from test_edges import _model_copy

    from mpiattn.commands.jobkit import input_digests
    from mpiattn.errors import InputError
    from mpiattn.io.formats.checkpoint import job_identity, read_checkpoint

    model = _model_copy(minilm_dir, tmp_path / "model")

    def folder_identity() -> dict:
        cfg = _cfg(trained["flat"], **{"model.weights": str(model)})
        return {k: v for k, v in job_identity(cfg, input_digests(cfg)).items()
                if k.startswith("model.weights")}

    before = folder_identity()
    assert {"model.weights config.json (content)", "model.weights tokenizer.json (content)",
            "model.weights sentence_bert_config.json (content)"} <= set(before)
    flat = _copy(trained, tmp_path, "ck-4.h5")
    ck = tmp_path / "ck-4.h5"
    import h5py

    with h5py.File(ck, "r") as f:
        job = json.loads(f.attrs["job_identity"])  # this job's, from the folder as it was:
    _edit_identity(ck, **before)
    assert read_checkpoint(ck, _cfg(flat), {**job, **before}).step == 4
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "note": "edited"}))
    with pytest.raises(InputError, match="model.weights config.json differs in content"):
        read_checkpoint(ck, _cfg(flat), {**job, **folder_identity()})


def test_resume_of_another_job_at_two_ranks(trained, tmp_path):
    """Under mpiexec -n 2 the refusal is one line from rank 0, exit 2, nothing written."""
    flat = _copy(trained, tmp_path, "ck-4.h5")
    done = mpiattn("train", "-o", "t.h5", "--resume", "ck-4.h5",
                   *sets({**flat, "train.lr": 5e-4}), cwd=tmp_path, ranks=2, timeout=240)
    one_error_line(done, "train.lr 0.0005 here, 0.001 in ck-4.h5", "refused")
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "ck-6.h5").exists()


# --- 2. parts folders bound to their job ------------------------------------------------

def _chunk(first: int):
    import numpy as np

    from mpiattn.io.corpusfile import ChunkResult

    return ChunkResult(first, ["a"], None, [np.array([1, 2])], None, np.zeros(1, bool),
                       np.full((1, 4), first, dtype=np.float32))


def _parts(out: Path, key: str = "k"):
    from mpiattn.io import corpusfile

    return corpusfile.Parts.new(out, key, {"world_size": 1}, 3, 1)


@pytest.mark.parametrize("swap", ["renamed", "swapped", "secret"])
def test_a_parts_folder_swapped_under_its_name_stops_the_job(tmp_path, swap):
    """A folder renamed away, another one (same job key, its own job.json) swapped in
    under the name, or job.json replaced: the next publication is refused in one line
    (exit 3), nothing written into the impostor, and assembly refuses it as well."""
    import h5py

    from mpiattn.io import corpusfile

    parts = _parts(tmp_path / "o.h5")
    parts.write(0, _chunk(0))
    folder = parts.folder
    job = json.loads((folder / "job.json").read_text())
    assert len(job["secret"]) == 32 and (folder / "job.json").stat().st_mode & 0o777 == 0o600
    if swap == "secret":
        (folder / "job.json").write_text(json.dumps({**job, "secret": "0" * 32}))
    else:
        folder.rename(tmp_path / "away")
        if swap == "swapped":  # what someone who can write the folder beside the output does
            folder.mkdir(mode=0o700)
            (folder / "job.json").write_text(json.dumps({**job, "secret": "f" * 32}))
    with pytest.raises(corpusfile.FolderSwapped, match="not the one this job made") as err:
        parts.write(1, _chunk(1))
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    assert "nothing published" in str(err.value)
    assert not (folder / "chunk-0000001.h5").exists()
    with h5py.File(tmp_path / "x.h5", "w") as f, pytest.raises(corpusfile.FolderSwapped):
        corpusfile.assemble(f, parts, 1, 4, "float32", [], False, "none")
    parts.detach()  # what the text run does then: nothing under the name is removed
    parts.remove()
    assert folder.is_dir() == (swap != "renamed")


def test_resume_refuses_a_foreign_parts_folder(tmp_path):
    """--resume-from a folder of another job key: one line; the job's own folder is
    resumed with its secret, and publishing into it still works."""
    from mpiattn.errors import UserError
    from mpiattn.io import corpusfile

    other = _parts(tmp_path / "o.h5", key="other")
    other.write(0, _chunk(0))
    other.release()
    with pytest.raises(UserError, match="another config or other inputs"):
        corpusfile.Parts.find(tmp_path / "o.h5", "k", {"world_size": 1}, str(other.folder))
    with pytest.raises(UserError, match="no interrupted run of this job"):
        corpusfile.Parts.find(tmp_path / "o.h5", "k", {"world_size": 1})
    mine = corpusfile.Parts.find(tmp_path / "o.h5", "other", {"world_size": 1})
    assert mine.job["secret"] == other.job["secret"] and mine.done() == 1
    mine.write(1, _chunk(1))
    assert mine.done() == 2
    mine.remove()


# --- 3/4. a disk that fills inside HDF5 writes; a kill after the final rename ----------------

class SmallDisk:
    """A folder on a file system of a given size: a tmpfs where this process may mount
    one (root, CAP_SYS_ADMIN), else the LD_PRELOAD shim failing writes under the folder
    with ENOSPC after that many bytes of one process. ``env`` runs a command on it, with
    statvfs reporting plenty free (the free-space checks passed, the write then fails)."""

    def __init__(self, folder: Path, shim: Path) -> None:
        import subprocess

        self.folder, self.mounted, self.limit = folder, False, 64
        folder.mkdir()
        try:  # MPIATTN_TEST_SHIM_DISK=1: the shim even where a tmpfs could be mounted
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                                   str(folder)], capture_output=True, timeout=30)
            self.mounted = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.mounted and os.environ.get("MPIATTN_TEST_SHIM_DISK"):
            self.close()
            self.mounted = False
        self.shim = shim

    @property
    def env(self) -> dict[str, str]:
        env = {"LD_PRELOAD": str(self.shim), "SHIM_FREE_KIB": str(1 << 20)}
        if not self.mounted:
            env.update(SHIM_ENOSPC_DIR=str(self.folder.resolve()),
                       SHIM_ENOSPC_AFTER=str(self.limit * 1024))
        return env

    def resize(self, kib: int, shim_kib: int | None = None) -> None:
        """``kib`` KiB in all (tmpfs), or ``shim_kib`` (default ``kib``) KiB written by
        the next command (shim)."""
        import subprocess

        self.limit = kib if shim_kib is None else shim_kib
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={kib}k", str(self.folder)],
                           check=True, timeout=30)

    def close(self) -> None:
        import subprocess

        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], timeout=30)


@pytest.fixture
def small_disk(tmp_path, flock_shim):
    disk = SmallDisk(tmp_path / "disk", flock_shim)
    try:
        yield disk
    finally:
        disk.close()


def _no_flood(done) -> list[str]:
    """stderr holds no traceback (h5py's per-object ones included) and no crash."""
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, \
        done.stderr[-3000:]
    assert done.returncode not in (-11, 139), "segfault"
    return [ln for ln in done.stderr.splitlines() if "error" in ln]


def test_full_disk_in_a_text_run_then_kill_after_publishing(small_disk):
    """A text run on a disk that fills: while writing chunk 2 (one line, the two finished
    chunks kept), then at assembly after --resume (one line naming the output and "no
    space", the temporary removed, all parts kept); with room, --resume is killed
    between publishing the output and removing its parts; the next run removes them
    with a note, and a folder of the same key but another secret is left alone."""
    import h5py
    from test_edges import MINILM, TEXT

    disk = small_disk.folder
    (disk / "t.txt").write_text(TEXT)
    args = ("run", "-o", "o.h5", *sets({**MINILM, "input.text": "t.txt",
                                         "output.layers": "all"}))
    small_disk.resize(380)  # room for 2 chunks of about 150 KiB
    done = mpiattn(*args, cwd=disk, timeout=240, **small_disk.env)
    (error,) = _no_flood(done)
    assert done.returncode == 2 and "cannot write chunk 2" in error and "no space" in error
    (folder,) = disk.glob(".o.h5*.parts")
    assert sorted(p.name for p in folder.glob("chunk-*")) == [
        "chunk-0000000.h5", "chunk-0000001.h5"] and not list(folder.glob("*.tmp"))
    small_disk.resize(620, 300)  # chunk 2 fits, the final file does not
    done = mpiattn(*args, "--resume", cwd=disk, timeout=240, **small_disk.env)
    (error,) = _no_flood(done)
    assert done.returncode == 2 and "cannot write 'o.h5': no space" in error
    assert len(list(folder.glob("chunk-*.h5"))) == 3 and not list(disk.glob(".o.h5*.tmp"))
    assert not (disk / "o.h5").exists()
    small_disk.resize(64 << 10)
    killed = mpiattn(*args, "--resume", cwd=disk, timeout=240, MPIATTN_TEST_KILL_AT="published",
                     **small_disk.env)
    assert killed.returncode in (-9, 137), killed.stderr
    assert folder.is_dir()
    st = (disk / "o.h5").stat()  # the space reserved for it, past its end, given back
    assert st.st_blocks * 512 <= st.st_size + (64 << 10), (st.st_blocks, st.st_size)
    with h5py.File(disk / "o.h5", "r") as f:
        assert f.attrs["status"] == "complete" and f["output/pooled"].shape[0] == 3
        assert json.loads(f.attrs["parts"])["folder"] == folder.name
    decoy = disk / ".o.h5.decoy.parts"  # the same key, another secret: not ours
    decoy.mkdir(mode=0o700)
    job = json.loads((folder / "job.json").read_text())
    (decoy / "job.json").write_text(json.dumps({**job, "secret": "0" * 32}))
    again = mpiattn(*args, cwd=disk, timeout=240)
    assert again.returncode == 2 and "exists: pass --force" in again.stderr
    assert f"note: removed '{folder.name}'" in again.stdout
    assert not folder.exists() and decoy.is_dir()


def test_full_disk_writing_run_files_checkpoints_and_exports(small_disk, recwarn, capfd):
    """The writer of run files and checkpoints (an image built in memory, then written)
    and export on a full tmpfs: one line naming the path and "no space", nothing left in
    the folder, nothing printed, no h5py warning. (In-process: a tmpfs is needed.)"""
    import numpy as np

    from mpiattn.errors import UserError
    from mpiattn.io import export, h5io

    if not small_disk.mounted:
        pytest.skip("no tmpfs can be mounted here (the text run test covers the shim)")
    disk = small_disk.folder
    for name in ("r.h5", "ck-4.h5"):
        with pytest.raises(UserError) as err, h5io.atomic_file(disk / name) as f:
            f["x"] = np.ones(40_000)  # 320 kB on a 64 KiB disk
            f.attrs["status"] = "complete"
        assert f"cannot write '{disk / name}': no space left on device" in str(err.value)
    folder = export.ModelFolder({"w": np.ones((200, 200), dtype=np.float32)},
                                {"model_type": "bert", "mpiattn": {"steps": 1}},
                                {"tokenizer.json": b"{}"}, None)
    with pytest.raises(UserError, match="'.*hf': no space left on device; nothing written"):
        export.publish(folder, disk / "hf")
    assert list(disk.iterdir()) == []
    assert capfd.readouterr().err == "" and not [w for w in recwarn
                                                 if "nraisable" in str(w.category)]


# --- 5. another user (setpriv) planting files in a shared folder ---------------------------

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def _as_nobody(script: str, *args: str) -> None:
    """Run ``sh -c script`` as user and group 65534 (nobody), which must succeed."""
    import subprocess

    done = subprocess.run([*NOBODY, "sh", "-c", script, "sh", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def shared():
    """A world-writable sticky folder (1777, a group project folder or /tmp) both users
    reach, once ``setpriv`` works here (it needs root: CI runs as root)."""
    import subprocess
    import tempfile

    try:
        ok = subprocess.run([*NOBODY, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("setpriv cannot switch to user 65534 here (not root?)")
    folder = Path(tempfile.mkdtemp(prefix="mpiattn-shared-"))
    folder.chmod(0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_another_user_plants_files_in_a_shared_folder(shared, trained, monkeypatch,
                                                      written_files):
    """User 65534 plants, in a 1777 folder: a parts folder carrying this job's key (and a
    part), a checkpoint matching train.checkpoint (this job's own, a step ahead: its
    identity matches), and the checkpoint unpack folder. --resume refuses the parts folder
    in one line and a fresh run makes its own; --resume auto passes the checkpoint over
    with a note; the unpack folder is neither used nor blocks the run."""
    import h5py

    from mpiattn.commands.train import check_training
    from mpiattn.errors import UserError
    from mpiattn.io import corpusfile, weights

    # a parts folder of this job's key, and one chunk in it
    job = {"key": "k", "layout": {"world_size": 1}, "lines": 3, "chunk": 1,
           "output": "o.h5", "secret": "f" * 32}
    _as_nobody('mkdir -m 700 "$1" && printf %s "$2" > "$1/job.json" && : > "$1/chunk-0000000.h5"',
               str(shared / ".o.h5.evil.parts"), json.dumps(job))
    with pytest.raises(UserError, match="belongs to another user .uid 65534.") as err:
        corpusfile.Parts.find(shared / "o.h5", "k", {"world_size": 1})
    assert "\n" not in str(err.value) and "--resume" in str(err.value)
    mine = corpusfile.Parts.new(shared / "o.h5", "k", {"world_size": 1}, 3, 1)
    mine.write(0, _chunk(0))
    assert mine.folder.name != ".o.h5.evil.parts" and mine.folder.stat().st_uid == os.geteuid()
    mine.remove()
    assert (shared / ".o.h5.evil.parts" / "job.json").is_file()  # theirs, untouched

    # a checkpoint matching the pattern: this job's identity, a step ahead, not ours
    flat = _copy(trained, shared, "ck-4.h5")
    bait = shared / "bait.h5"
    shutil.copy(shared / "ck-4.h5", bait)
    with h5py.File(bait, "a") as f:
        f.attrs["step"] = 5
        f["params"][sorted(f["params"])[0]][...] *= 0  # a model someone else chose
    bait.chmod(0o644)
    _as_nobody('cp "$1" "$2"', str(bait), str(shared / "ck-5.h5"))
    bait.unlink()
    value, _ = check_training(_cfg(flat), 1, "auto", False)
    assert value[2].step == 4 and value[3].endswith("ck-4.h5")
    assert "ck-5.h5 (another user's file, uid 65534)" in value[6][0]

    # the unpack folder of a checkpoint used as model.weights
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    weights._unpacked.cache_clear()
    try:
        fixed = weights.model_folder(str(written_files["checkpoint"]))
        shutil.rmtree(fixed)
        _as_nobody('mkdir -m 755 "$1" && printf %s \'{"hidden_size": 3}\' > "$1/config.json"',
                   str(fixed))
        weights._unpacked.cache_clear()
        got = weights.model_folder(str(written_files["checkpoint"]))
    finally:
        weights._unpacked.cache_clear()
    assert got != fixed and got.stat().st_uid == os.geteuid()
    assert json.loads((got / "config.json").read_text())["hidden_size"] != 3
    assert fixed.stat().st_uid == 65534
