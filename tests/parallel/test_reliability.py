"""Reliability, end to end: what a user sees when a rank dies, the disk fills, or an input
is wrong. Every test drives the real command line in a subprocess (``mpiexec -n K`` where
the rank count matters) and checks the exit code, the one line printed and the files left.

Failure policy (mpiattn/commands/cli.py): a UserError -> one line from rank 0, exit 2; an integrity
failure -> exit 3; anything else -> printed by the failing rank with its rank, then
``COMM_WORLD.Abort`` ends the job. Output is written to an exclusive temporary and renamed when
complete, so no failure leaves a complete-looking file under the output name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

TINY = {"model.layers": 2, "model.hidden": 64, "model.heads": 4, "model.ffn": 128,
        "model.vocab": 300, "model.max_positions": 64, "input.batch": 2, "input.seq_len": 16}
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
HANG = 120  # seconds: a job still running then is a hang (the test kills its process group)


def sets(flat: dict | None = None) -> list[str]:
    """--set arguments for TINY updated with ``flat``."""
    out = []
    for key, value in {**TINY, **(flat or {})}.items():
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, str) else value}"]
    return out


def mpiattn(*args: str, ranks: int | None = None, cwd: Path,
            wrapper: list[str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI (under ``mpiexec -n ranks`` if given); (result, wall seconds). A job that
    outlives HANG seconds is killed with its whole process group and fails the test."""
    cmd = [sys.executable, *(wrapper or ["-m", "mpiattn"]), *args]
    if ranks:
        if not Path(MPIEXEC).exists():
            pytest.skip("mpiexec not found")
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                         os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {HANG} s")
    seconds = time.perf_counter() - start
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seconds


def error_lines(stderr: str) -> list[str]:
    """The lines mpiattn itself printed (not Python warnings, tracebacks or MPI banners)."""
    return [line for line in stderr.splitlines() if line.startswith("mpiattn:")
            and not line.startswith(("mpiattn: warning:", "mpiattn: note:"))]


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """Assert exit 2 and exactly one line on stderr, from mpiattn; return it."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("mpiattn: error: "), done.stderr
    return lines[0]


def is_complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("status") in ("complete", b"complete")
    except OSError:  # not even readable: certainly not a complete file
        return False


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- a rank fails ---------------------------------------------------------------------

def test_raise_on_rank_2_of_4_ends_the_job_once_named(tmp_path):
    crash = 'fault.crash=[{rank=2, layer=1, how="raise"}]'
    done, seconds = mpiattn("run", *sets(), "--set", crash, "-o", "out.h5", ranks=4,
                            cwd=tmp_path)
    print(f"raise on rank 2 of 4: exit {done.returncode} after {seconds:.2f} s")
    assert done.returncode != 0  # a hang fails at HANG
    assert error_lines(done.stderr) == [
        "mpiattn: rank 2: RuntimeError: injected crash on rank 2 in layer 1"], done.stderr
    assert list(tmp_path.iterdir()) == []  # no output, not even a temporary file


@pytest.mark.parametrize("rank", [2, 0])  # a compute rank; the rank that would write
def test_sigkill_of_one_rank_ends_the_job_and_leaves_nothing(tmp_path, rank):
    crash = f'fault.crash=[{{rank={rank}, layer=1, how="kill"}}]'
    done, seconds = mpiattn("run", *sets(), "--set", crash, "-o", "out.h5", ranks=4,
                            cwd=tmp_path)
    print(f"SIGKILL of rank {rank} of 4: exit {done.returncode} after {seconds:.2f} s")
    assert done.returncode != 0  # a hang fails at HANG
    assert not (tmp_path / "out.h5").exists()
    # Killed mid-forward, before rank 0 opened the file: nothing at all is left. (A kill
    # during the write leaves only an incomplete temporary: the next test.)
    assert list(tmp_path.iterdir()) == []


WRITE_THEN_DIE = """
import os, signal, sys
from mpiattn.commands import cli
from mpiattn.io import h5io

real = h5io.write_array

def write_then_die(group, name, *args, **kwargs):
    out = real(group, name, *args, **kwargs)
    if name == "hidden":  # layer 0 is on disk, the rest is not
        group.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return out

h5io.write_array = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_while_writing_leaves_no_complete_looking_file(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(WRITE_THEN_DIE)
    work = tmp_path / "work"
    work.mkdir()
    done, _ = mpiattn("run", *sets(), "-o", "out.h5", cwd=work, wrapper=[str(script)])
    assert done.returncode == -signal.SIGKILL
    assert not (work / "out.h5").exists()
    left = list(work.iterdir())  # the file is built in memory: at most a hidden temporary
    assert all(p.name.startswith(".out.h5.tmp-") for p in left)
    for tmp in left:
        assert not is_complete(tmp)
        check, _ = mpiattn("verify", str(tmp), cwd=work)
        assert check.returncode == 1 and "FAILED" in check.stdout
    again, _ = mpiattn("run", *sets(), "-o", "out.h5", cwd=work)  # a rerun is not blocked
    assert again.returncode == 0, again.stderr
    assert is_complete(work / "out.h5")


# --- the disk fills -------------------------------------------------------------------

# About 800 KB of output: one file fits in 1 MiB, a second one (the --force rewrite) not.
BIG = {"model.layers": 3, "input.batch": 8, "input.seq_len": 64}

LIMITED = """
import resource, signal, sys
from mpi4py import MPI  # shared memory of the MPI library first: it would hit the limit

MPI.COMM_WORLD.Barrier()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
from mpiattn.commands.cli import main

sys.exit(main(sys.argv[2:]))
"""


def _rewrite_over_good_file(tmp_path: Path, variant: str) -> dict:
    """A good file, then ``run --force`` over it where the write cannot finish."""
    good = tmp_path / "good"
    good.mkdir()
    made, _ = mpiattn("run", *sets(BIG), "-o", "out.h5", cwd=good)
    assert made.returncode == 0, made.stderr
    size = (good / "out.h5").stat().st_size
    assert 600_000 < size < 1_000_000
    disk = tmp_path / "disk"
    disk.mkdir()
    wrapper = None
    if variant == "tmpfs":  # needs root (CI and developer machines here are)
        if not shutil.which("mount"):
            return {"skip": "no mount command"}
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                 capture_output=True)
        if mounted.returncode:
            return {"skip": f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}"}
    else:  # an injected write error, no root needed: files may not grow past half the output
        script = tmp_path / "limited.py"
        script.write_text(LIMITED)
        wrapper = [str(script), str(size // 2)]
    try:
        shutil.copy(good / "out.h5", disk / "out.h5")
        before = digest(disk / "out.h5")
        done, seconds = mpiattn("run", *sets(BIG), "-o", str(disk / "out.h5"),
                                "--force", ranks=2, cwd=tmp_path, wrapper=wrapper)
        check, _ = mpiattn("verify", str(disk / "out.h5"), cwd=tmp_path)
        return {"done": done, "seconds": seconds, "before": before,
                "after": digest(disk / "out.h5"), "verify": check,
                "left": sorted(p.name for p in disk.iterdir()), "path": str(disk / "out.h5")}
    finally:
        if variant == "tmpfs":
            subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture(scope="module", params=["tmpfs", "fsize-limit"])
def full_disk(request, tmp_path_factory):
    result = _rewrite_over_good_file(tmp_path_factory.mktemp(request.param), request.param)
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def test_full_disk_keeps_the_previous_file_intact(full_disk):
    r = full_disk
    print(f"write failure: exit {r['done'].returncode} after {r['seconds']:.2f} s")
    assert r["done"].returncode != 0
    assert r["after"] == r["before"]  # byte for byte the earlier good file
    assert r["verify"].returncode == 0 and "OK" in r["verify"].stdout
    assert r["left"] == ["out.h5"]  # the temporary was removed


def test_full_disk_is_one_clear_line(full_disk):
    line = one_line_error(full_disk["done"])
    assert "cannot write" in line and full_disk["path"] in line


# --- bad configuration ----------------------------------------------------------------

@pytest.mark.parametrize(("ranks", "args", "message"), [
    (None, ["--set", "model.layer=2"],
     "unknown config key 'model.layer': did you mean 'model.layers'?"),
    (None, ["--set", 'model.heads="four"'], "config key 'model.heads' must be int, got str"),
    (None, ["--set", "input.seq_len=2.5"], "config key 'input.seq_len' must be int, got float"),
    (None, ["--set", "model.hidden=0"], "config key 'model.hidden' must be positive, got 0"),
    (None, ["--set", "input.batch=-2"], "config key 'input.batch' must be positive, got -2"),
    (None, ["--set", "model.layer_norm_eps=nan"],
     "config key 'model.layer_norm_eps' is nan: give a finite number"),
    (None, ["--set", "input.seq_len=65"],
     "input.seq_len = 65 exceeds model.max_positions = 64"),
    (5, ["--set", "parallel.tensor=5"],
     "parallel.tensor = 5 head ranks but model.heads = 4"),
    (3, ["--set", "parallel.tensor=2"], "parallel.tensor = 2 does not divide the 3 ranks"),
], ids=["unknown-key", "wrong-type", "float-for-int", "zero", "negative", "nan", "seq-too-long",
        "more-head-ranks-than-heads", "tensor-does-not-divide"])
def test_bad_config_is_one_line_exit_2(tmp_path, ranks, args, message):
    done, _ = mpiattn("run", *sets(), *args, "-o", "out.h5", ranks=ranks, cwd=tmp_path)
    assert message in one_line_error(done)  # one line even from 5 ranks: rank 0 prints
    assert list(tmp_path.iterdir()) == []


def test_bad_toml_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "job.toml").write_text("[model]\nheads = 4\nheads = 5\n")
    done, _ = mpiattn("run", "job.toml", cwd=tmp_path)
    assert "config file 'job.toml' is not valid TOML" in one_line_error(done)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny BERT checkpoint (the TINY shape, with config.json) and broken copies."""
    from safetensors.numpy import save_file
    from test_weights import export_hf

    from mpiattn import config
    from mpiattn.io.weights import SeededWeights

    m = config.from_dict(TINY).model
    tensors = export_hf(SeededWeights(1, m, "float32"), m)
    hf = {"model_type": "bert", "num_hidden_layers": m.layers, "num_attention_heads": m.heads,
          "hidden_size": m.hidden, "intermediate_size": m.ffn, "vocab_size": m.vocab,
          "max_position_embeddings": m.max_positions, "type_vocab_size": m.type_vocab}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(name: str, change=None) -> Path:
        t = dict(tensors)
        if change:
            change(t)
        folder = root / name
        folder.mkdir()
        save_file(t, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(hf))
        return folder

    def poison(key: str, where: tuple):
        def change(t):
            t[key] = t[key].copy()
            t[key][where] = np.inf
        return change

    out = {
        "good": make("good"),
        "missing": make("missing", lambda t: t.pop("encoder.layer.1.output.dense.bias")),
        "shape": make("shape", lambda t: t.update({
            "encoder.layer.0.attention.self.query.bias": np.zeros(63, np.float32)})),
        "inf-mlp": make("inf-mlp", poison("encoder.layer.1.intermediate.dense.weight", (3, 5))),
        "inf-attention": make("inf-attention",
                              poison("encoder.layer.0.attention.self.query.weight", (3, 5))),
    }
    good = (out["good"] / "model.safetensors").read_bytes()
    for name, data in (("not-safetensors", b"this is not a checkpoint\n" * 10),
                       ("truncated", good[: len(good) // 2])):
        folder = root / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data)
        out[name] = folder
    return out


def test_heads_not_matching_the_checkpoint(tmp_path, checkpoints):
    done, _ = mpiattn("run", *sets({"model.weights": str(checkpoints["good"])}), "--set",
                      "model.heads=8", "-o", "out.h5", cwd=tmp_path)
    assert "model.heads = 8 but the checkpoint has 4" in one_line_error(done)


def test_sequence_longer_than_the_checkpoint_positions(tmp_path, checkpoints):
    """model.max_positions comes from config.json (64): checked after it is applied."""
    args = ["--set", f"model.weights={json.dumps(str(checkpoints['good']))}",
            "--set", "input.batch=2", "--set", "input.seq_len=100", "-o", "out.h5"]
    done, _ = mpiattn("run", *args, cwd=tmp_path)
    assert "input.seq_len = 100 exceeds model.max_positions = 64" in one_line_error(done)


# --- bad input files ------------------------------------------------------------------

def token_file(path: Path, ids=None, mask=None, shape=None, dtype=None) -> Path:
    with h5py.File(path, "w") as f:
        g = f.create_group("input")
        if shape is not None:  # declared, never written: nothing allocated on disk
            g.create_dataset("tokens", shape=shape, dtype=dtype)
        elif ids is not None:
            g.create_dataset("tokens", data=ids)
        if mask is not None:
            g.create_dataset("attention_mask", data=mask)
    return path


GOOD_IDS = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], np.int64)


def bad_token_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the phrase the error must contain)."""
    nan_ids = GOOD_IDS.astype(np.float64)
    nan_ids[0, 1] = np.nan
    good = token_file(folder / "good.h5", GOOD_IDS)
    cut = folder / "truncated.h5"
    cut.write_bytes(good.read_bytes()[:1500])
    text = folder / "text.h5"
    text.write_text("5 6 7 0\n8 9 0 0\n")
    cases = {
        "1-D": (token_file(folder / "flat.h5", GOOD_IDS.ravel()), "must be 2-D (batch, seq)"),
        "float": (token_file(folder / "float.h5", GOOD_IDS.astype(np.float32)),
                  "is float32: token ids must be integers"),
        "NaN": (token_file(folder / "nan.h5", nan_ids), "contains NaN or Inf"),
        "strings": (token_file(folder / "str.h5", np.array([[b"a", b"b"]])),
                    "token ids must be integers"),
        "absurd-shape": (token_file(folder / "huge.h5", shape=(10**9, 10**6), dtype="i8"),
                         "declares shape (1000000000, 1000000)"),  # h5safe, at open
        "absurd-batch": (token_file(folder / "huge2.h5", shape=(2**26, 64), dtype="i8"),
                         "declares shape (67108864, 64)"),
        "seq-too-long": (token_file(folder / "long.h5", np.ones((2, 65), np.int64)),
                         "sequences of 65 tokens, more than model.max_positions = 64"),
        "id-out-of-vocab": (token_file(folder / "vocab.h5", GOOD_IDS + 295),
                            "outside [0, model.vocab = 300)"),
        "negative-id": (token_file(folder / "neg.h5", GOOD_IDS - 1), "outside [0, model.vocab"),
        "mask-not-0-1": (token_file(folder / "mask2.h5", GOOD_IDS, mask=np.full((2, 4), 2)),
                         "values other than 0 and 1"),
        "mask-shape": (token_file(folder / "mask3.h5", GOOD_IDS, mask=np.ones((2, 3), "u1")),
                       "/input/attention_mask has shape (2, 3)"),
        "empty-row": (token_file(folder / "row.h5", GOOD_IDS,
                                 mask=np.array([[1, 1, 0, 0], [0, 0, 0, 0]], "u1")),
                      "row 1 has no real tokens"),
        "no-dataset": (token_file(folder / "none.h5"), "/input/tokens is missing"),
        "truncated": (cut, "not a readable HDF5"),
        "not-hdf5": (text, "not a readable HDF5"),
        "absent": (folder / "absent.h5", "the file does not exist"),
    }
    return cases


TOKEN_CASES = ["1-D", "float", "NaN", "strings", "absurd-shape", "absurd-batch", "seq-too-long",
               "id-out-of-vocab", "negative-id", "mask-not-0-1", "mask-shape", "empty-row",
               "no-dataset", "truncated", "not-hdf5", "absent"]


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    return bad_token_files(tmp_path_factory.mktemp("tokens"))


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_bad_token_file_is_one_input_error_naming_it(token_files, case):
    """Every case in process (fast); the CLI turns any InputError into the same one line
    and exit 2, shown for two of them below (one rank, and two ranks that agree)."""
    from helpers import tiny

    from mpiattn.errors import InputError
    from mpiattn.inputs.data import load_batch

    path, message = token_files[case]
    cfg = tiny(model__max_positions=64, model__vocab=300, input__seq_len=16,
               input__tokens=str(path))
    with pytest.raises(InputError) as err:
        load_batch(cfg)
    line = str(err.value)
    assert "\n" not in line and f"input.tokens = '{path}'" in line and message in line


@pytest.mark.parametrize(("case", "ranks"), [("truncated", None), ("NaN", 2)])
def test_bad_token_file_on_the_command_line(tmp_path, token_files, case, ranks):
    path, message = token_files[case]
    done, _ = mpiattn("run", *sets(), "--set", f"input.tokens={json.dumps(str(path))}",
                      "-o", "out.h5", ranks=ranks, cwd=tmp_path)
    line = one_line_error(done)  # one line from two ranks too: rank 0 prints
    assert f"input.tokens = '{path}'" in line and message in line
    assert list(tmp_path.iterdir()) == []


def test_absurd_declared_size_is_refused_before_reading(token_files):
    """In process, with the allocator traced: the refusal allocates (almost) nothing."""
    import tracemalloc

    from mpiattn.errors import InputError
    from mpiattn.inputs.data import hdf5_batch

    for case in ("absurd-shape", "absurd-batch"):
        path, message = token_files[case]
        assert path.stat().st_size < 10_000  # declared, not stored
        tracemalloc.start()
        with pytest.raises(InputError, match=re.escape(message)):
            hdf5_batch(path, 300, 64 if case == "absurd-shape" else 512)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1_000_000, f"{case}: {peak} bytes traced"


def test_token_file_replays_a_run_bit_for_bit(tmp_path):
    """input.tokens = a run file: the same input, the same numbers (same rank count)."""
    first, _ = mpiattn("run", *sets(), "-o", "first.h5", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again, _ = mpiattn("run", *sets({"input.tokens": "first.h5", "input.batch": 1}),
                       "-o", "again.h5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    with h5py.File(tmp_path / "first.h5") as a, h5py.File(tmp_path / "again.h5") as b:
        for name in ("input/tokens", "input/attention_mask", "layers/01/hidden"):
            np.testing.assert_array_equal(a[name][()], b[name][()])


CHECKPOINT_CASES = {
    "missing": "tensor 'encoder.layer.1.output.dense.bias' is missing",
    "shape": "tensor 'encoder.layer.0.attention.self.query.bias' has shape (63,),"
             " the model needs (64,)",
    "not-safetensors": "is not a readable safetensors file",
    "truncated": "is not a readable safetensors file",
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint_is_one_input_error_naming_it(checkpoints, case):
    """In process, every tensor a run would read; the CLI is shown below."""
    from helpers import tiny

    from mpiattn.core.shard import head_shard
    from mpiattn.errors import InputError
    from mpiattn.io.weights import open_source

    m = tiny(model__heads=4, model__hidden=64, model__ffn=128, model__vocab=300,
             model__max_positions=64, model__weights=str(checkpoints[case])).model
    with pytest.raises(InputError) as err:
        source = open_source(0, m, "float32")
        source.embeddings()
        for rank in range(2):
            for layer in range(m.layers):
                source.layer(layer, head_shard(m.heads, m.hidden // m.heads, m.ffn, 2, rank))
    line = str(err.value)
    assert "\n" not in line and str(checkpoints[case] / "model.safetensors") in line
    assert CHECKPOINT_CASES[case] in line


def test_bad_checkpoint_on_the_command_line(tmp_path, checkpoints):
    folder = checkpoints["missing"]
    done, _ = mpiattn("run", *sets({"model.weights": str(folder)}), "-o", "out.h5", ranks=2,
                      cwd=tmp_path)
    line = one_line_error(done)
    assert str(folder / "model.safetensors") in line and CHECKPOINT_CASES["missing"] in line


@pytest.mark.parametrize(("content", "message"), [
    (b"", "the file is empty"),
    (b"ok\ncaf\xe9 au lait\n", "line 2: not UTF-8 (byte 3 of the line)"),
], ids=["empty", "latin-1"])  # blank lines are rows now (test_input_exactness.py)
def test_bad_text_file_is_one_line_naming_it(tmp_path, content, message):
    from model_folders import minilm

    path = tmp_path / "sentences.txt"
    path.write_bytes(content)
    tokenizer = minilm() / "tokenizer.json"  # a tokenizer, so the file is what is wrong
    done, _ = mpiattn("run", *sets({"input.tokenizer": str(tokenizer), "model.vocab": 30522}),
                      "--set", "input.text=\"sentences.txt\"", "-o", "out.h5", cwd=tmp_path)
    line = one_line_error(done)
    assert "input.text = 'sentences.txt'" in line and message in line


# --- non-finite activations -----------------------------------------------------------

@pytest.mark.parametrize(("case", "layer", "site"), [("inf-mlp", 1, "mlp"),
                                                      ("inf-attention", 0, "attention")])
def test_inf_in_a_weight_stops_the_run_naming_layer_and_site(tmp_path, checkpoints, case,
                                                             layer, site):
    """The checksum sees the inf first (its |P| row is not finite: no retry); with checksums
    off, check.finite stops the run after the block. Either way: layer and site, exit 4."""
    weights = {"model.weights": str(checkpoints[case])}
    done, _ = mpiattn("run", *sets(weights), "-o", "out.h5", ranks=2,
                      cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert f"at layer {layer} site '{site}'" in done.stderr
    unchecked, _ = mpiattn("run", *sets(weights | {"checksum.mode": "off"}),
                           "-o", "out.h5", ranks=2, cwd=tmp_path)
    assert unchecked.returncode != 0
    assert f"non-finite activations at layer {layer} after the {site} block" in \
        unchecked.stderr
    assert list(tmp_path.iterdir()) == []


def test_non_finite_activations_are_one_line(tmp_path, checkpoints):
    weights = {"model.weights": str(checkpoints["inf-mlp"]), "checksum.mode": "off"}
    done, _ = mpiattn("run", *sets(weights), "-o", "out.h5", ranks=2,
                      cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 4 and len(lines) == 1, done.stderr
    assert "non-finite" in lines[0] and "layer 1" in lines[0]


# --- config.json beside a checkpoint --------------------------------------------------

@pytest.mark.parametrize("text", [
    "[1]",
    '{"model_type": "bert", "num_attention_heads": 0}',
    '{"model_type": "bert", "hidden_size": 1e999}',
    '{"model_type": "bert", "num_hidden_layers": [2]}',
    '{"model_type": "bert", "num_hidden_layers": 2.7}',
    '{"model_type": "bert", "num_hidden_layers": -2}',
    '{"model_type": "bert", "max_position_embeddings": 8}',  # below input.seq_len = 16
    "{not json",
])
def test_bad_checkpoint_config_json_is_a_user_error(tmp_path, checkpoints, text):
    """What a run does with config.json: apply it, then check the world (in process)."""
    from mpiattn import config
    from mpiattn.commands.placement import apply_checkpoint_shape
    from mpiattn.errors import UserError

    shutil.copy(checkpoints["good"] / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(text)
    cfg = config.from_dict({"model.weights": str(tmp_path), "input.seq_len": 16,
                            "input.batch": 2})
    cfg.explicit = set()  # as if model.* came from defaults only
    with pytest.raises(UserError) as err:
        apply_checkpoint_shape(cfg)
        config.check_world(cfg, 2)
    assert "\n" not in str(err.value)
