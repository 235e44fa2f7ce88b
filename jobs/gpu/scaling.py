"""CPU strong scaling, predicted before it is measured: an out-of-sample check of ``plan``.

    python jobs/gpu/scaling.py OUT_DIR [--fit 1,2,4] [--predict 8,16] [--set KEY=VALUE ...]

1. ``mpiexec -n N mpiattn run`` on the NumPy backend at each ``--fit`` rank count (the
   main job: the embedded BERT-base default unless ``--set`` changes it), one rank per
   core or fewer, BLAS threads as the runner sets them (cores // ranks);
2. ``mpiattn plan`` fitted to those files alone predicts every rank count, the
   ``--predict`` ones included, each with its layout (head ranks x replicas);
3. only then the ``--predict`` runs, in the layout ``plan`` chose for them.

``OUT_DIR/scaling.h5`` holds, per rank count (dimension ``ranks``): the layout, the
measured forward (the slowest rank's, s), the predicted forward (s), the relative error
(predicted / measured - 1) and whether the count was in the fit; ``plan``'s whole JSON
output is the attribute ``plan_json``. Exit 1 when a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np


def ranks_list(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def options(sets: list[str]) -> list[str]:
    return [word for s in sets for word in ("--set", s)]


def run(out: Path, ranks: int, sets: list[str], layout: dict | None = None) -> Path:
    """One ``mpiattn run`` at ``ranks`` ranks; its file."""
    path = out / f"scale-{ranks}.h5"
    if layout is not None:
        sets = [*sets, f"parallel.tensor={layout['tensor']}"]
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpiattn.cli", "run",
           *options(["backend=numpy", *sets]), "-o", str(path), "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"scaling: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return path


def measured_forward(path: Path) -> float:
    with h5py.File(path, "r") as f:
        return float(np.max(f["timings/forward"][...]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--fit", type=ranks_list, default=[1, 2, 4])
    ap.add_argument("--predict", type=ranks_list, default=[8, 16])
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                    help="config override of the job (repeatable)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("OMP_NUM_THREADS", None)  # the runner sets BLAS threads per rank

    fitted = [run(args.out, n, args.sets) for n in args.fit]
    every = sorted(set(args.fit) | set(args.predict))
    plan_sets = options([s for s in args.sets if s.split("=")[0] in PLAN_KEYS])
    done = subprocess.run([sys.executable, "-m", "mpiattn.cli", "plan", *map(str, fitted),
                           "--ranks", ",".join(map(str, every)), "--json", *plan_sets],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"scaling: mpiattn plan failed ({done.returncode}):\n{done.stderr[-2000:]}")
    plan = json.loads(done.stdout)
    (args.out / "plan.json").write_text(done.stdout)
    rows = {row["ranks"]: row for row in plan["predictions"]}
    missing = [n for n in every if n not in rows]
    if missing:
        sys.exit(f"scaling: plan has no layout for {missing} ranks with this job (heads,"
                 " batch): choose other --predict counts or a bigger job")
    paths = dict(zip(args.fit, fitted, strict=True))
    for n in args.predict:
        if n not in paths:
            paths[n] = run(args.out, n, args.sets, rows[n])

    measured = np.array([measured_forward(paths[n]) for n in every])
    predicted = np.array([rows[n]["forward_s"] for n in every])
    with h5py.File(args.out / "scaling.h5", "w") as f:
        dim = f.create_dataset("ranks", data=np.array(every, dtype=np.int64))
        dim.make_scale("ranks")
        columns = {
            "tensor": (np.array([rows[n]["tensor"] for n in every]), "1"),
            "data": (np.array([rows[n]["data"] for n in every]), "1"),
            "measured_forward": (measured, "s"),
            "predicted_forward": (predicted, "s"),
            "error": (predicted / measured - 1.0, "1"),
            "in_fit": (np.array([n in args.fit for n in every]), "1"),
        }
        for name, (values, units) in columns.items():
            ds = f.create_dataset(name, data=values)
            ds.dims[0].attach_scale(dim)
            ds.attrs["units"] = units
        f["error"].attrs["description"] = "predicted / measured forward - 1"
        f.attrs["plan_json"] = done.stdout
        f.attrs["fit_ranks"] = np.array(args.fit)
        f.attrs["job"] = json.dumps(plan["job"])
    for n, m, p in zip(every, measured, predicted, strict=True):
        kind = "fit" if n in args.fit else "out of sample"
        print(f"{n:3d} ranks ({rows[n]['tensor']} head x {rows[n]['data']} data):"
              f" measured {m:.3f} s, predicted {p:.3f} s ({p / m - 1:+.0%}, {kind})")
    return 0


PLAN_KEYS = {"model.hidden", "model.heads", "model.layers", "model.ffn", "input.batch",
             "input.seq_len", "dtype", "checksum.mode", "checksum.wire"}

if __name__ == "__main__":
    raise SystemExit(main())
