"""Every user error of every command, at 1, 2 and 3 ranks: the job ends collectively.

The kinds (not cases) of issue #11, each run through the real command line under
``mpiexec``; per-rank differences come from MPMD launches (``mpiexec -n 1 A : -n 1 B``,
with ``-wdir`` for a file that differs between "nodes"). Every case asserts that every
rank exits non-zero (a rank left waiting would be ended only by the watchdog, at
``comm.timeout``, 600 s by default, far beyond ``HANG``: the test then fails), that exactly
one ``mpiattn:`` line reaches the user (from one rank), no traceback, no file under the
output name and no temporary. How long each job took is printed, never asserted: a busy
machine must not fail the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
HANG = 120  # seconds: a job still running then is a hang (its process group is killed)

TINY = {"model.layers": 2, "model.hidden": 36, "model.heads": 6, "model.ffn": 64,
        "model.vocab": 200, "model.max_positions": 32, "input.batch": 6, "input.seq_len": 16}
TRAIN = {**TINY, "model.heads": 6, "train.steps": 6, "train.eval_every": 0,
         "train.corpus": "corpus/train.txt", "train.heldout": "corpus/heldout.txt",
         "train.checkpoint": "ck-{step}.h5"}

pytestmark = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not found")


def sets(flat: dict) -> list[str]:
    out = []
    for key, value in flat.items():
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, str) else value}"]
    return out


def launch(per_rank: list[list], cwd: Path, wdirs: list[Path] | None = None,
           env: dict | None = None, signal_after: tuple[float | Path, int] | None = None
           ) -> tuple[subprocess.CompletedProcess, float]:
    """``mpiexec -n 1 CMD_0 : -n 1 CMD_1 ...`` (one block per rank, so each rank may get
    other arguments or another working directory); (result, wall seconds). ``signal_after``
    = (seconds, a file to wait for, or text to wait for on stderr; signal) sends the signal
    to the launcher, and the seconds returned are counted from it."""
    cmd: list = [MPIEXEC]
    for rank, args in enumerate(per_rank):
        if rank:
            cmd.append(":")
        cmd += ["-n", "1"]
        if wdirs:
            cmd += ["-wdir", str(wdirs[rank])]
        cmd += [sys.executable, "-m", "mpiattn", *args]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    seen = b""
    if signal_after is not None:
        when, sig = signal_after
        if isinstance(when, Path):  # as soon as the job has made this file
            while not when.exists() and proc.poll() is None and time.perf_counter() - start < HANG:
                time.sleep(0.01)
        elif isinstance(when, str):  # as soon as the job has said this (on stderr)
            for line in iter(proc.stderr.readline, b""):
                seen += line
                if when.encode() in line:
                    break
        else:
            time.sleep(when)
        proc.send_signal(sig)
        signalled = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd} hung for {HANG} s")
    seconds = time.perf_counter() - (start if signal_after is None else signalled)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"),
                                       (seen + err).decode(errors="replace")), seconds


def same(args: list, ranks: int) -> list[list]:
    return [list(args) for _ in range(ranks)]


def mpiattn_lines(stderr: str) -> list[str]:
    """What mpiattn said, less warnings and notes (e.g. oversubscribed test machines)."""
    return [line for line in stderr.splitlines() if line.startswith("mpiattn")
            and not line.startswith(("mpiattn: warning:", "mpiattn: note:"))]


def assert_collective_failure(done: subprocess.CompletedProcess, seconds: float,
                              folder: Path, out_name: str | bytes, code: int | None = 2,
                              match: str = "", preexisting: bool = False) -> str:
    lines = mpiattn_lines(done.stderr)
    print(f"exit {done.returncode} after {seconds:.1f} s: {lines}")
    assert done.returncode != 0, done.stderr
    if code is not None:
        assert done.returncode == code, done.stderr
    assert len(lines) == 1, done.stderr  # one line, from one rank
    assert "Traceback" not in done.stderr, done.stderr
    assert match in lines[0], lines[0]
    names = [os.fsencode(p.name) for p in folder.iterdir()]
    assert os.fsencode(out_name) not in names or preexisting
    assert not [n for n in names if n.endswith(b".tmp")], names  # no temporaries left
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "data" / "corpus" / "train.txt").read_text(encoding="utf-8")
    (folder / "train.txt").write_text(text[:30000], encoding="utf-8")
    (folder / "heldout.txt").write_text(text[30000:36000], encoding="utf-8")
    return folder


def job_folder(tmp_path: Path, corpus: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(corpus, work / "corpus")
    return work


# --- the matrix --------------------------------------------------------------------------

COMMANDS = {"run": TINY, "bench": TINY, "train": TRAIN}
EXTRA = {"bench": ["--repeats", "1"]}


def output_cases(work: Path) -> dict[str, tuple[str | bytes, str]]:
    """name -> (-o value, expected text): what is wrong with the output name."""
    (work / "exists.h5").write_bytes(b"precious")
    (work / "adir").mkdir()
    (work / "afile").write_text("x")
    return {
        "exists": ("exists.h5", "exists: pass --force"),
        "missing-folder": ("nowhere/out.h5", "does not exist"),
        "is-directory": ("adir", "is a directory"),
        "under-a-file": ("afile/out.h5", "does not exist"),
        "name-too-long": ("o" * 256 + ".h5", "this file system allows 255"),
        "not-utf8": (b"out-\xff.h5", "not valid UTF-8"),
    }


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("command", ["run", "bench", "train"])
def test_bad_output_name_ends_every_rank(tmp_path, corpus, command, ranks):
    work = job_folder(tmp_path, corpus)
    for case, (name, text) in output_cases(work).items():
        args = [command, *sets(COMMANDS[command]), *EXTRA.get(command, []), "-o", name]
        done, seconds = launch(same(args, ranks), work)
        print(case, end=": ")
        assert_collective_failure(done, seconds, work, name, match=text,
                                  preexisting=case in ("exists", "is-directory"))
    assert (work / "exists.h5").read_bytes() == b"precious"


def odd_rank(ranks: int) -> int:
    """The rank that sees something different: the last at 2 ranks, rank 0 at 3 (so both
    'another rank saw it' and 'the reporting rank saw it' are covered)."""
    return 1 if ranks == 2 else 0


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("command", ["run", "bench", "train"])
def test_config_file_on_some_ranks_only(tmp_path, corpus, command, ranks):
    work = job_folder(tmp_path, corpus)
    (work / "job.toml").write_text("seed = 1\n")
    per_rank = []
    for rank in range(ranks):
        toml = "gone.toml" if rank == odd_rank(ranks) else "job.toml"
        per_rank.append([command, toml, *sets(COMMANDS[command]), *EXTRA.get(command, []),
                         "-o", "out.h5"])
    done, seconds = launch(per_rank, work)
    line = assert_collective_failure(done, seconds, work, "out.h5", match="gone.toml")
    assert (f"rank {odd_rank(ranks)}:" in line) == (odd_rank(ranks) != 0)


def input_cases(command: str) -> dict[str, tuple[dict, str]]:
    """name -> (config keys naming a file present on some ranks only, expected text)."""
    if command == "train":
        return {"corpus": ({"train.corpus": "mine/train.txt"}, "mine/train.txt")}
    return {"text": ({"input.text": "mine/in.txt", "input.tokenizer": "mine/tokenizer.json",
                      "model.vocab": 30522}, "mine/")}


def node_folders(work: Path, ranks: int, differ: bool, minilm: Path) -> list[Path]:
    """One working folder per rank, as on separate nodes: ``mine/`` holds the inputs; on
    the odd rank it is missing (``differ=False``) or has other contents (``differ=True``)."""
    text = (ROOT / "data" / "sentences.txt").read_text(encoding="utf-8")
    folders = []
    for rank in range(ranks):
        folder = work / f"node{rank}"
        shutil.copytree(work / "corpus", folder / "corpus")
        odd = rank == odd_rank(ranks)
        if not odd or differ:
            mine = folder / "mine"
            mine.mkdir()
            shutil.copy(minilm / "tokenizer.json", mine / "tokenizer.json")
            lines = text.splitlines()
            (mine / "in.txt").write_text("\n".join(lines[::-1] if odd else lines) + "\n")
            corpus = (folder / "corpus" / "train.txt").read_text(encoding="utf-8")
            (mine / "train.txt").write_text(corpus[::-1] if odd else corpus, encoding="utf-8")
        folders.append(folder)
    return folders


@pytest.mark.parametrize("differ", [False, True], ids=["missing", "different"])
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("command", ["run", "train"])
def test_input_file_missing_or_different_on_one_rank(tmp_path, corpus, minilm_dir, command,
                                                     ranks, differ):
    work = job_folder(tmp_path, corpus)
    folders = node_folders(work, ranks, differ, minilm_dir)
    for case, (keys, text) in input_cases(command).items():
        out = work / f"{case}.h5"
        args = [command, *sets({**COMMANDS[command], **keys}), "-o", str(out)]
        done, seconds = launch(same(args, ranks), work, wdirs=folders)
        line = assert_collective_failure(done, seconds, work, out.name, match=text)
        if differ:
            assert "ranks differ in" in line, line


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_train_checkpoint_and_resume_errors(tmp_path, corpus, ranks):
    work = job_folder(tmp_path, corpus)
    (work / "ck-3.h5").write_bytes(b"someone's")
    base = ["train", *sets({**TRAIN, "train.checkpoint_every": 3})]
    done, seconds = launch(same([*base, "-o", "out.h5"], ranks), work)
    assert_collective_failure(done, seconds, work, "out.h5", match="ck-3.h5' exists")
    assert (work / "ck-3.h5").read_bytes() == b"someone's"
    done, seconds = launch(same([*base, "-o", "out.h5", "--resume", "nope.h5"], ranks), work)
    assert_collective_failure(done, seconds, work, "out.h5", match="nope.h5")
    (work / "ck-3.h5").unlink()


@pytest.mark.parametrize("ranks", [2, 3])
def test_resume_from_different_checkpoints_on_different_ranks(tmp_path, corpus, ranks):
    work = job_folder(tmp_path, corpus)
    flat = {**TRAIN, "train.checkpoint_every": 3, "dtype": "float64"}
    made, _ = launch([["train", *sets(flat), "-o", "a.h5"]], work)
    assert made.returncode == 0, made.stderr
    # the same experiment (seed) but another run of it: only the digests tell them apart
    made, _ = launch([["train", *sets({**flat, "train.lr": 3e-3}), "-o", "b.h5",
                       "--set", "train.checkpoint=\"other-{step}.h5\""]], work)
    assert made.returncode == 0, made.stderr
    folders = []
    for rank in range(ranks):  # a stale node-local copy on the odd rank
        folder = work / f"node{rank}"
        shutil.copytree(work / "corpus", folder / "corpus")
        source = "other-3.h5" if rank == odd_rank(ranks) else "ck-3.h5"
        shutil.copy(work / source, folder / "resume.h5")
        folders.append(folder)
    args = ["train", *sets(flat), "-o", str(work / "out.h5"), "--resume", "resume.h5",
            "--set", "train.checkpoint=\"ck2-{step}.h5\""]
    done, seconds = launch(same(args, ranks), work, wdirs=folders)
    line = assert_collective_failure(done, seconds, work, "out.h5")
    # the odd rank's copy is another run's checkpoint (train.lr differs): refused there by
    # the job identity it records, or by the pre-flight's digest agreement
    assert ("ranks differ in --resume checkpoint" in line
            or "a checkpoint of another job: train.lr" in line), line


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("command", ["run", "bench", "train"])
def test_bad_config_value_and_world_mismatch(tmp_path, corpus, command, ranks):
    work = job_folder(tmp_path, corpus)
    args = [command, *sets(COMMANDS[command]), "--set", "model.layer=2", "-o", "out.h5"]
    done, seconds = launch(same(args, ranks), work)
    assert_collective_failure(done, seconds, work, "out.h5", match="did you mean")
    if ranks > 1:  # a head-group size that does not divide the world
        keys = {**COMMANDS[command], "parallel.tensor": ranks + 1}
        done, seconds = launch(same([command, *sets(keys), "-o", "out.h5"], ranks), work)
        assert_collective_failure(done, seconds, work, "out.h5", match="parallel.tensor")


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("command", ["run", "bench", "train"])
def test_sequence_parallel_mistakes_end_every_rank(tmp_path, corpus, command, ranks):
    """Ulysses with fewer heads than sequence ranks; bench: a sweep length shorter than the
    sequence group (both found in the pre-flight, so one line from rank 0)."""
    work = job_folder(tmp_path, corpus)
    keys = {**COMMANDS[command], "parallel.sequence": ranks, "parallel.tensor": 1,
            "attention.sequence": "ulysses", "model.heads": 1}
    done, seconds = launch(same([command, *sets(keys), "-o", "out.h5"], ranks), work)
    assert_collective_failure(done, seconds, work, "out.h5", match="attention.sequence")
    if command == "bench":
        keys = {**keys, "attention.sequence": "ring"}
        args = [command, *sets(keys), "--sweep", f"{ranks - 1},16", "-o", "out.h5"]
        done, seconds = launch(same(args, ranks), work)
        assert_collective_failure(done, seconds, work, "out.h5", match="--sweep length")


WRITE_FAILS = """
import errno, sys
from mpiattn.commands import cli
from mpiattn.io import outfile

real = outfile.Reservation.write
calls = []

def write(self, image):
    if "ck-" in self.path.name:
        calls.append(self.path)
        if len(calls) == 2:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, image)

outfile.Reservation.write = write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_checkpoint_write_failing_mid_training(tmp_path, corpus, ranks):
    work = job_folder(tmp_path, corpus)
    (work / "inject.py").write_text(WRITE_FAILS)
    args = ["train", *sets({**TRAIN, "train.checkpoint_every": 2}), "-o", "out.h5"]
    cmd: list = [MPIEXEC, "-n", str(ranks), sys.executable, "inject.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=HANG)
    seconds = time.perf_counter() - start
    assert_collective_failure(done, seconds, work, "out.h5", match="no space left on device")
    assert (work / "ck-2.h5").is_file() and not (work / "ck-4.h5").exists()


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_offline_commands_under_mpiexec_speak_once(tmp_path, ranks):
    (tmp_path / "junk.h5").write_bytes(b"not HDF5")
    for args, code in [(["verify", "missing.h5"], 1), (["verify", "junk.h5"], 1),
                       (["report", "missing.h5"], 2), (["report", "junk.h5"], 2),
                       (["info", "--bogus"], 2), (["run", "--bogus"], 2)]:
        done, _ = launch(same(args, ranks), tmp_path)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        print(args, done.returncode, lines)
        assert done.returncode == code, done.stderr
        assert len(lines) == 1 and "Traceback" not in done.stderr, lines


# --- hangs, signals --------------------------------------------------------------------

@pytest.mark.parametrize(("ranks", "hung"), [(2, 1), (3, 0), (3, 2)])
def test_a_hung_rank_is_cut_by_the_watchdog(tmp_path, ranks, hung):
    keys = {**TINY, "comm.timeout": 5,  # beyond any wait a loaded machine makes
            "fault.crash": f"[{{rank={hung}, layer=1, how=\"hang\"}}]"}
    args = ["run", *sets({k: v for k, v in keys.items() if k != "fault.crash"}),
            "--set", f"fault.crash={keys['fault.crash']}", "-o", "out.h5"]
    done, seconds = launch(same(args, ranks), tmp_path)
    line = assert_collective_failure(done, seconds, tmp_path, "out.h5", code=5,
                                     match="mpiattn: timeout: rank")
    assert "layer 1" in line and "comm.timeout = 5 s" in line


@pytest.mark.parametrize("ranks", [2, 4])
def test_persistent_corruption_between_pipeline_stages_ends_every_rank(tmp_path, ranks):
    flip = 'fault.inject=[{rank=0, layer=0, site="activations", index=0, bit=5, times=9}]'
    args = ["run", *sets({**TINY, "parallel.pipeline": 2}), "--set", flip, "-o", "out.h5"]
    done, seconds = launch(same(args, ranks), tmp_path)
    line = assert_collective_failure(done, seconds, tmp_path, "out.h5", code=3,
                                     match="integrity error")
    assert "point-to-point transfer at layer 0 site 'activations'" in line


@pytest.mark.parametrize(("ranks", "site"), [(2, "mlp.bwd"), (4, "attention.bwd"),
                                           (4, "grad")])
def test_persistent_corruption_in_training_ends_every_rank(tmp_path, corpus, ranks, site):
    """A flip on every attempt of a backward or gradient Allreduce; at 4 ranks (2 heads x 2
    replicas) the ranks outside the failing group end by the abort."""
    work = job_folder(tmp_path, corpus)
    layer = 0 if site == "grad" else 1
    flip = (f"fault.inject=[{{rank={ranks - 1}, layer={layer}, site=\"{site}\", index=3,"
            " bit=30, times=9}]")  # float32's top exponent bit
    tensor = 1 if site == "grad" and ranks == 2 else 2
    args = ["train", *sets({**TRAIN, "parallel.tensor": tensor}), "--set", flip, "-o", "out.h5"]
    done, seconds = launch(same(args, ranks), work)
    line = assert_collective_failure(done, seconds, work, "out.h5", code=3,
                                     match="integrity error")
    assert f"layer {layer} site '{site}'" in line and "gave up after 2 retries" in line
    assert not list(work.glob("ck-*.h5"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_signal_during_a_run_is_one_line_and_nothing_written(tmp_path, ranks, sig):
    crash = 'fault.crash=[{rank=0, layer=1, how="hang"}]'
    args = ["run", *sets(TINY), "--set", crash, "-o", "out.h5"]
    done, seconds = launch(same(args, ranks), tmp_path, signal_after=("hangs in layer 1", sig))
    line = assert_collective_failure(done, seconds, tmp_path, "out.h5",
                                     code=128 + sig, match="interrupted by")
    assert "layer 1" in line


STOPPABLE = {**TRAIN, "dtype": "float64", "train.steps": 400, "model.layers": 1}


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory, corpus) -> np.ndarray:
    """The 400 losses of an uninterrupted run (one rank: every layout gives the same)."""
    work = job_folder(tmp_path_factory.mktemp("straight"), corpus)
    done, _ = launch([["train", *sets(STOPPABLE), "-o", "ref.h5"]], work)
    assert done.returncode == 0, done.stderr
    with h5py.File(work / "ref.h5") as f:
        return f["train/loss"][()]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_training_stops_at_a_step_and_resumes_exactly(tmp_path, corpus, straight_losses,
                                                      ranks, sig):
    work = job_folder(tmp_path, corpus)
    args = ["train", *sets({**STOPPABLE, "train.checkpoint_every": 50}), "-o", "out.h5"]
    done, _ = launch(same(args, ranks), work, signal_after=(work / "ck-50.h5", sig))
    assert done.returncode == 75, done.stderr  # stopped at an agreed step: resume
    assert "stopped by" in done.stderr and "Traceback" not in done.stderr
    with h5py.File(work / "out.h5") as f:
        assert f.attrs["status"] == "interrupted"
        stopped_at = f["train/loss"].shape[0]
    assert 50 <= stopped_at < 400 and (work / f"ck-{stopped_at}.h5").is_file()
    done, _ = launch(same([*args, "--resume", "auto"], ranks), work)
    assert done.returncode == 0, done.stderr
    with h5py.File(work / "out.h5") as f:
        assert f.attrs["status"] == "complete"
        np.testing.assert_allclose(f["train/loss"][()], straight_losses, rtol=1e-12)
    print(f"{ranks} ranks: stopped by {sig.name} after {stopped_at} steps, resumed exactly")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_diverging_training_is_a_numerical_error_at_every_size(tmp_path, corpus, ranks):
    work = job_folder(tmp_path, corpus)
    keys = {**TRAIN, "dtype": "float32", "train.lr": 1e30, "train.warmup": 0,
            "train.clip": 0, "train.steps": 20, "model.heads": 3}
    done, seconds = launch(same(["train", *sets(keys), "-o", "out.h5"], ranks), work)
    assert_collective_failure(done, seconds, work, "out.h5", code=4, match="numerical error")


# --- files: never clobbered, never lost ----------------------------------------------------

def test_two_jobs_racing_for_one_output_never_both_succeed(tmp_path):
    args = ["run", *sets(TINY), "-o", "out.h5"]
    procs = [subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "mpiattn",
                               *args, "--set", f"seed={seed}"], cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(*p.communicate(timeout=HANG), p.returncode) for p in procs]
    codes = sorted(code for _, _, code in results)
    print(codes, [err.strip() for _, err, _ in results])
    assert codes == [0, 2]
    loser = next(err for _, err, code in results if code == 2)
    assert "exists" in loser or "created by someone else" in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    verify, _ = launch([["verify", "out.h5"]], tmp_path)
    assert verify.returncode == 0


def test_longest_legal_output_name_is_written(tmp_path):
    name = "n" * 252 + ".h5"  # 255 bytes: the temporary's name must still fit
    done, _ = launch([["run", *sets(TINY), "-o", name]], tmp_path)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_symlink_at_the_output_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out.h5").symlink_to(victim)
    done, _ = launch([["run", *sets(TINY), "-o", "out.h5"]], tmp_path)
    assert done.returncode == 2 and "exists" in done.stderr
    done, _ = launch([["run", *sets(TINY), "-o", "out.h5", "--force"]], tmp_path)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "keep me" and not (tmp_path / "out.h5").is_symlink()


def _check_config_parses(path: Path) -> None:
    import tomllib

    with h5py.File(path) as f:
        tomllib.loads(f.attrs["config"])


def test_recorded_config_always_parses(tmp_path):
    odd = 'q"b\\s \u00e9 \u2603 {step}.h5'  # quote, backslash, non-ASCII
    done, _ = launch([["run", *sets({**TINY, "train.checkpoint": odd}), "-o", "out.h5"]],
                     tmp_path)
    assert done.returncode == 0, done.stderr
    import tomllib

    with h5py.File(tmp_path / "out.h5") as f:
        assert tomllib.loads(f.attrs["config"])["train"]["checkpoint"] == odd
