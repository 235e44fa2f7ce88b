"""What the checksum costs, per whole layer, with every way of running it side by side.

    OMP_NUM_THREADS=1 mpiexec -n 2 python jobs/bench/checksum_cost.py [--seq 512] [--repeats 12]

One BERT-base layer (hidden 768, 12 heads, ffn 3072, seeded weights, batch 8, float32, no
padding) on this rank's heads, timed as ``mpiattn bench`` times it (barrier, slowest
rank), with the reduction switched between:

- ``off``: plain Iallreduce, no check;
- ``native``: ABFT rows in float32 on a float32 Allreduce (``checksum.wire = "native"``);
- ``float64``: the default float64 wire as NumPy ranks run it (``comm.SplitSum``: row
  blocks summed in float64 by their owner after a float32 exchange);
- ``float64-allreduce``: the same check as one float64 Allreduce (how CuPy ranks run it,
  and how NumPy ranks ran it before).

The modes are interleaved, repeat by repeat, so a change of machine load hits all alike;
the medians and the minima over ``--repeats`` (the minimum is the steadier figure on a
machine others share) and their ratios to ``off`` are printed on rank 0.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

from mpiattn.config import Config
from mpiattn.core.attention import KeyMask, Options
from mpiattn.core.backend import limit_blas_threads, select
from mpiattn.core.model import layer_forward
from mpiattn.core.shard import head_shard
from mpiattn.io.weights import SeededWeights
from mpiattn.parallel.comm import CheckedAllreduce

MODES = {"off": ("off", "native", True), "native": ("abft", "native", True),
         "float64": ("abft", "float64", True), "float64-allreduce": ("abft", "float64", False)}


class AllreduceOnly(CheckedAllreduce):
    """The float64 wire as one Allreduce (the split path turned off)."""

    def _splits(self, partial):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    limit_blas_threads(size)
    m = Config().model
    d = m.hidden // m.heads
    layer = SeededWeights(0, m, np.float32).layer(0, head_shard(m.heads, d, m.ffn, size, rank))
    x = np.random.default_rng(1).standard_normal((args.batch, args.seq, m.hidden),
                                                 dtype=np.float32)
    mask = KeyMask([args.seq] * args.batch)
    backend = select("numpy")
    reducers = {name: (CheckedAllreduce if split else AllreduceOnly)(
        comm=world, backend=backend, mode=mode, wire=wire, world_rank=rank,
        group_ranks=list(range(size))) for name, (mode, wire, split) in MODES.items()}
    options = {name: Options() for name in MODES}
    seconds: dict[str, list[float]] = {name: [] for name in MODES}
    for repeat in range(args.repeats + 2):  # two warm-up rounds
        for name, reduce in reducers.items():
            world.Barrier()
            t0 = time.perf_counter()
            layer_forward(x, layer, mask, reduce, 0, m.layer_norm_eps, options=options[name])
            mine = np.array([time.perf_counter() - t0])
            slowest = np.empty(1)
            world.Allreduce(mine, slowest, op=MPI.MAX)
            if repeat >= 2:
                seconds[name].append(float(slowest[0]))
    if rank == 0:
        base, low = np.median(seconds["off"]), min(seconds["off"])
        print(f"BERT-base layer, batch {args.batch} x seq {args.seq}, float32, {size} ranks,"
              f" {args.repeats} interleaved repeats")
        for name, values in seconds.items():
            med = np.median(values)
            print(f"  {name:18s} median {1e3 * med:7.1f} ms (on/off {med / base:.3f}),"
                  f" min {1e3 * min(values):7.1f} ms (on/off {min(values) / low:.3f})")


if __name__ == "__main__":
    main()
