"""Measured detection rate of the ABFT check by bit position (float32 payload).

    python -m mpiattn.analysis.detection --trials 200 [-o detection.h5]

Each trial flips one bit of one element of one rank's partial after its checksums were
taken (``where = "send"``), on 2-4 ranks of standard-normal 256x48 partials, and asks the
check whether the sum is sound. Printed as a markdown table: the float64 wire as NumPy
ranks run it (``comm.SplitSum``: float64 sums per row block, float32 bytes), as one
float64 Allreduce (CuPy ranks), and the native float32 wire.
"""

from __future__ import annotations

import argparse

import numpy as np

from ..core.checksum import detection_rate

WIRES = {"split": (np.float64, True), "float64": (np.float64, False),
         "native": (np.float32, False)}


def rates(trials: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: np.array([detection_rate(bit, trials, rng, wire=wire, split=split)
                            for bit in range(32)])
            for name, (wire, split) in WIRES.items()}


def bit_name(bit: int) -> str:
    if bit == 31:
        return "sign"
    return f"exponent {bit - 23}" if bit >= 23 else f"mantissa {bit}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("-o", "--output", help="also write the rates to this HDF5 file")
    args = ap.parse_args(argv)
    table = rates(args.trials)
    print("| bit | field | float64 wire, split (NumPy) | float64 wire, Allreduce (CuPy) |"
          " native float32 wire |")
    print("|---|---|---|---|---|")
    for bit in range(31, -1, -1):
        print(f"| {bit} | {bit_name(bit)} | {100 * table['split'][bit]:.1f}% |"
              f" {100 * table['float64'][bit]:.1f}% | {100 * table['native'][bit]:.1f}% |")
    if args.output:
        from ..io.h5io import atomic_file, write_array

        with atomic_file(args.output) as f:
            for name, values in table.items():
                write_array(f, f"detection/{name}", values, ("bit",), trials=args.trials)
            f.attrs["status"] = "complete"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
