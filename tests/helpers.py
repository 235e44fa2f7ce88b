"""Test helpers: tiny configs, and a head group simulated with threads (no MPI)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from mpiattn import config
from mpiattn.core.model import encoder_forward
from mpiattn.core.shard import head_shard
from mpiattn.inputs.data import load_batch
from mpiattn.io.weights import open_source

# Tolerances of every equivalence test (max |got - want| / max |want|), per dtype.
TOL = {"float32": 1e-5, "float64": 1e-12}

TINY = {
    "model.layers": 2, "model.heads": 12, "model.hidden": 96, "model.ffn": 200,
    "model.vocab": 500, "model.max_positions": 64, "input.batch": 4, "input.seq_len": 24,
}


def tiny(**overrides: Any) -> config.Config:
    flat = dict(TINY)
    flat.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config.from_dict(flat)


class ThreadGroup:
    """``k`` threads stand in for the ranks of a head group; reduce() sums their partials."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.barrier = threading.Barrier(k)
        self.parts: list[Any] = [None] * k

    def member(self, index: int) -> Any:
        group = self

        class Member:
            def buffer(self, rows: int, cols: int, dtype: Any, slot: int = 0) -> Any:
                return np.empty((rows, cols), dtype=dtype)

            def __call__(self, partial: Any, *, site: str, layer: int) -> Any:
                group.parts[index] = partial.copy()
                group.barrier.wait()
                total = group.parts[0].copy()
                for part in group.parts[1:]:
                    total += part
                group.barrier.wait()
                return total

            def allgather(self, block: Any, *, site: str, layer: int) -> Any:
                """(k, *block.shape): every member's block, in member order."""
                group.parts[index] = np.array(block, copy=True)
                group.barrier.wait()
                out = np.stack(group.parts)
                group.barrier.wait()
                return out

        return Member()


def run_ranks(work: Any, args: list[tuple], groups: list[ThreadGroup]) -> None:
    """``work(*a)`` for every ``a`` in its own thread, like ranks; the first error in any
    thread aborts every group's barrier (no thread is left waiting) and is raised here."""
    errors: list[BaseException] = []

    def guarded(*a: Any) -> None:
        try:
            work(*a)
        except BaseException as err:  # surfaced in the main thread
            errors.append(err)
            for g in groups:
                g.barrier.abort()

    threads = [threading.Thread(target=guarded, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def each_rank(ranks: int, work: Any, timeout: float = 60) -> list[Any]:
    """``work(r)`` for every rank r, each in its own thread (a ``ThreadWorld``'s members);
    each rank's result, or the exception it raised (kept for the assertions)."""
    out: list[Any] = [None] * ranks

    def guarded(r: int) -> None:
        try:
            out[r] = work(r)
        except BaseException as err:
            out[r] = err

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


def sharded_forward(cfg: config.Config, k: int) -> list[tuple[Any, Any]]:
    """Per-layer (attention, hidden) of rank 0 when ``k`` threads share the heads."""
    m = cfg.model
    source = open_source(cfg.seed, m, cfg.dtype)
    batch = load_batch(cfg)
    group = ThreadGroup(k)
    results: list[list] = [[] for _ in range(k)]

    def work(i: int) -> None:
        shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, k, i)
        layers = [source.layer(n, shard) for n in range(m.layers)]
        encoder_forward(batch.ids, batch.mask, source.embeddings(), layers,
                        group.member(i), m.layer_norm_eps,
                        on_layer=lambda n, a, h: results[i].append((a.copy(), h.copy())))

    run_ranks(work, [(i,) for i in range(k)], [group])
    for other in results[1:]:  # every rank of a head group ends with the same numbers
        for (a0, h0), (a1, h1) in zip(results[0], other, strict=True):
            assert np.array_equal(a0, a1) and np.array_equal(h0, h1)
    return results[0]


def direct_head_stats(probs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clark et al.'s statistics written out, the oracle of ``headstats``: from
    probabilities (B, h, S, S) (0 on padding keys) and the (B, S) real-token mask, per head
    the mean over real query tokens of -sum_j p ln p (nats) and of sum_j p |i - j|
    (tokens)."""
    seq = probs.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(probs), 0.0)
    entropy = -plogp.sum(axis=-1)  # (B, h, S)
    pos = np.arange(seq)
    distance = (probs * np.abs(pos[:, None] - pos[None, :])).sum(axis=-1)
    real = mask[:, None, :]
    count = mask.sum()
    return (np.where(real, entropy, 0).sum(axis=(0, 2)) / count,
            np.where(real, distance, 0).sum(axis=(0, 2)) / count)


def dim_names(dset: Any) -> list[str]:
    """The dimension of each axis of an HDF5 dataset: the name of the dimension scale
    attached to it (format 2), else its label (format 1)."""
    return [d[0].name.rsplit("/", 1)[-1] if len(d) else d.label for d in dset.dims]


def resume_errors(straight: Path, resumed: Path, straight_ck: Path, resumed_ck: Path
                  ) -> tuple[float, float, float]:
    """Relative errors of a resumed run against a straight one: the per-step losses of the
    two outputs, and the parameters and Adam's v of their final checkpoints."""
    import h5py
    from test_grad import rel_err

    with h5py.File(straight) as a, h5py.File(resumed) as b:
        loss = rel_err(b["train/loss"][()], a["train/loss"][()])
    with h5py.File(straight_ck) as a, h5py.File(resumed_ck) as b:
        params = max(rel_err(b["params"][k][()], a["params"][k][()]) for k in a["params"])
        adam_v = max(rel_err(b["optimizer/v"][k][()], a["optimizer/v"][k][()])
                     for k in a["optimizer/v"])
    return loss, params, adam_v


class ThreadAlltoall:
    """``k`` threads stand in for a sequence group's Alltoall: block j of member i goes to
    member j (as ``transfers.CheckedAlltoall``), every call also counted by site."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.barrier = threading.Barrier(k)
        self.slots: list[Any] = [None] * k
        self.sites: list[str] = []

    def member(self, index: int) -> Any:
        group = self

        def alltoall(blocks: np.ndarray, *, site: str, layer: int) -> np.ndarray:
            assert blocks.shape[0] == group.k
            group.slots[index] = blocks.copy()
            group.barrier.wait()
            out = np.stack([group.slots[s][index] for s in range(group.k)])
            if index == 0:
                group.sites.append(site)
            group.barrier.wait()
            return out

        return alltoall


class ThreadRing:
    """``k`` threads stand in for a sequence group's ring (``transfers.CheckedRing``):
    ``start`` hands a copy to the next member on the channel, ``finish`` takes what the
    previous member handed over."""

    def __init__(self, k: int) -> None:
        import queue

        self.k = k
        self.boxes = {(r, c): queue.Queue() for r in range(k) for c in range(8)}
        self.barrier = threading.Barrier(k)  # for run_ranks' abort on an error

    def member(self, index: int) -> Any:
        group = self

        class Member:
            def start(self, payload: np.ndarray, *, site: str, layer: int,
                      channel: int = 0) -> tuple[int, int]:
                group.boxes[((index + 1) % group.k, channel)].put(np.array(payload, copy=True))
                return index, channel

            def finish(self, shift: tuple[int, int]) -> np.ndarray:
                return group.boxes[shift].get(timeout=240)

        return Member()


class ThreadWorld:
    """``size`` threads stand in for the ranks of COMM_WORLD in the pre-flight's
    agreements: ``member(r)`` has ``Get_rank``, ``Get_size``, ``allgather`` and
    ``alltoall`` (the split scan's exchange)."""

    def __init__(self, size: int) -> None:
        self.size, self.barrier, self.slots = size, threading.Barrier(size), [None] * size

    def member(self, rank: int) -> Any:
        world = self

        class Rank:
            def Get_rank(self) -> int:
                return rank

            def Get_size(self) -> int:
                return world.size

            def _swap(self, item: Any, pick: Any) -> Any:
                world.slots[rank] = item
                world.barrier.wait()
                out = pick(list(world.slots))
                world.barrier.wait()
                return out

            def allgather(self, item: Any) -> list:
                return self._swap(item, lambda slots: slots)

            def alltoall(self, items: list) -> list:
                return self._swap(items, lambda slots: [s[rank] for s in slots])

        return Rank()
