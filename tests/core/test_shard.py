import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpiattn.core.shard import counts, head_shard, partition, weighted_counts


def test_uneven_split_users_hit():
    assert counts(12, 5) == [3, 3, 2, 2, 2]
    assert [partition(12, 5, i)[1] for i in range(5)] == [0, 3, 6, 8, 10]


@given(st.integers(0, 500), st.integers(1, 64))
def test_partition_tiles_exactly(n, parts):
    blocks = [partition(n, parts, i) for i in range(parts)]
    assert sum(c for c, _ in blocks) == n
    assert max(c for c, _ in blocks) - min(c for c, _ in blocks) <= 1
    position = 0
    for count, start in blocks:  # contiguous, in order, no gaps
        assert start == position
        position += count


def test_partition_rejects_bad_arguments():
    for args in [(4, 0, 0), (4, 2, 2), (-1, 2, 0)]:
        with pytest.raises(ValueError):
            partition(*args)


@given(st.integers(1, 48), st.lists(st.floats(0.1, 10), min_size=1, max_size=8))
def test_weighted_counts_sum_and_floor(n, weights):
    if len(weights) > n:
        with pytest.raises(ValueError):
            weighted_counts(n, weights)
        return
    out = weighted_counts(n, weights)
    assert sum(out) == n and min(out) >= 1


def test_weighted_counts_follow_speed():
    assert weighted_counts(12, [1, 1]) == [6, 6]
    assert weighted_counts(12, [3, 1]) == [9, 3]


def test_mlp_slice_follows_heads():
    shards = [head_shard(12, 32, 1000, 5, i) for i in range(5)]
    widths = [s.ffn_cols.stop - s.ffn_cols.start for s in shards]
    assert sum(widths) == 1000
    assert [s.ffn_cols.start for s in shards[1:]] == [s.ffn_cols.stop for s in shards[:-1]]
    assert shards[3].cols == slice(8 * 32, 10 * 32)


def test_more_ranks_than_heads_is_refused():
    with pytest.raises(ValueError, match="only 4 heads"):
        head_shard(4, 8, 32, 5, 0)
