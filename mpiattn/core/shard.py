"""How heads (and the matching MLP slice) are split across the ranks of a head group.

Everything here is pure and MPI-free, so it is tested for any world size in one process.
The split is the DeepSpeed/mpi4py-fft one: ``divmod`` gives ``count`` and ``start`` for any
rank, the first ``n % parts`` ranks taking one more (12 heads on 5 ranks = 3,3,2,2,2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def partition(n: int, parts: int, index: int) -> tuple[int, int]:
    """(count, start) of block ``index`` when ``n`` items are split into ``parts`` blocks."""
    if parts < 1 or not 0 <= index < parts or n < 0:
        raise ValueError(f"partition({n=}, {parts=}, {index=}) is not a valid split")
    base, extra = divmod(n, parts)
    count = base + (index < extra)
    start = index * base + min(index, extra)
    return count, start


def counts(n: int, parts: int) -> list[int]:
    """Block sizes of ``partition`` for every index: counts(12, 5) == [3, 3, 2, 2, 2]."""
    return [partition(n, parts, i)[0] for i in range(parts)]


def weighted_counts(n: int, weights: Sequence[float], minimum: int = 1) -> list[int]:
    """Split ``n`` items in proportion to ``weights`` (largest remainder), each >= minimum.

    Used to give faster ranks more heads; equal weights give exactly ``counts``.
    """
    parts = len(weights)
    if parts * minimum > n:
        raise ValueError(f"cannot give {parts} ranks at least {minimum} of {n} items each")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    free = n - parts * minimum
    total = float(sum(weights))
    ideal = [free * w / total for w in weights]
    out = [minimum + int(x) for x in ideal]
    order = sorted(range(parts), key=lambda i: (-(ideal[i] - int(ideal[i])), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


@dataclass(frozen=True)
class HeadShard:
    """The heads of one rank and the slice of every per-head dimension they own.

    ``units`` is how the MLP width is cut into one group per head, so that the MLP slice of
    a rank follows its heads and never depends on how many ranks there are.
    """

    heads: int  # heads in the model
    head_dim: int
    ffn: int  # MLP width in the model
    start: int  # first head of this rank
    count: int  # heads of this rank

    @property
    def stop(self) -> int:
        return self.start + self.count

    @property
    def width(self) -> int:
        """Columns of Q (or K, V) this rank holds."""
        return self.count * self.head_dim

    @property
    def cols(self) -> slice:
        """Columns of a (hidden, heads*head_dim) projection owned by this rank."""
        return slice(self.start * self.head_dim, self.stop * self.head_dim)

    def ffn_group(self, head: int) -> slice:
        """MLP columns tied to one head: the MLP width split into ``heads`` groups."""
        count, start = partition(self.ffn, self.heads, head)
        return slice(start, start + count)

    @property
    def ffn_cols(self) -> slice:
        """MLP columns owned by this rank (the groups of its heads, contiguous)."""
        if self.count == 0:
            return slice(0, 0)
        return slice(self.ffn_group(self.start).start, self.ffn_group(self.stop - 1).stop)


def head_shard(
    heads: int, head_dim: int, ffn: int, parts: int, index: int,
    head_counts: Sequence[int] | None = None,
) -> HeadShard:
    """Shard of rank ``index`` among ``parts``; ``head_counts`` overrides the even split."""
    if parts > heads:
        raise ValueError(
            f"{parts} head ranks but only {heads} heads: use parallel.tensor <= {heads}"
            " and let the remaining ranks split the batch"
        )
    if head_counts is None:
        count, start = partition(heads, parts, index)
    else:
        if len(head_counts) != parts or sum(head_counts) != heads:
            raise ValueError(f"head counts {list(head_counts)} do not split {heads} heads")
        count, start = head_counts[index], sum(head_counts[:index])
    return HeadShard(heads=heads, head_dim=head_dim, ffn=ffn, start=start, count=count)
