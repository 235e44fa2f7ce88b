"""The last step of jobs/gpu/check.sh: one file holding every step's output, and one line
per step saying whether it passed, how long it took and its figures.

    python jobs/gpu/summary.py OUT_DIR      -> OUT_DIR/gpu-check.h5, a table on stdout

Reads ``OUT_DIR/steps.tsv`` (``name<TAB>verdict<TAB>seconds`` per step, written by
check.sh) and the files the steps wrote: ``run-gpu.h5``, ``bench-gpu.h5``,
``scaling/scaling.h5``, ``gpu-tests.xml``, ``nvidia-smi.csv``, whichever exist.
``gpu-check.h5`` holds a group per file (its datasets and attributes), the JUnit XML
(``tests_junit``), the steps (``steps``, JSON: name, verdict, seconds, figures) and
``status``: ``complete`` when every step passed, else ``failed: <steps>``. Exit 1 when a
step failed or is missing.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np

STEPS = ("tests", "run", "verify", "bench", "scaling")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_figures(out: Path) -> str:
    """'N passed, F failed, S skipped' from the JUnit XML."""
    path = out / "gpu-tests.xml"
    if not path.exists():
        return "no JUnit report"
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = n["failures"] + n["errors"]
    return f"{n['tests'] - failed - n['skipped']} passed, {failed} failed, {n['skipped']} skipped"


def run_figures(out: Path) -> str:
    """The main job: device, forward seconds, peak device memory, transfer mode, timing."""
    path = out / "run-gpu.h5"
    if not path.exists():
        return "no run-gpu.h5"
    with h5py.File(path, "r") as f:
        device = _text(f["ranks/device"][0])
        forward = float(np.max(f["timings/forward"][()]))
        peak = float(np.max(f["ranks/peak_memory"][()]))
        mode, timing = _text(f.attrs.get("cuda_aware", "?")), _text(f.attrs.get("timing", "?"))
    return (f"{device}: forward {forward:.3f} s, peak memory {peak / 2**30:.2f} GiB,"
            f" CUDA-aware MPI {mode}, times from {timing}")


def bench_figures(out: Path) -> str:
    """The layer's rate and share of the GEMM limit, the sweep's longest point."""
    path = out / "bench-gpu.h5"
    if not path.exists():
        return "no bench-gpu.h5"
    with h5py.File(path, "r") as f:
        layer = f["bench/layer"].attrs
        text = (f"layer {layer['median_s'] * 1e3:.2f} ms, {layer['flops_per_second'] / 1e9:.1f}"
                f" GFLOP/s = {layer['fraction_of_peak']:.2f} of the GEMM limit")
        if "bench/sweep" in f:
            seq, seconds, rate = f["bench/sweep"][-1]
            text += (f"; sweep seq {int(seq)}: {seconds * 1e3:.1f} ms,"
                     f" {rate / 1e9:.1f} GFLOP/s")
        text += f"; times from {_text(f.attrs.get('timing', '?'))}"
    return text


def scaling_figures(out: Path) -> str:
    """Predicted against measured forward at the rank counts outside the fit."""
    path = out / "scaling/scaling.h5"
    if not path.exists():
        return "no scaling.h5"
    with h5py.File(path, "r") as f:
        ranks, fit, error = f["ranks"][()], f["in_fit"][()], f["error"][()]
    outside = ", ".join(f"{r} ranks {100 * e:+.0f}%" for r, k, e in zip(ranks, fit, error,
                                                                         strict=True) if not k)
    return f"plan's prediction vs measured forward (out of the fit): {outside}"


FIGURES = {"tests": test_figures, "run": run_figures, "verify": lambda out: "run-gpu.h5 valid",
           "bench": bench_figures, "scaling": scaling_figures}


def steps(out: Path) -> list[dict]:
    """Every step of check.sh in order: name, verdict, seconds, figures (or why none)."""
    seen: dict[str, tuple[str, int]] = {}
    tsv = out / "steps.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            name, verdict, seconds = line.split("\t")
            seen[name] = (verdict, int(seconds))
    rows = []
    for name in STEPS:
        verdict, seconds = seen.get(name, ("not run", 0))
        try:
            figures = FIGURES[name](out) if verdict == "passed" else f"see {out}/*.log"
        except (OSError, KeyError, ValueError) as err:  # a file without what it should hold
            verdict, figures = "failed (its output)", f"{type(err).__name__}: {err}"
        rows.append({"step": name, "verdict": verdict, "seconds": seconds,
                     "figures": figures})
    return rows


def main(out: Path) -> int:
    from mpiattn.io.h5io import atomic_file
    from mpiattn.io.outfile import Reservation

    rows = steps(out)
    failed = [r["step"] for r in rows if r["verdict"] != "passed"]
    with atomic_file(Reservation.make(out / "gpu-check.h5", force=True)) as f:
        for name in ("run-gpu.h5", "bench-gpu.h5", "scaling/scaling.h5"):
            if not (out / name).exists():
                continue
            with h5py.File(out / name, "r") as src:
                g = f.create_group(Path(name).stem)
                for key in src:
                    src.copy(key, g)
                g.attrs.update(src.attrs)
        junit = out / "gpu-tests.xml"
        f.attrs["tests_junit"] = junit.read_text() if junit.exists() else "no JUnit report"
        smi = out / "nvidia-smi.csv"
        f.attrs["nvidia_smi"] = smi.read_text() if smi.exists() else "nvidia-smi not found"
        f.attrs["steps"] = json.dumps(rows)
        f.attrs["status"] = "complete" if not failed else "failed: " + ", ".join(failed)
    print(f"\nGPU check ({out}):")
    for r in rows:
        print(f"  {r['step']:<8} {r['verdict']:<22} {r['seconds']:>4} s  {r['figures']}")
    total = sum(r["seconds"] for r in rows)
    print(f"{len(rows) - len(failed)} of {len(rows)} steps passed in {total} s;"
          f" wrote {out / 'gpu-check.h5'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
