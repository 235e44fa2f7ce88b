"""Fuzz the readers of user files: config TOML, HDF5 token input, safetensors checkpoints.

Each reader gets a valid small file with some of its bytes mutated (bit flips, random
bytes, cuts, inserted or repeated chunks, "interesting" integers). The contract under test:
a reader either returns or raises a ``mpiattn.errors.UserError`` subclass (one clear line,
exit code 2 in the CLI). Any other exception is a crash: the harness prints it with the
reader, the exception and the innermost frame, saves the input under ``--crash-dir``, and
exits 1. A native crash (segfault in HDF5 or safetensors) kills the process, and an input
that keeps a reader busy for ``--hang-seconds`` (HDF5 looping in C, where no Python signal
handler runs) ends it through ``faulthandler`` with a "Timeout" stack dump; either way the
input being tried is on disk as ``WORK/<reader>.bin``, the path printed at start.

    python tests/fuzz/fuzz_readers.py --iterations 20000 --crash-dir crashes  # all readers
    python tests/fuzz/fuzz_readers.py --reader tokens --seed 7 --iterations 5000
    python tests/fuzz/fuzz_readers.py --replay crashes/tokens-7-123.bin --reader tokens
    PYTHONPATH=/path/to/atheris python tests/fuzz/fuzz_readers.py --atheris --reader tokens \
        --crash-dir crashes -runs=100000

Readers (``--reader``):

- ``config``: ``mpiattn.config.load`` of a TOML file; what loads must also survive the trip
  through ``to_toml`` (the ``config`` attribute of every output file) unchanged.
- ``tokens``: ``mpiattn.inputs.data.hdf5_batch`` (``input.tokens``: /input/tokens and
  /input/attention_mask); what it returns must be a valid batch.
- ``safetensors``: ``mpiattn.io.weights.SafetensorsWeights``, ``embeddings()`` and ``layer()``
  for both shards of a two-rank split.
- ``checkpoint_json``: the ``config.json`` beside a checkpoint, as a run takes it
  (``apply_checkpoint_shape``, then ``config.check_world``).
- ``verify``: ``mpiattn.io.verify.verify`` of a finished run file (a tiny ``mpiattn run``
  output plus a collectives table and a training history); a damaged file must give a list
  of one-line problems.
- ``report``: ``mpiattn.analysis.report.report`` of the same file, as text and as ``--json`` (which
  must be strict JSON).

``--atheris`` hands one reader to Google's coverage-guided fuzzer (``pip install atheris``,
not a dependency of mpiattn; the remaining arguments go to libFuzzer). Plain random
mutation, the default, needs nothing beyond the test extras and is what
``tests/fuzz/test_fuzz_readers_short.py`` runs in the suite: 200 inputs for each of
config, tokens and safetensors, about a second, and 100 each for verify and report.
Inputs are written under /dev/shm when it exists (thousands of small files), else TMPDIR;
``--work-dir`` chooses.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from mpiattn import config  # noqa: E402
from mpiattn.errors import UserError  # noqa: E402
from mpiattn.inputs import data  # noqa: E402

# The tiny model every seed file belongs to.
MODEL = {"layers": 1, "heads": 2, "hidden": 8, "ffn": 16, "vocab": 20, "type_vocab": 2,
         "max_positions": 16}
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1]


# --- seed files -----------------------------------------------------------------------

def seed_config() -> bytes:
    return b"""seed = 3
dtype = "float64"
backend = "numpy"

[model]
layers = 2
heads = 4
hidden = 64
ffn = 128
vocab = 300
max_positions = 64
layer_norm_eps = 1e-12

[input]
batch = 2
seq_len = 16
min_fill = 0.5

[parallel]
tensor = 2

[checksum]
mode = "abft"
retries = 1

[fault]
crash = [{rank = 1, layer = 0, how = "raise"}]
inject = [{rank = 1, layer = 0, site = "mlp", index = 3, bit = 20, where = "send"}]

[output]
path = "out.h5"
layers = "last"
"""


def seed_tokens(folder: Path) -> bytes:
    import h5py

    path = folder / "seed-tokens.h5"
    rng = np.random.default_rng(0)
    ids = rng.integers(1, MODEL["vocab"], size=(3, 6), dtype=np.int64)
    mask = np.ones((3, 6), np.uint8)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    with h5py.File(path, "w", libver="latest") as f:
        g = f.create_group("input")
        g.create_dataset("tokens", data=ids)
        g.create_dataset("attention_mask", data=mask)
        f.attrs["status"] = "complete"
    return path.read_bytes()


def seed_safetensors() -> bytes:
    from safetensors.numpy import save

    from mpiattn.core.shard import head_shard
    from mpiattn.io.weights import SeededWeights

    m = config.ModelConfig(**MODEL)
    src = SeededWeights(1, m, "float32")
    e = src.embeddings()
    t = {"embeddings.word_embeddings.weight": e.word,
         "embeddings.position_embeddings.weight": e.position,
         "embeddings.token_type_embeddings.weight": e.token_type,
         "embeddings.LayerNorm.weight": e.ln_g, "embeddings.LayerNorm.bias": e.ln_b}
    p = src.layer(0, head_shard(m.heads, m.hidden // m.heads, m.ffn, 1, 0))
    pre = "encoder.layer.0."
    for name, w, b in zip(("query", "key", "value"), np.split(p.w_qkv, 3, axis=1),
                          np.split(p.b_qkv, 3), strict=True):
        t[pre + f"attention.self.{name}.weight"] = w.T
        t[pre + f"attention.self.{name}.bias"] = b
    t.update({pre + "attention.output.dense.weight": p.w_o.T,
              pre + "attention.output.dense.bias": p.b_o,
              pre + "attention.output.LayerNorm.weight": p.ln1_g,
              pre + "attention.output.LayerNorm.bias": p.ln1_b,
              pre + "intermediate.dense.weight": p.w_1.T,
              pre + "intermediate.dense.bias": p.b_1,
              pre + "output.dense.weight": p.w_2.T, pre + "output.dense.bias": p.b_2,
              pre + "output.LayerNorm.weight": p.ln2_g, pre + "output.LayerNorm.bias": p.ln2_b})
    return save({k: np.ascontiguousarray(v) for k, v in t.items()})


# --- readers: each takes the path of a mutated file -----------------------------------

def read_config(path: Path) -> None:
    """Load; what loads must survive the trip through an output file's ``config`` attribute."""
    import tomllib

    cfg = config.load(path)
    again = config.from_dict(config._flatten(tomllib.loads(cfg.to_toml())))
    assert again.to_toml() == cfg.to_toml(), "config changed on its way through to_toml"


def read_tokens(path: Path) -> None:
    batch = data.hdf5_batch(path, MODEL["vocab"], MODEL["max_positions"])
    assert batch.ids.ndim == 2 and batch.ids.shape == batch.mask.shape
    assert batch.ids.dtype == np.int64 and batch.mask.dtype == bool
    assert (batch.ids >= 0).all() and (batch.ids < MODEL["vocab"]).all()
    assert batch.mask.any(axis=1).all()


def read_safetensors(path: Path) -> None:
    from mpiattn.core.shard import head_shard
    from mpiattn.io.weights import SafetensorsWeights

    m = config.ModelConfig(**MODEL)
    source = SafetensorsWeights(path, m, np.float32)
    source.embeddings()
    for rank in range(2):
        source.layer(0, head_shard(m.heads, m.hidden // m.heads, m.ffn, 2, rank))


def read_checkpoint_json(path: Path) -> None:
    """config.json beside a checkpoint: the model shape a run takes from it, as
    ``placement.apply_checkpoint_shape`` does (apply it, then check the config against a
    two-rank world)."""
    from mpiattn.commands.placement import apply_checkpoint_shape

    (path.parent / "config.json").write_bytes(path.read_bytes())
    cfg = config.Config()
    cfg.model.weights = str(path.parent / "model.safetensors")
    cfg.input.seq_len = 8  # within the seed's max_position_embeddings
    apply_checkpoint_shape(cfg)  # Config() has no explicit keys
    config.check_world(cfg, 2)


def seed_checkpoint_json() -> bytes:
    hf = {"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 8,
          "intermediate_size": 16, "vocab_size": 20, "max_position_embeddings": 16,
          "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    return json.dumps(hf, indent=1).encode()


def seed_run(folder: Path) -> bytes:
    """A tiny single-process ``mpiattn run`` output, made the same on every machine (host,
    library, time and timing values replaced, then copied into a fresh file), plus what such
    a file lacks but verify and report read: a collectives table (one failed row) and a
    training history. The same bytes everywhere keep a mutation seed's inputs the same."""
    import subprocess

    import h5py

    from mpiattn.io.collectives import RECORD_DTYPE, site_codes

    tiny = {"model.layers": 1, "model.heads": 2, "model.hidden": 8, "model.ffn": 16,
            "model.vocab": 20, "input.batch": 2, "input.seq_len": 4}
    sets = [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
        str(ROOT), os.environ.get("PYTHONPATH"))))}
    subprocess.run([sys.executable, "-m", "mpiattn", "run", *sets, "-o", "raw.h5",
                    "--force"], check=True, capture_output=True, cwd=folder, env=env,
                   timeout=120)
    path = folder / "seed-run.h5"
    with h5py.File(folder / "raw.h5", "r") as raw, h5py.File(path, "w", libver="latest") as f:
        for name in sorted(raw):
            raw.copy(raw[name], f, name)
        for key in sorted(raw.attrs):
            value = raw.attrs[key]
            f.attrs[key] = "fixed" if isinstance(value, str) and key not in (
                "config", "status", "command", "attention", "backend") else value
        for name in ("timings/forward", "timings/setup", "timings/total", "timings/seconds",
                     "ranks/peak_memory"):
            f[name][...] = 1
        f["ranks/host"][...] = "node0"
        f["ranks/device"][...] = "cpu"
        untimed = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
        untimed.set_obj_track_times(False)  # no creation time in the group's header
        for group in (b"checksum", b"train"):
            h5py.h5g.create(f.id, group, gcpl=untimed)
        table = np.zeros(2, RECORD_DTYPE)
        table["passed"] = [1, 0]
        table["site"] = site_codes(["attention", "mlp"])
        f["checksum/collectives"] = table
        for name, values in (("loss", [7.0, 6.5, 6.0]), ("eval_loss", [6.2]),
                             ("eval_step", [3]), ("step", [1, 2, 3]),
                             ("tokens_per_second", [900.0, 1000.0, 1100.0])):
            f[f"train/{name}"] = np.asarray(values)
    return path.read_bytes()


def read_verify(path: Path) -> None:
    """A list of one-line problems (or a UserError when the file cannot be opened)."""
    from mpiattn.io.verify import verify

    problems = verify(path)
    assert isinstance(problems, list)
    assert all(isinstance(p, str) and p and "\n" not in p for p in problems), problems


def read_report(path: Path) -> None:
    """The text report and the JSON report; the JSON must parse strictly (no NaN)."""
    import contextlib
    import io

    from mpiattn.analysis.report import report

    for as_json in (False, True):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert report([str(path)], as_json=as_json) == 0
        if as_json:
            json.loads(out.getvalue(), parse_constant=_no_constant)


def _no_constant(name: str) -> None:
    raise AssertionError(f"report --json printed {name}: not JSON")


READERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "config": (read_config, "config.toml"),
    "tokens": (read_tokens, "tokens.h5"),
    "safetensors": (read_safetensors, "model.safetensors"),
    "checkpoint_json": (read_checkpoint_json, "config.json.in"),
    "verify": (read_verify, "run.h5"),
    "report": (read_report, "run.h5"),
}


def seeds(folder: Path, readers: list[str]) -> dict[str, bytes]:
    """The valid seed file of each of ``readers`` (the run file is made once, by a
    single-process ``mpiattn run``, only when verify or report needs it)."""
    makers: dict[str, Callable[[], bytes]] = {
        "config": seed_config, "tokens": lambda: seed_tokens(folder),
        "safetensors": seed_safetensors, "checkpoint_json": seed_checkpoint_json}
    out = {name: makers[name]() for name in readers if name in makers}
    if {"verify", "report"} & set(readers):
        run = seed_run(folder)
        out.update({name: run for name in ("verify", "report") if name in readers})
    return out


# --- mutation -------------------------------------------------------------------------

def mutate(rng: random.Random, seed: bytes) -> bytes:
    """One to four random edits of ``seed``."""
    buf = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        n = len(buf)
        op = rng.randrange(8) if n else 6
        pos = rng.randrange(n) if n else 0
        if op == 0:  # flip one bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # random bytes
            for i in range(pos, min(n, pos + rng.randint(1, 8))):
                buf[i] = rng.randrange(256)
        elif op == 2:  # cut the tail (truncated file)
            del buf[rng.randrange(n):]
        elif op == 3:  # delete a chunk
            del buf[pos : pos + rng.randint(1, 64)]
        elif op == 4:  # repeat a chunk
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 64)]
        elif op == 5:  # an interesting integer, little-endian, 1..8 bytes
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[pos : pos + width] = value.to_bytes(width, "little")
        elif op == 6:  # insert random bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:  # ASCII digits or a sign: turns numbers in text formats into odd ones
            buf[pos : pos + 1] = rng.choice([b"-", b"9", b"0", b"99999999999", b"1e309",
                                             b"nan", b"inf", b'"', b"[", b"{", b"."])
    return bytes(buf)


# --- the loop -------------------------------------------------------------------------

class Crash(Exception):
    pass


HANG_SECONDS = 60.0  # one input taking longer than this is a hang (the process ends)


def try_one(reader: str, payload: bytes, work: Path, hang_s: float = HANG_SECONDS) -> bool:
    """Feed ``payload`` to ``reader``: True if read, False if rejected with a UserError;
    raise Crash on anything else; end the process (faulthandler) after ``hang_s`` seconds."""
    func, name = READERS[reader]
    folder = work / reader
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(payload)
    (work / f"{reader}.bin").write_bytes(payload)  # survives a native crash
    if reader == "checkpoint_json":
        (folder / "model.safetensors").touch()
    faulthandler.dump_traceback_later(hang_s, exit=True)
    try:
        func(path)
    except UserError:
        return False
    except Exception as err:  # the crash the harness is looking for
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise Crash(f"{reader}: {type(err).__name__}: {err} (at {Path(frame.filename).name}:"
                    f"{frame.lineno} in {frame.name})") from err
    finally:
        faulthandler.cancel_dump_traceback_later()
    return True


def fuzz(readers: list[str], iterations: int, seed: int, crash_dir: Path | None,
         work: Path, verbose: bool = True, hang_s: float = HANG_SECONDS) -> list[str]:
    """Run ``iterations`` mutated inputs per reader; the distinct crash lines found."""
    base = seeds(work, readers)
    found: dict[str, str] = {}
    for reader in readers:
        rng = random.Random(f"{seed}-{reader}")
        try_one(reader, base[reader], work)  # the seed itself must be read cleanly
        start = time.perf_counter()
        read = rejected = 0
        for i in range(iterations):
            payload = mutate(rng, base[reader])
            try:
                if try_one(reader, payload, work, hang_s):
                    read += 1
                else:
                    rejected += 1
            except Crash as crash:
                line = str(crash)
                key = line.split(" (at ")[-1] + type(crash.__cause__).__name__
                if key in found:
                    continue
                found[key] = line
                if crash_dir is not None:
                    crash_dir.mkdir(parents=True, exist_ok=True)
                    saved = crash_dir / f"{reader}-{seed}-{i}.bin"
                    saved.write_bytes(payload)
                    line += f" -> {saved}"
                    found[key] = line
                if verbose:
                    print("CRASH", line, flush=True)
        if verbose:
            print(f"{reader}: {iterations} inputs in {time.perf_counter() - start:.1f} s:"
                  f" {read} read, {rejected} rejected (UserError),"
                  f" {iterations - read - rejected} crashed", flush=True)
    return list(found.values())


def run_atheris(reader: str, work: Path, crash_dir: Path, argv: list[str]) -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("--atheris needs atheris: pip install atheris (not a dependency of mpiattn)")
    base = seeds(work, [reader])
    crash_dir.mkdir(parents=True, exist_ok=True)

    def one(payload: bytes) -> None:
        try:
            try_one(reader, payload, work)
        except Crash as crash:
            raise crash.__cause__ from None  # atheris reports the original exception

    # libFuzzer starts from a corpus folder holding the valid seed
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "seed").write_bytes(base[reader])
    atheris.instrument_all()  # coverage of every module loaded so far (mpiattn, h5py's Python)
    atheris.Setup([sys.argv[0], f"-artifact_prefix={crash_dir}/", *argv, str(corpus)], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000, help="inputs per reader")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    ap.add_argument("--reader", action="append", choices=sorted(READERS),
                    help="reader to fuzz (repeatable; default: all)")
    ap.add_argument("--crash-dir", type=Path, default=None, help="save crashing inputs here")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the inputs are written (default: /dev/shm, else TMPDIR)")
    ap.add_argument("--hang-seconds", type=float, default=HANG_SECONDS,
                    help="end the run when one input takes longer (a hang in C code)")
    ap.add_argument("--replay", type=Path, help="feed one saved input to --reader and stop")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided, one reader")
    args, rest = ap.parse_known_args(argv)
    readers = args.reader or sorted(READERS)
    shm = Path("/dev/shm")  # thousands of small files: memory, not a (shared, slow) disk
    where = args.work_dir or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    with tempfile.TemporaryDirectory(prefix="mpiattn-fuzz-", dir=where) as tmp:
        work = Path(tmp)
        print(f"work folder {work} (the input being tried is WORK/<reader>.bin)", flush=True)
        if args.replay:
            try_one(readers[0], args.replay.read_bytes(), work, args.hang_seconds)  # a Crash
            # shows its traceback, a hang faulthandler's stack dump
            print("no crash")
            return 0
        if args.atheris:
            run_atheris(readers[0], work, args.crash_dir or Path("fuzz-crashes"), rest)
            return 0
        if rest:
            ap.error(f"unknown arguments {rest}")
        crashes = fuzz(readers, args.iterations, args.seed, args.crash_dir, work,
                       hang_s=args.hang_seconds)
    print(f"{len(crashes)} distinct crash(es)" if crashes else "no crashes")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
