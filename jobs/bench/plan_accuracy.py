"""How well ``mpiattn plan`` predicts real runs on this machine (a benchmark, not a test:
its figure depends on how busy the machine is, so no test asserts it).

    python jobs/bench/plan_accuracy.py [--ranks 1,2,4] [--tries 3] [--work DIR]

Runs ``mpiattn run`` on a 3-layer, hidden-384 model (batch 4, 128 tokens) at each rank
count (ranks beyond the cores oversubscribe them), fits the plan's machine model to those
files (``plan.fit``, keeping the fastest run of each rank count, as ``mpiattn plan``
does) and prints, per rank count, the predicted against the measured layer and forward
time. A busy machine slows single runs: it repeats the set up to ``--tries`` times while
any error exceeds ``--within`` (0.30). Exit 0 when every error is within it, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mpiattn.analysis import plan, report

SMALL = ["model.layers=3", "model.hidden=384", "model.ffn=1536", "model.vocab=1000",
         "input.batch=4", "input.seq_len=128"]


def run(work: Path, ranks: int, tag: str) -> Path:
    out = work / f"r{ranks}{tag}.h5"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    sets = [arg for kv in SMALL for arg in ("--set", kv)]
    done = subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpiattn",
                           "run", *sets, "-o", str(out)], capture_output=True, text=True,
                          env=env, cwd=work, timeout=600)
    if done.returncode != 0:
        sys.exit(f"plan_accuracy: the run at {ranks} ranks failed:\n{done.stderr[-2000:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4", help="rank counts, comma-separated")
    ap.add_argument("--tries", type=int, default=3, help="sets of runs at most")
    ap.add_argument("--within", type=float, default=0.30, help="relative error accepted")
    ap.add_argument("--work", type=Path, help="folder for the run files (default: temporary)")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        for t in range(args.tries):
            paths += [run(work, n, "abc"[t % 3] + str(t)) for n in ranks]
            files = plan.fastest([report.load(p) for p in paths])
            checks = plan.check(files, plan.fit(files))
            worst = max(max(abs(c["layer_error"]), abs(c.get("forward_error", 0.0)))
                        for c in checks)
            for c in checks:
                print(f"try {t + 1}: {c['ranks']} ranks: layer {100 * c['layer_error']:+.1f}%,"
                      f" forward {100 * c.get('forward_error', float('nan')):+.1f}%")
            if worst < args.within:
                print(f"plan within {100 * worst:.1f}% of every run (limit"
                      f" {100 * args.within:.0f}%)")
                return 0
    print(f"plan off by {100 * worst:.1f}% at worst (limit {100 * args.within:.0f}%)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
