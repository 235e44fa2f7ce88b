"""A ring of one rank: the shift is a copy of the payload, without any MPI call."""

import numpy as np
import pytest

from mpiattn.parallel.transfers import CheckedRing


class OneRank:
    """A communicator of one rank that has nothing but its size and rank: any MPI call
    would fail."""

    def Get_size(self) -> int:
        return 1

    def Get_rank(self) -> int:
        return 0


def test_one_rank_shift_is_a_copy_without_a_record():
    ring = CheckedRing(OneRank())
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    shift = ring.start(x, site="kv", layer=0, channel=7)
    out = ring.finish(shift)
    np.testing.assert_array_equal(out, x)
    assert out.dtype == x.dtype and not np.shares_memory(out, x)
    assert ring.records == []
    with pytest.raises(ValueError, match="already finished"):
        ring.finish(shift)
    with pytest.raises(ValueError, match="outside 0..7"):
        ring.start(x, site="kv", layer=0, channel=-1)
