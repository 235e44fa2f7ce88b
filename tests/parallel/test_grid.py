"""The process grid's arithmetic, without MPI: coordinates, ranks, groups, shape errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpiattn.errors import ConfigError
from mpiattn.parallel.grid import AXES, GridShape


def test_todays_layout_is_the_grid_with_one_stage():
    shape = GridShape.of(world_size=6, tensor=3)
    assert shape.sizes == {"data": 2, "pipeline": 1, "sequence": 1, "tensor": 3}
    # world rank = replica * tensor + head rank, as before the grid
    for rank in range(6):
        replica, head = divmod(rank, 3)
        assert shape.coords(rank) == {"data": replica, "pipeline": 0, "sequence": 0,
                                      "tensor": head}
    assert shape.group(4, "tensor") == [3, 4, 5]
    assert shape.group(4, "data") == [1, 4]


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_coordinates_and_ranks_are_inverse_and_groups_partition(data, pipeline, tensor,
                                                                 sequence):
    shape = GridShape(data, pipeline, tensor, sequence)
    n = shape.world_size
    assert sorted(shape.rank(shape.coords(r)) for r in range(n)) == list(range(n))
    for axis in AXES:
        groups = {tuple(shape.group(r, axis)) for r in range(n)}
        assert sorted(itertools.chain(*groups)) == list(range(n))  # a partition
        assert all(len(g) == getattr(shape, axis) for g in groups)
        for r in range(n):  # members differ from r only along the axis
            others = {a: c for a, c in shape.coords(r).items() if a != axis}
            for member in shape.group(r, axis):
                at = shape.coords(member)
                assert {a: c for a, c in at.items() if a != axis} == others


def test_tensor_is_fastest_so_head_groups_are_neighbours():
    shape = GridShape(2, 2, 3)
    assert shape.group(0, "tensor") == [0, 1, 2]
    assert shape.group(0, "pipeline") == [0, 3]
    assert shape.group(0, "data") == [0, 6]


def test_sequence_groups_sit_between_heads_and_stages():
    shape = GridShape.of(12, tensor=2, sequence=3)  # data 2
    assert shape.sizes == {"data": 2, "pipeline": 1, "sequence": 3, "tensor": 2}
    assert shape.group(0, "tensor") == [0, 1]
    assert shape.group(1, "sequence") == [1, 3, 5]
    assert shape.group(1, "data") == [1, 7]
    assert shape.group_over(1, ("data", "sequence")) == [1, 3, 5, 7, 9, 11]


@pytest.mark.parametrize(("world", "tensor", "pipeline", "message"), [
    (6, 4, 1, "must be one of [1, 2, 3, 6]"),
    (8, 2, 3, "2 x 3 x 1 = 6 does not divide the 8 ranks"),
    (4, 0, 1, "parallel.tensor = 0"),
])
def test_shapes_that_do_not_fit_are_one_line_errors(world, tensor, pipeline, message):
    with pytest.raises(ConfigError) as err:
        GridShape.of(world, tensor, pipeline)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ranks_outside_the_grid_are_refused():
    with pytest.raises(ValueError):
        GridShape(2, 1, 2).coords(4)
