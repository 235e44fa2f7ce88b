"""CPU strong scaling, predicted before it is measured: an out-of-sample check of ``plan``.

    python jobs/gpu/scaling.py OUT_DIR [--fit 1,2,4] [--predict 8,16] [--set KEY=VALUE ...]

1. ``mpiexec -n N mpiattn run`` on the NumPy backend at each ``--fit`` rank count (the
   main job: the embedded BERT-base default unless ``--set`` changes it), BLAS threads
   as the runner sets them (cores // ranks); meant for counts up to the cores;
2. ``mpiattn plan`` fitted to those files alone predicts every rank count, the
   ``--predict`` ones included, each with its layout (head ranks x replicas);
3. only then the ``--predict`` runs, in the layout ``plan`` chose for them.

Fit runs take the most head ranks that divide their count (``plan``'s rule); runs keep no
hidden states (``output.layers = "none"``), only their timings. ``OUT_DIR/scaling.h5``
(published atomically) holds, per rank count (dimension ``ranks``): the layout, the
measured forward (the slowest rank's, s), the predicted forward (s), the relative error
(predicted / measured - 1) and whether the count was in the fit; ``plan``'s whole JSON
output is the attribute ``plan_json``. Exit 1, with the failing step on stderr, when a
step fails.
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

# the config keys `mpiattn plan --set` takes: the predicted job is the measured one
PLAN_KEYS = {"model.hidden", "model.heads", "model.layers", "model.ffn", "input.batch",
             "input.seq_len", "dtype", "checksum.mode", "checksum.wire",
             "parallel.microbatches", "parallel.sequence", "attention.sequence"}


def ranks_list(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def options(sets: list[str]) -> list[str]:
    return [word for s in sets for word in ("--set", s)]


def run(out: Path, ranks: int, sets: list[str], tensor: int) -> Path:
    """One ``mpiattn run`` at ``ranks`` ranks with ``tensor`` head ranks; its file."""
    path = out / f"scale-{ranks}.h5"
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpiattn", "run",
           *options(["backend=numpy", 'output.layers="none"', *sets,
                     f"parallel.tensor={tensor}"]), "-o", str(path), "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"scaling: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return path


def measured_forward(path: Path) -> float:
    with h5py.File(path, "r") as f:
        return float(np.max(f["timings/forward"][...]))


def fit_layout(sets: list[str], ranks: int) -> int:
    """The head ranks of a fit run: the most that divide ``ranks`` (plan's own rule)."""
    from mpiattn.config import load, tensor_choices

    choices = tensor_choices(load(None, sets), ranks)
    if not choices:
        sys.exit(f"scaling: no layout of {ranks} ranks fits this job (model.heads,"
                 " input.batch): choose other --fit counts")
    return choices[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--fit", type=ranks_list, default=[1, 2, 4])
    ap.add_argument("--predict", type=ranks_list, default=[8, 16])
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                    help="config override of the job (repeatable)")
    args = ap.parse_args()
    if set(args.fit) & set(args.predict) or len(args.fit) < 2:
        sys.exit("scaling: give at least two --fit counts and --predict counts apart from them")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("OMP_NUM_THREADS", None)  # the runner sets BLAS threads per rank

    fitted = [run(args.out, n, args.sets, fit_layout(args.sets, n)) for n in args.fit]
    every = sorted(set(args.fit) | set(args.predict))
    plan_sets = options([s for s in args.sets if s.split("=")[0].strip() in PLAN_KEYS])
    done = subprocess.run([sys.executable, "-m", "mpiattn", "plan", *map(str, fitted),
                           "--ranks", ",".join(map(str, every)), "--json", *plan_sets],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"scaling: mpiattn plan failed ({done.returncode}):\n{done.stderr[-2000:]}")
    plan = json.loads(done.stdout)
    rows = {row["ranks"]: row for row in plan["predictions"]}
    missing = [n for n in every if n not in rows]
    if missing:
        sys.exit(f"scaling: plan has no layout for {missing} ranks with this job (heads,"
                 " batch): choose other --predict counts or a bigger job")
    unbuilt = [n for n in args.predict if (rows[n]["pipeline"], rows[n]["sequence"]) != (1, 1)]
    if unbuilt:
        sys.exit(f"scaling: plan chose pipeline or sequence stages for {unbuilt} ranks;"
                 " this check runs head x data layouts only")
    paths = dict(zip(args.fit, fitted, strict=True))
    for n in args.predict:  # only now, in the layout plan chose for them
        paths[n] = run(args.out, n, args.sets, rows[n]["tensor"])

    measured = np.array([measured_forward(paths[n]) for n in every])
    predicted = np.array([rows[n]["forward_s"] for n in every])
    write(args.out / "scaling.h5", every, rows, measured, predicted, args.fit, done.stdout)
    for n, m, p in zip(every, measured, predicted, strict=True):
        kind = "fit" if n in args.fit else "out of sample"
        print(f"{n:3d} ranks ({rows[n]['tensor']} head x {rows[n]['data']} data):"
              f" measured {m:.3f} s, predicted {p:.3f} s ({p / m - 1:+.0%}, {kind})")
    return 0


def write(path: Path, every: list[int], rows: dict, measured: np.ndarray,
          predicted: np.ndarray, fit: list[int], plan_json: str) -> None:
    """``scaling.h5``, published atomically (``h5io.atomic_file``), replacing an earlier
    one of this folder."""
    from mpiattn.io.h5io import atomic_file
    from mpiattn.io.outfile import Reservation

    with atomic_file(Reservation.make(path, force=True)) as f:
        dim = f.create_dataset("ranks", data=np.array(every, dtype=np.int64))
        dim.make_scale("ranks")
        columns = {
            "tensor": (np.array([rows[n]["tensor"] for n in every]), "1"),
            "data": (np.array([rows[n]["data"] for n in every]), "1"),
            "measured_forward": (measured, "s"),
            "predicted_forward": (predicted, "s"),
            "error": (predicted / measured - 1.0, "1"),
            "in_fit": (np.array([n in fit for n in every]), "1"),
        }
        for name, (values, units) in columns.items():
            ds = f.create_dataset(name, data=values)
            ds.dims[0].attach_scale(dim)
            ds.attrs["units"] = units
        f["error"].attrs["description"] = "predicted / measured forward - 1"
        f.attrs["plan_json"] = plan_json
        f.attrs["fit_ranks"] = np.array(fit)
        f.attrs["job"] = json.dumps(json.loads(plan_json)["job"])
        f.attrs["status"] = "complete"


if __name__ == "__main__":
    raise SystemExit(main())
