"""Job scripts under jobs/ against a real one-node Slurm cluster and a real mpiexec.

The Slurm tests start slurmctld/slurmd/munged through tests/slurm/cluster.sh
(which apt-installs slurm-wlm and munge when missing, so it needs root) and
run only with MPIATTN_SLURM_TESTS=1. The rest always run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SLURM_JOBS = ROOT / "jobs" / "slurm"
LOCAL_JOBS = ROOT / "jobs" / "local"

SMALL = [
    "--set", "model.layers=2", "--set", "model.hidden=128", "--set", "model.ffn=256",
    "--set", "model.heads=4", "--set", "input.batch=2", "--set", "input.seq_len=32",
    "--set", "model.vocab=1000",
]  # fmt: skip
# Rank counts for the scaling sweep; the default fits a 2-core machine.
SWEEP = os.environ.get("MPIATTN_SLURM_RANKS", "1 2").split()
JOB_TIMEOUT = 600  # seconds: a bound on a hang, not a speed (a loaded machine is slow)

slurm = pytest.mark.skipif(
    os.environ.get("MPIATTN_SLURM_TESTS") != "1",
    reason="real Slurm cluster tests: set MPIATTN_SLURM_TESTS=1 (needs root)",
)
needs_cli = pytest.mark.skipif(
    importlib.util.find_spec("mpiattn.commands.cli") is None, reason="mpiattn CLI not installed"
)


def job_env(**extra: str) -> dict[str, str]:
    """The environment a job should see: this venv's bin on PATH, no outer job's SLURM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
    venv_bin = str(Path(sys.executable).parent)
    path = env.get("PATH", "").split(os.pathsep)
    if venv_bin not in path:
        env["PATH"] = os.pathsep.join([venv_bin, *path])
    env.update(extra)
    return env


def check_h5(path: Path, world_size: int) -> None:
    import h5py

    assert path.is_file(), f"{path} was not written"
    with h5py.File(path, "r") as f:
        status = f.attrs["status"]
        if isinstance(status, bytes):
            status = status.decode()
        assert status == "complete"
        assert int(f.attrs["world_size"]) == world_size
        assert "timings/seconds" in f


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = job_env(MPIATTN_SLURM_DIR=str(state))
    t0 = time.monotonic()
    subprocess.run(["bash", str(CLUSTER), "start"], env=env, check=True, timeout=600)
    print(f"\ncluster up in {time.monotonic() - t0:.1f} s (includes any apt install)")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, check=False, timeout=240)


def sbatch(env, workdir: Path, script: Path, ntasks: int, *args: str, **extra: str) -> str:
    """Submit with --wait; on failure show the job's output. Returns the job's output."""
    log = workdir / f"{script.stem}.out"
    cmd = [
        "sbatch", "--wait", "--parsable", "--export=ALL", f"--chdir={workdir}",
        f"--output={log}", "--nodes=1", f"--ntasks={ntasks}",
        f"--ntasks-per-node={ntasks}", "--cpus-per-task=1", "--time=5",
        str(script), *args,
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            cmd, env={**env, **extra}, capture_output=True, text=True, timeout=JOB_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", script.name], env=env, check=False)
        raise
    out = log.read_text() if log.exists() else "(no job output)"
    print(f"{script.name} {args[:2]} {extra}: {time.monotonic() - t0:.1f} s\n{out}")
    assert r.returncode == 0, f"sbatch rc={r.returncode}\n{r.stdout}{r.stderr}\n--- job ---\n{out}"
    return out


@slurm
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpiexec", "srun --mpi=pmi2"])
def test_run_sbatch(cluster, tmp_path, launcher):
    sbatch(cluster, tmp_path, SLURM_JOBS / "run.sbatch", 2, "-", "run.h5", *SMALL,
           LAUNCHER=launcher)  # fmt: skip
    check_h5(tmp_path / "run.h5", 2)


@slurm
@pytest.mark.slow
def test_run_sbatch_default_output(cluster, tmp_path):
    out = sbatch(cluster, tmp_path, SLURM_JOBS / "run.sbatch", 1, "", "", *SMALL)
    files = list(tmp_path.glob("mpiattn-run-*.h5"))
    assert len(files) == 1, out
    check_h5(files[0], 1)


@slurm
@pytest.mark.slow
def test_scaling_sbatch(cluster, tmp_path):
    ranks = [int(k) for k in SWEEP]
    sbatch(cluster, tmp_path, SLURM_JOBS / "scaling.sbatch", max(ranks), "-", "scaling", *SMALL,
           RANKS=" ".join(SWEEP))  # fmt: skip
    for k in ranks:
        check_h5(tmp_path / f"scaling-n{k}.h5", k)


@pytest.mark.parametrize("script", ["run.sbatch", "train.sbatch", "scaling.sbatch"])
def test_sbatch_refuses_outside_a_job(script, tmp_path):
    r = subprocess.run(
        ["bash", str(SLURM_JOBS / script)], env=job_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    assert "not inside a Slurm job" in r.stderr and "sbatch" in r.stderr
    assert not list(tmp_path.iterdir())


@needs_cli
@pytest.mark.slow
def test_local_scripts(tmp_path):
    if shutil.which("mpiexec", path=job_env()["PATH"]) is None:
        pytest.skip("no mpiexec")
    env = job_env(NP="2")
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run(
        ["bash", str(LOCAL_JOBS / "run.sh"), "-", "run.h5", *SMALL],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    check_h5(tmp_path / "run.h5", 2)
    r = subprocess.run(
        ["bash", str(LOCAL_JOBS / "scaling.sh"), "", "sweep", *SMALL],
        env=job_env(RANKS="1 2"), cwd=tmp_path, capture_output=True, text=True,
        timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for k in (1, 2):
        check_h5(tmp_path / f"sweep-n{k}.h5", k)


# --- train.sbatch: the time limit --------------------------------------------------------

# A float64 model small enough for steps of ~10-20 ms on 2 ranks: the losses of a job that
# was stopped and requeued must equal those of one uninterrupted run.
TRAIN = [
    "--set", "model.layers=2", "--set", "model.heads=4", "--set", "model.hidden=32",
    "--set", "model.ffn=64", "--set", "model.vocab=200", "--set", "model.max_positions=32",
    "--set", "input.batch=8", "--set", "input.seq_len=16", "--set", 'dtype="float64"',
    "--set", "train.eval_every=0",
]  # fmt: skip
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}  # fmt: skip


def small_corpus(tmp_path: Path) -> list[str]:
    """The first 20 kB of each corpus split, as --set options with absolute paths."""
    sets = []
    for split, key in (("train", "train.corpus"), ("heldout", "train.heldout")):
        text = (ROOT / "data" / "corpus" / f"{split}.txt").read_bytes()[:20000]
        path = tmp_path / f"{split}.txt"
        path.write_text(text.decode("utf-8", errors="ignore"), encoding="utf-8")
        sets += ["--set", f'{key}="{path}"']
    return sets


def train_here(workdir: Path, out: str, *args: str) -> Path:
    """``mpiexec -n 2 mpiattn train`` outside Slurm (the uninterrupted reference)."""
    workdir.mkdir(exist_ok=True)
    cmd = ["mpiexec", "-n", "2", "mpiattn", "train", *args, "-o", out]
    r = subprocess.run(cmd, env=job_env(OMP_NUM_THREADS="1"), cwd=workdir,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return workdir / out


def job_info(env, job: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


def follow(env, job: str, log: Path, limit: float, poll=None) -> dict[str, str]:
    """Poll the job until it ends; returns its last ``scontrol show job`` fields.

    Slurm holds a requeued job for the credential lifetime (AuthInfo cred_expire, 120 s)
    and then waits for a scheduler pass; the test releases the hold (StartTime=now) so
    that a requeue costs seconds, not minutes. The job script does not depend on it. The
    release waits a few seconds: a start in the second of the requeue reuses a revoked
    credential, and slurmd refuses to launch it ("already killed"), failing the job.
    """
    deadline = time.monotonic() + limit
    held = None
    while True:
        info = job_info(env, job)
        if info.get("JobState") in FINAL_STATES:
            return info
        if info.get("JobState") != "PENDING" or info.get("Reason") != "BeginTime":
            held = None
        elif held is None:
            held = time.monotonic()
        elif time.monotonic() - held > 5:
            held = None
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env,
                           capture_output=True, timeout=30)  # fmt: skip
        if poll is not None:
            poll(info)
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, check=False, timeout=30)
            text = log.read_text() if log.exists() else "(no job output)"
            raise AssertionError(
                f"job {job} still {info.get('JobState')} after {limit:.0f} s\n--- job ---\n{text}"
            )
        time.sleep(1)


def submit_train(
    env, workdir: Path, *options: str, args: list[str], launcher: str = "mpiexec"
) -> tuple[str, Path]:
    """``sbatch train.sbatch - out.h5 ARGS`` on 2 ranks, not waiting: (job id, its log)."""
    workdir.mkdir(exist_ok=True)
    log = workdir / "train.out"
    cmd = [
        "sbatch", "--parsable", "--export=ALL", f"--chdir={workdir}", f"--output={log}",
        "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", *options,
        str(SLURM_JOBS / "train.sbatch"), "-", "out.h5", *args,
    ]  # fmt: skip
    r = subprocess.run(cmd, env={**env, "LAUNCHER": launcher}, capture_output=True, text=True,
                       timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(";")[0], log


def check_requeued(
    info: dict[str, str], job: str, workdir: Path, log: Path, reference: Path, steps: int
) -> list[int]:
    """The job ended well after at least one requeue, with the reference's losses; returns
    the steps at which its runs were stopped."""
    import h5py
    import numpy as np

    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    restarts = int(info["Restarts"])
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR1 after (\d+) of", text)]
    assert restarts >= 1, f"never requeued (did the machine run faster than calibrated?)\n{text}"
    assert len(stops) == restarts and stops == sorted(stops) and stops[-1] < steps, text
    # each start is in the log (--open-mode=append), with Slurm's restart count
    for k in range(restarts + 1):
        assert f"job {job} (restarts: {k})" in text, text
    assert text.count("checkpointed and requeued") == restarts, text
    starts = [ln for ln in text.splitlines() if ln.startswith("+ ")]
    assert len(starts) == restarts + 1 and all("--resume auto" in ln for ln in starts), text
    check_h5(workdir / "out.h5", 2)
    with h5py.File(workdir / "out.h5", "r") as f, h5py.File(reference, "r") as ref:
        for name in ("loss", "grad_norm", "lr", "eval_loss"):
            got, want = f["train"][name][()], ref["train"][name][()]
            assert got.dtype == np.float64 and got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=name)
        assert len(f["train/loss"]) == steps
        assert int(f["train"].attrs["first_step"]) == stops[-1]
        resumed = f["train"].attrs["resumed_from"]
        resumed = resumed.decode() if isinstance(resumed, bytes) else resumed
        assert resumed == f"mpiattn-train-{job}-{stops[-1]}.h5"
    # per-job checkpoint names: one for every stop
    for s in stops:
        assert (workdir / f"mpiattn-train-{job}-{s}.h5").is_file()
    return stops


def signal_once(env, job: str, log: Path, sig: str):
    """A ``follow`` poll: ``scancel --signal=SIG --batch`` (to the batch shell only, as
    Slurm's B: warning) once the job's log shows training steps."""
    sent = []

    def poll(info: dict[str, str]) -> None:
        if sent or info.get("JobState") != "RUNNING" or not log.exists():
            return
        if re.search(r"step \d+/\d+", log.read_text()):  # training has begun: signal now
            cmd = ["scancel", f"--signal={sig}", "--batch", job]
            subprocess.run(cmd, env=env, check=True, timeout=30)
            sent.append(sig)

    return poll


@slurm
@needs_cli
@pytest.mark.slow
def test_train_sbatch_survives_time_limit(cluster, tmp_path):
    """A 1-minute job with more than a minute of training: Slurm's USR1 before the limit
    stops it with a checkpoint, the script requeues it, and it finishes after one or more
    requeues with the losses of an uninterrupted run.

    Slurm checks time limits every 30 s and sends --signal=B:USR1@10 at the first check
    at most 40 s before the end (its resolution), so on a 60 s limit the warning comes
    20-50 s after the start, never before the ranks are up, and the run has at least a
    check period (30 s) to stop before the limit. The work is sized from a short
    calibration run to ~70 s, more than any first start can do (unless the
    machine speeds up by a third between the two).
    """
    import h5py
    import numpy as np

    t0 = time.monotonic()
    data = small_corpus(tmp_path)
    cal = train_here(tmp_path / "cal", "cal.h5", *TRAIN, *data, "--set", "train.steps=300",
                     "--set", 'train.checkpoint="cal-{step}.h5"')  # fmt: skip
    with h5py.File(cal, "r") as f:
        # steps/s; the upper quartile, since a loaded machine may speed up meanwhile
        rate = float(np.percentile(f["train/tokens_per_second"][50:], 75)) / (8 * 16)
    steps = int(min(max(70 * rate, 1500), 30000))
    args = [*TRAIN, *data, "--set", f"train.steps={steps}",
            "--set", f"train.checkpoint_every={steps // 4}"]  # fmt: skip
    t1 = time.monotonic()
    reference = train_here(tmp_path / "ref", "ref.h5", *args,
                           "--set", 'train.checkpoint="ref-{step}.h5"')  # fmt: skip
    t2 = time.monotonic()
    workdir = tmp_path / "job"
    job, log = submit_train(cluster, workdir, "--time=1", "--signal=B:USR1@10", args=args)
    info = follow(cluster, job, log, limit=600)
    t3 = time.monotonic()
    print(f"\n{log.read_text()}")
    stops = check_requeued(info, job, workdir, log, reference, steps)
    print(
        f"{steps} steps (~{rate:.0f} steps/s): reference {t2 - t1:.0f} s; job {t3 - t2:.0f}"
        f" s, {len(stops)} requeue(s), stopped after steps {stops}; test {t3 - t0:.0f} s"
    )


@slurm
@needs_cli
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpiexec", "srun --mpi=pmi2"])
def test_train_sbatch_requeues_on_warning(cluster, tmp_path, launcher):
    """The same, fast and deterministic: the warning sent the way Slurm sends it
    (``scancel --signal=USR1 --batch``) a few seconds into training."""
    data = small_corpus(tmp_path)
    steps = 3000  # ~15 s on a quiet machine: the warning lands well before the end
    args = [*TRAIN, *data, "--set", f"train.steps={steps}"]
    reference = train_here(tmp_path / "ref", "ref.h5", *args,
                           "--set", 'train.checkpoint="ref-{step}.h5"')  # fmt: skip
    workdir = tmp_path / "job"
    # --time=10 keeps the script's own warning (300 s before the limit) out of the way
    job, log = submit_train(cluster, workdir, "--time=10", args=args, launcher=launcher)
    info = follow(cluster, job, log, limit=240, poll=signal_once(cluster, job, log, "USR1"))
    print(f"\n{log.read_text()}")
    stops = check_requeued(info, job, workdir, log, reference, steps)
    assert len(stops) == 1


@slurm
@needs_cli
@pytest.mark.slow
def test_train_sbatch_term_stops_without_requeue(cluster, tmp_path):
    """TERM (scancel, the limit itself) is passed on too, but not requeued: the job fails
    with mpiattn's 75, its checkpoint and partial output left for RESUME=."""
    import h5py

    args = [*TRAIN, *small_corpus(tmp_path), "--set", "train.steps=100000"]
    workdir = tmp_path / "job"
    job, log = submit_train(cluster, workdir, "--time=10", args=args)
    info = follow(cluster, job, log, limit=120, poll=signal_once(cluster, job, log, "TERM"))
    text = log.read_text()
    print(f"\n{text}")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", f"{info}\n{text}"
    assert info["Restarts"] == "0" and "requeue" not in text, text
    done = re.findall(r"stopped by SIGTERM after (\d+) of", text)
    assert len(done) == 1, text
    assert (workdir / f"mpiattn-train-{job}-{done[0]}.h5").is_file()
    with h5py.File(workdir / "out.h5", "r") as f:
        assert f.attrs["status"] in ("interrupted", b"interrupted")


@needs_cli
@pytest.mark.slow
def test_local_train_continues_after_ctrl_c(tmp_path):
    """jobs/local/train.sh: Ctrl-C stops with a checkpoint (exit 75), and the same command
    run again continues from it (--resume auto) and completes the output."""
    import h5py

    if shutil.which("mpiexec", path=job_env()["PATH"]) is None:
        pytest.skip("no mpiexec")
    cmd = ["bash", str(LOCAL_JOBS / "train.sh"), "-", "out.h5", *TRAIN,
           *small_corpus(tmp_path), "--set", "train.steps=1500"]  # fmt: skip
    log = tmp_path / "first.log"
    with log.open("w") as out:
        # a session of its own: SIGINT to its process group is a terminal's Ctrl-C
        p = subprocess.Popen(cmd, env=job_env(NP="2"), cwd=tmp_path, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while not re.search(r"step \d+/\d+", log.read_text()):
                assert p.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            os.killpg(p.pid, signal.SIGINT)
            rc = p.wait(timeout=600)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    first = log.read_text()
    assert rc == 75 and "run the same command again to continue" in first, first
    done = int(re.findall(r"stopped by SIGINT after (\d+) of", first)[0])
    r = subprocess.run(cmd, env=job_env(NP="2"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=JOB_TIMEOUT)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    check_h5(tmp_path / "out.h5", 2)
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert int(f["train"].attrs["first_step"]) == done
        assert len(f["train/loss"]) == 1500
